"""One dataclass describes a run; it is saved beside the run as config.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .data import check_folder_options
from .errors import VaelabError
from .models import ModelConfig

OPTIMIZERS = ("sgd", "adam")
OBJECTIVES = ("elbo", "iwae")
SCHEDULES = ("constant", "burda")
DEVICES = ("auto", "cpu", "cuda")
# Options of earlier versions that chose among training paths now gone; a saved
# config.json that names them still loads, and they are ignored.
RETIRED = ("backward", "kernels")


@dataclass
class RunConfig:
    """A training run. The defaults are the tutorial's recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = "tutorial"
    objective: str = "elbo"      # or "iwae", the importance-weighted bound
    samples: int = 1             # L, Monte-Carlo samples of z per example (elbo)
    k: int = 5                   # importance samples per example (iwae)
    optimizer: str = "sgd"
    lr: float = 5e-3
    # "burda": the schedule of Burda et al. (2015): lr * 10^(-i/7) for 3^i epochs, i = 0, 1, ...
    schedule: str = "constant"
    # KL weight of the training objective (beta-VAE), reached linearly step by step over the
    # first kl_warmup epochs (0: from the start). The test loss always uses weight 1.
    beta: float = 1.0
    kl_warmup: int = 0
    batch_size: int = 100
    epochs: int = 20
    seed: int = 0
    device: str = "auto"
    # On CUDA, capture the training step once as a graph and replay it (off: every op launched).
    cuda_graph: bool = True
    # On CUDA, deterministic cuBLAS and kernels (set before CUDA starts): a resumed run is then
    # bitwise the uninterrupted one on the same card. The CPU is deterministic anyway.
    deterministic: bool = False
    data_dir: str | None = None  # None: $VAELAB_DATA_DIR, then the cache
    # Image folders only: resize every image to image_size x image_size; without train/ and test/
    # subfolders, hold out test_fraction of the images, chosen by split_seed (not --seed, so that
    # runs with different seeds share one test set).
    image_size: int | None = None
    test_fraction: float = 0.1
    split_seed: int = 0
    train_size: int | None = None  # use only the first N training images
    test_size: int | None = None
    eval_seed: int = 1234        # fixes the test set's binarization and noise

    def validate(self) -> None:
        """Raise VaelabError naming the first option that makes no sense."""
        self.model.validate()
        for name in ("epochs", "batch_size", "samples", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise VaelabError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VaelabError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        check_folder_options(**self.data_options())
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise VaelabError(f"--beta must be a number >= 0, got {self.beta}")
        if not isinstance(self.kl_warmup, int) or self.kl_warmup < 0:
            raise VaelabError(f"--kl-warmup must be a whole number of epochs >= 0, got {self.kl_warmup}")
        if self.objective == "iwae" and (self.beta != 1 or self.kl_warmup):
            raise VaelabError("--beta and --kl-warmup weight the ELBO's KL term, which the iwae bound does not "
                              "have; leave them out with --objective iwae")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise VaelabError(f"--lr must be a positive number, got {self.lr}")
        if self.objective not in OBJECTIVES:
            raise VaelabError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.schedule not in SCHEDULES:
            raise VaelabError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise VaelabError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise VaelabError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def data_options(self) -> dict:
        """What load_data needs besides the folder."""
        return dict(image_size=self.image_size, test_fraction=self.test_fraction, split_seed=self.split_seed)

    @property
    def weighted(self) -> bool:
        """Whether training optimizes another objective than the plain ELBO or IWAE bound."""
        return self.beta != 1 or self.kl_warmup > 0

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch (1-based) under the schedule."""
        if self.schedule == "constant":
            return self.lr
        stage, end = 0, 1  # stage i covers 3^i epochs
        while epoch > end:
            stage += 1
            end += 3 ** stage
        return self.lr * 10 ** (-stage / 7)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The inverse of to_dict; missing keys take their defaults, retired ones are ignored."""
        d = {k: v for k, v in d.items() if k not in RETIRED}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VaelabError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        model = d.get("model", {})
        model_known = {f.name for f in fields(ModelConfig)} | {"x_dim"}
        if set(model) - model_known:
            raise VaelabError(f"model config has unknown keys: {', '.join(sorted(set(model) - model_known))}")
        return cls(**{**d, "model": ModelConfig.from_dict(model)})
