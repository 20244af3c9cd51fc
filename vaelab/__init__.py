"""vaelab: variational autoencoders on MNIST or your own images, trained, evaluated and shown."""

from . import cpu, rng

cpu.settle_vector_maths()  # before any of vaelab's maths runs threaded

from .config import RunConfig
from .data import Dataset, load_data
from .errors import DataError, RunError, VaelabError
from .models import VAE, ConditionalVAE, ModelConfig, build_model, preset
from . import topdown, vq  # noqa: F401  (register the topdown and vq-vae families)
from .runs import load_run
from .train import build, fit, train

__all__ = ["RunConfig", "Dataset", "load_data", "DataError", "RunError", "VaelabError", "VAE",
           "ConditionalVAE", "ModelConfig", "build_model", "preset", "load_run", "build", "fit",
           "train", "rng"]
__version__ = "0.1.0"
