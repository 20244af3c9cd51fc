"""What `fit` calls around the epochs: trackers (TensorBoard, MLflow), progress, your own.

A callback is a `Callback`, or a plain function `f(record, training)`, which is taken as its
`on_epoch_end`. `fit` calls them on rank 0 only, in the order given:

- `on_fit_start(training, run_dir)`: before the first epoch trained here (run_dir may be None);
- `on_epoch_end(record, training)`: after each epoch, its checkpoint written; `record` is the
  epoch's line of metrics.jsonl (a copy: changing it changes nothing). Returning True stops the
  run cleanly after this epoch: what was trained is saved, and `--resume` goes on from it;
- `on_fit_end(result)`: after the last epoch, or after a stop, with fit's TrainResult; also
  when training ends by an error, then with None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


class Callback:
    """Base of the callbacks: every method does nothing."""

    def on_fit_start(self, training: Any, run_dir: Path | None) -> None:
        """training: train.Training, the resolved config in training.config."""

    def on_epoch_end(self, record: dict, training: Any) -> bool | None:
        """True stops the run after this epoch."""
        return None

    def on_fit_end(self, result: Any) -> None:
        """result: train.TrainResult, or None when training ended by an error."""


class EpochFunction(Callback):
    """A plain function f(record, training) as a callback."""

    def __init__(self, function: Callable[[dict, Any], bool | None]):
        self.function = function

    def on_epoch_end(self, record: dict, training: Any) -> bool | None:
        return self.function(record, training)


def as_callbacks(callbacks) -> list[Callback]:
    """A list of Callbacks from Callbacks and plain functions (None: none)."""
    out = []
    for c in callbacks or ():
        if isinstance(c, Callback):
            out.append(c)
        elif callable(c):
            out.append(EpochFunction(c))
        else:
            raise TypeError(f"a callback is a vaelab.callbacks.Callback or a function "
                            f"f(record, training), not {type(c).__name__}")
    return out
