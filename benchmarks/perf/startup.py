"""Where the wall time of a whole default `vaelab train` goes, phase by phase.

    python -m benchmarks.perf.startup [--device cuda] [--epochs 20] [--reps 3] [--out DIR]
    python -m benchmarks.perf.startup --baseline OLD_TREE --epochs 1 --reps 7 [--out DIR]

Runs its own file again in a fresh interpreter, with this checkout's vaelab on PYTHONPATH (so
that the imports are cold, as on the command line), which does what `vaelab train` does, in the
same order, with a clock between the phases: the imports, the device's first touch, reading
MNIST, build (model, optimizer, data on the device, the test set's draws), fit (the epochs as
metrics.jsonl records them, the first one's warm-up and capture included, and the rest:
checkpoints and the run folder's files), the figures (matplotlib's import included). The outer
process times the whole child, so interpreter start and exit appear too. Medians over --reps
runs; with --out, writes startup_<device>.json and .md there, naming the machine.

With --baseline, the children alternate between OLD_TREE's vaelab (another checkout, on
PYTHONPATH) and this one's, and the start-up (everything before the first epoch, interpreter
start included) is compared pair by pair (startup_vs_baseline_<device>.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The checkout. Not from benchmarks.lib: the timed child imports nothing before its clock starts.
REPO = Path(__file__).resolve().parents[2]


def phases(device: str, epochs: int, run_dir: Path) -> dict:
    """The default run, phase by phase, in this process: seconds per phase."""
    clock = [time.perf_counter()]
    out: dict[str, float] = {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        out[name] = clock[-1] - clock[-2]

    import torch
    import vaelab.cli  # noqa: F401  (what `python -m vaelab` imports before parsing)
    from vaelab.config import RunConfig
    from vaelab.data import load_data
    from vaelab.distributed import pick_device
    from vaelab.train import build, fit
    lap("imports")
    vaelab.cli.build_parser().parse_args(["train", "--epochs", str(epochs), "--device", device])
    lap("parse")
    config = RunConfig(epochs=epochs, device=device)
    resolved = pick_device(config.device)
    torch.zeros(1, device=resolved)
    if resolved.type == "cuda":
        torch.cuda.synchronize()
    lap("device")
    data = load_data(config.data_dir, progress=False, **config.data_options())
    lap("data")
    training = build(config, data, progress=False)
    lap("build")
    result = fit(training, run_dir, progress=False)
    lap("fit")
    out["epochs"] = sum(m["seconds"] for m in result.metrics)
    out["fit_besides_epochs"] = out["fit"] - out["epochs"]
    from vaelab.plots import draw_figures
    draw_figures(run_dir, result.model, result.data, result.metrics)
    lap("figures")
    out["in_process"] = clock[-1] - clock[0]
    out["test_loss"] = result.metrics[-1]["test_loss"]
    return out


STARTUP = ("imports", "parse", "device", "data", "build")  # before the first epoch


def timed_child(device: str, epochs: int, tree: Path | None = None) -> dict:
    """One default run in a fresh interpreter (with tree's vaelab, by default this checkout's):
    its phases, and the wall time around it."""
    env = {**os.environ, "PYTHONPATH": str(tree or REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--device", device, "--epochs", str(epochs),
                                "--child", str(Path(tmp) / "run")], check=True, capture_output=True, text=True,
                               env=env)
        wall = time.perf_counter() - start
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["interpreter_start_and_exit"] = wall - result["in_process"]
    result["startup"] = sum(result[k] for k in STARTUP)
    return result


def against_baseline(args) -> int:
    """Alternate the baseline tree's children with this tree's; paired medians and ratios."""
    import torch
    from benchmarks.lib.machine import cpu_description, write_results

    pairs = [(timed_child(args.device, args.epochs, args.baseline),
              timed_child(args.device, args.epochs, REPO)) for _ in range(args.reps)]
    keys = ("startup", *STARTUP, "interpreter_start_and_exit")
    median = {side: {k: statistics.median(p[i][k] for p in pairs) for k in keys}
              for i, side in enumerate(("baseline", "this"))}
    ratio = statistics.median(b["startup"] / a["startup"] for a, b in pairs)
    summary = {"median": median, "startup_ratio": ratio}
    print(json.dumps(summary))
    if args.out:
        host = (f"{cpu_description()}, {torch.get_num_threads()} torch threads, PyTorch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d')}")
        table = (f"Host: {host}. Start-up of a default `vaelab train`: what comes before its first epoch "
                 f"(imports, the command line parsed, the device, MNIST, build); interpreter start and exit "
                 f"apart. {args.reps} alternating pairs, medians; baseline: {args.baseline.name}.\n\n"
                 "| phase | baseline s | this s |\n| --- | --- | --- |\n"
                 + "".join(f"| {k} | {median['baseline'][k]:.3f} | {median['this'][k]:.3f} |\n" for k in keys)
                 + f"\nStart-up, this over baseline (median of the pairs' ratios): {ratio:.3f}.\n")
        write_results(args.out, f"startup_vs_baseline_{args.device}", {"host": host, "pairs": pairs, **summary},
                      table)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write startup_<device>.json and .md here")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare start-up with")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the timed run's folder
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(phases(args.device, args.epochs, args.child)))
        return 0
    if args.baseline:
        return against_baseline(args)
    runs = [timed_child(args.device, args.epochs) for _ in range(args.reps)]
    median = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    print(json.dumps(median))
    if args.out:
        import torch
        from benchmarks.lib.machine import cpu_description, write_results

        cuda = args.device != "cpu" and torch.cuda.is_available()
        host = (f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}" if cuda
                else f"{cpu_description()}, {torch.get_num_threads()} torch threads, PyTorch {torch.__version__}")
        rows = [("imports (torch, vaelab)", "imports"), ("the command line parsed", "parse"),
                ("device's first touch", "device"), ("reading MNIST", "data"),
                ("build (includes TorchDynamo's import by torch.optim)", "build"),
                (f"{args.epochs} epochs (metrics.jsonl's seconds)", "epochs"),
                ("fit besides the epochs (checkpoints, run folder)", "fit_besides_epochs"),
                ("figures (matplotlib's import included)", "figures"),
                ("interpreter start and exit", "interpreter_start_and_exit"), ("whole run, wall", "wall")]
        table = (f"Host: {host}. A default `vaelab train` ({args.epochs} epochs, figures included), phase by "
                 f"phase; medians of {args.reps} runs.\n\n| phase | s |\n| --- | --- |\n"
                 + "".join(f"| {label} | {median[key]:.2f} |\n" for label, key in rows)
                 + f"\nTest negative ELBO: {median['test_loss']:.2f} nats.\n")
        name = "startup_cuda" if cuda else "startup_cpu"
        write_results(args.out, name, {"host": host, "runs": runs, "median": median}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
