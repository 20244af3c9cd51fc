"""Progress that reads well wherever it goes.

- In a terminal: tqdm bars.
- In a notebook: tqdm.auto's widgets.
- Anywhere else (a log file under Slurm, CI, nohup): no bars redrawn hundreds of times, only
  the lines the caller writes (one per epoch) and, for long jobs, a line at each quarter.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and shell.get_ipython().__class__.__name__ == "ZMQInteractiveShell"
    except AttributeError:
        return False


def interactive() -> bool:
    """Whether progress can be redrawn in place: a terminal on stderr, or a notebook."""
    return _in_notebook() or sys.stderr.isatty()


class _Lines:
    """A stand-in for a bar in logs: a line at 25, 50, 75 and 100 percent of `total` (when
    `report` is set), nothing for each step."""

    def __init__(self, total: int | None, desc: str, report: bool):
        self.total, self.desc, self.report = total, desc, report
        self.n, self.next_quarter, self.start = 0, 1, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not (self.report and self.total):
            return
        while self.next_quarter <= 4 and self.n >= self.total * self.next_quarter / 4:
            elapsed = time.perf_counter() - self.start
            print(f"{self.desc}: {25 * self.next_quarter}% ({elapsed:.0f} s)", file=sys.stderr, flush=True)
            self.next_quarter += 1

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, enabled: bool = True, *, report: bool = False, **kwargs):
    """A progress bar over `total` steps, or its stand-in when progress cannot be redrawn.

    report: in logs, print a line at each quarter (for long single jobs like an evaluation).
    """
    if enabled and interactive():
        if _in_notebook():
            from tqdm.auto import tqdm as auto_tqdm
            return auto_tqdm(total=total, desc=desc, **kwargs)
        return tqdm(total=total, desc=desc, dynamic_ncols=True, **kwargs)
    return _Lines(total, desc, report and enabled)


def write(message: str, enabled: bool = True, file=None) -> None:
    """A line of progress (on stdout unless `file`) that does not break a bar being drawn."""
    if enabled:
        tqdm.write(message, file=file or sys.stdout)


def close_bars() -> None:
    """Close every bar still drawn (left behind by an interrupt), so that a message that follows
    starts on a line of its own."""
    for live in list(getattr(tqdm, "_instances", ())):
        live.close()
