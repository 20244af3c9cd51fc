"""Every option of vaelab, declared once, and the rule that resolves a run's effective options.

An option is a dataclass field made by `option(...)`: its type (the annotation), default, help
text, choices and rule live there and nowhere else. From the declarations come

- the command line's flags (cli.py), spelled `--name-with-dashes`;
- what `--resume` may change (`resume=True`);
- the one-line errors of `check` (the same from Python and from the command line).

The choices of a component (likelihood, prior, posterior, objective, activation, preset) are the
registry of its own module (registry.Registry), read when they are checked or listed: a plugin's
names count. This module imports those registries; none of them imports it.

The option dataclasses are frozen values that remember which fields their caller gave
(`explicit`); a copy with some changed is `replace(...)`. A run's effective options follow one
precedence rule, applied by `resolve` (which `train.build` calls once it knows the images), highest
first:

    1. what the caller set explicitly;
    2. the likelihood's recommended training options (likelihoods.Likelihood.recommended);
    3. the preset (presets.PRESETS);
    4. the dataclass default.

The resolved config is what config.json records; every field of it counts as set, as every field
of `RunConfig.from_dict` does, so a saved run loads to exactly its recorded fields and is never
re-preset. (`dataclasses.replace` passes every field to the constructor, so its copy counts all of
them as set: use `replace`.)
"""

from __future__ import annotations

import math
import os
import numbers
from collections import ChainMap
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from . import likelihoods
from .errors import VaelabError
from .families import FAMILIES
from .nets import ACTIVATIONS
from .objectives import ESTIMATORS, OBJECTIVES
from .posteriors import POSTERIORS
from .presets import PRESETS
from .priors import PRIORS

# --- declaring options ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What a value must be: `test(value)` is True for a good one; `says` completes
    "--flag ... , got value" in the error."""

    test: Callable[[Any], bool]
    says: str


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


INTEGER = Rule(_integer, "must be an integer")
POSITIVE = Rule(lambda v: _integer(v) and v >= 1, "must be a positive integer")
WHOLE = Rule(lambda v: _integer(v) and v >= 0, "must be a whole number >= 0")
EPOCHS = Rule(WHOLE.test, "must be a whole number of epochs >= 0")
PIXELS = Rule(POSITIVE.test, "must be a positive whole number of pixels")
POSITIVE_NUMBER = Rule(lambda v: _real(v) and v > 0, "must be a positive number")
NUMBER_AT_LEAST_0 = Rule(lambda v: _real(v) and v >= 0, "must be a number >= 0")
FRACTION = Rule(
    lambda v: _real(v) and 0 < v < 1, "must be a number between 0 and 1 (both excluded)"
)
SIZES = Rule(
    lambda v: isinstance(v, tuple) and len(v) > 0 and all(POSITIVE.test(s) for s in v),
    "must be positive integers",
)
SWITCH = Rule(lambda v: isinstance(v, bool), "must be true or false")
PATH = Rule(lambda v: isinstance(v, (str, os.PathLike)), "must be a path")
MODULES = Rule(
    lambda v: isinstance(v, tuple) and all(isinstance(s, str) and s.strip() for s in v),
    "must be module names",
)


def listed(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: Any = None,
    rule: Rule | None = None,
    flag: str | None = None,
    short: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    default_text: str | Callable[[], str] | None = None,
    values: dict | None = None,
    resume: bool = False,
    positional: bool = False,
    command_line: bool = True,
) -> Any:
    """A declared option: a dataclass field whose metadata says everything about it.

    choices: the allowed values, a tuple or a registry (read when used, so names registered
    later count); rule: what the value must be (None passes for an option whose default is None);
    flag / short: its spellings (default `--name-with-dashes`); metavar and default_text: what
    --help shows (default_text may be a function, called when help is shown); aliases: other
    spellings the command line also accepts; values: the command line's words for the values
    ({"on": True, "off": False}); resume: whether `vaelab train --resume` may change it;
    positional: a command-line argument without a flag; command_line=False: set from Python and
    config.json only.
    """
    meta = dict(
        help=help,
        choices=choices,
        rule=rule,
        flag=flag,
        short=short,
        aliases=aliases,
        metavar=metavar,
        default_text=default_text,
        values=values,
        resume=resume,
        positional=positional,
        command_line=command_line,
    )
    if isinstance(default, (list, dict, set)):
        raise TypeError("an option's default must be immutable (a tuple, not a list)")
    return field(default=default, metadata={"option": meta})


def declared(fields_of) -> list:
    """The fields of an option dataclass (or instance) that are options, in order."""
    return [f for f in fields(fields_of) if "option" in f.metadata]


def flag_of(f) -> str:
    """How an option is spelled on the command line."""
    return f.metadata["option"]["flag"] or "--" + f.name.replace("_", "-")


def check_value(f, value) -> None:
    """Raise VaelabError when `value` breaks field f's declaration."""
    meta = f.metadata["option"]
    if value is None and f.default is None:
        return
    choices = meta["choices"]
    if choices is not None and value not in choices:
        raise VaelabError(
            f"unknown {f.name.replace('_', ' ')} {value!r}; "
            f"choose one of {', '.join(map(str, choices))}"
        )
    rule = meta["rule"]
    if rule is not None and not rule.test(value):
        raise VaelabError(f"{flag_of(f)} {rule.says}, got {value!r}")


def check(options, skip: tuple[str, ...] = ()) -> None:
    """Check every declared option of a dataclass instance, but those named in skip; the first
    bad one raises."""
    for f in declared(options):
        if f.name not in skip:
            check_value(f, getattr(options, f.name))


def check_option(cls, name: str, value) -> None:
    """Check one value against option `name` of the option dataclass cls."""
    check_value(cls.__dataclass_fields__[name], value)


class Options:
    """Base of the option dataclasses (made with @options_dataclass): frozen values that know
    which fields their caller gave (`explicit`), each value in its stored form (`normal`)."""

    def __new__(cls, /, **given):
        self = super().__new__(cls)
        # The keys the caller gave, before the generated __init__ runs; not a field, so neither
        # compared nor written to config.json. Copies and pickles carry it in __dict__.
        self.__dict__["_given"] = frozenset(given)
        return self

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            stored = self.normal(f.name, value)
            if stored is not value:  # a list from JSON as a tuple, say; frozen: set it once here
                object.__setattr__(self, f.name, stored)

    def normal(self, name: str, value):
        """The stored form of a value given for field `name`; a value that has none is kept,
        for its rule to refuse."""
        return value

    def replace(self, **changes):
        """A copy with `changes` set (and counted as set); the other fields keep whether they
        were."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no option {', '.join(sorted(unknown))}")
        return type(self)(**{**given_values(self), **changes})


def options_dataclass(cls):
    """The decorator of an option dataclass, a subclass of Options: frozen, keywords only."""
    return dataclass(frozen=True, kw_only=True)(cls)


def explicit(options: Options) -> frozenset[str]:
    """The fields the caller gave (to the constructor, to `replace` or to `from_dict`)."""
    return options.__dict__["_given"]


def given_values(options: Options) -> dict:
    """The fields the caller gave, with their values."""
    return {name: getattr(options, name) for name in explicit(options)}


def defaults(cls) -> dict:
    """Every field's default value, by name (a factory's product for a nested dataclass)."""
    return {f.name: f.default_factory() if f.default is MISSING else f.default
            for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}


# --- the model ---------------------------------------------------------------------------------

# "custom": your own encoder and decoder modules (models.VAE), which config.json cannot hold.
CUSTOM = "custom"
ARCHITECTURES = ("mlp", "conv", CUSTOM)
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "burda")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# The seed of the test images' binarization and noise: a run's test losses, `vaelab evaluate`
# and the other commands on a run use it by default, so their numbers pair up across runs.
EVAL_SEED = 1234
ON_OFF = {"on": True, "off": False}

INITS = ("torch", "glorot")
SKIP_LIMIT = 0.5  # an epoch that skips more of its steps than this share stops the run
OUTPUT_INITS = ("data", "none")
KL_ESTIMATES = ("analytic", "sampled")


def _default_with_recommendations(name: str, default: Any) -> str:
    """--help's default of training option `name`: the dataclass default, then what the
    likelihoods and presets that set it give instead."""
    by_value: dict = {}
    for likelihood, kind in likelihoods.LIKELIHOODS.items():
        if name in kind.recommended:
            where = f" {kind.recommended_where}" if kind.recommended_where else ""
            by_value.setdefault(kind.recommended[name], []).append(
                f"--likelihood {likelihood}{where}")
    for preset_name, values in PRESETS.items():
        if name in values:
            by_value.setdefault(values[name], []).append(f"--preset {preset_name}")
    others = [f"{value} with {listed(sources)}" for value, sources in by_value.items()]
    return "; ".join([str(default), *others])


# The model's fields that hold sizes: tuples, which JSON gives as lists.
SHAPES = ("encoder_hidden", "decoder_hidden", "conv_channels", "image_shape", "upper_z_dims",
          "upper_hidden", "blocks")


@options_dataclass
class ModelConfig(Options):
    """Everything needed to rebuild a model from its weights. Keywords only; copy with `replace`."""

    z_dim: int = option(2, "latent dimensions", rule=POSITIVE, default_text="the preset's")
    encoder_hidden: tuple[int, ...] = option(
        (256, 128), "encoder hidden sizes", rule=SIZES, metavar="H1,H2", default_text="the preset's"
    )
    decoder_hidden: tuple[int, ...] = option(
        (128, 256), "decoder hidden sizes", rule=SIZES, metavar="H1,H2", default_text="the preset's"
    )
    activation: str = option(
        "relu", "hidden activation", choices=ACTIVATIONS, default_text="the preset's"
    )
    likelihood: str = option(
        "bernoulli",
        "observation model: bernoulli on binarized pixels, gaussian on grey levels with fixed"
        " standard deviation --sigma, gaussian-learned with a standard deviation per pixel from the"
        " decoder (on dequantized grey levels), logistic: a discretized logistic over the 256"
        " grey levels, or logistic-mixture: a mixture of --mixture-components of them per pixel,"
        " the colours of RGB images coupled within a pixel (PixelCNN++)",
        choices=likelihoods.LIKELIHOODS,
    )
    # 10: PixelCNN++'s (Salimans et al. 2017) mixture size.
    mixture_components: int = option(
        10, "logistics per pixel of --likelihood logistic-mixture", rule=POSITIVE, metavar="K")
    # x ~ N(sigmoid(out), sigma^2 I) on grey levels in [0, 1]; fixed, not learned.
    sigma: float = option(
        0.1, "standard deviation of the gaussian likelihood", rule=POSITIVE_NUMBER
    )
    # Known once the data is: (C, H, W).
    image_shape: tuple[int, int, int] = (1, 28, 28)
    # "mlp": encoder_hidden and decoder_hidden are the layers on the flattened image. "conv": the
    # convolutions' channels (each halves H and W), then the dense layers encoder_hidden and
    # decoder_hidden. "custom": your own modules (models.VAE), encoder_hidden their feature size.
    architecture: str = option("mlp", choices=ARCHITECTURES, command_line=False)
    conv_channels: tuple[int, ...] = option(
        (),
        "with --preset conv: channels of the convolutions, each halving height and width",
        metavar="C1,C2",
        default_text="the preset's, 32,64",
    )
    prior: str = option(
        "standard",
        "p(z): standard, N(0, I) (the KL analytic unless --kl sampled); mog, a mixture of"
        " --prior-components learned Gaussians with learned weights; vamp, the VampPrior: the"
        " posterior at --prior-components learned pseudo-inputs (Tomczak & Welling 2018; with"
        " --posterior iaf, the mixture of the base Gaussians q_0(z|u_k) before the flow);"
        " per-class, a learned Gaussian p(z|y) for each class of a --conditional model;"
        " mog and vamp take the KL from the draws",
        choices=PRIORS,
    )
    # The VampPrior paper's K for MNIST; with it every step also encodes 500 pseudo-inputs.
    prior_components: int = option(
        500, "components of --prior mog or vamp", rule=POSITIVE, metavar="K"
    )
    posterior: str = option(
        "gaussian",
        "q(z|x): gaussian, a diagonal Gaussian; iaf, an inverse autoregressive flow of --flow-steps"
        " MADE steps from it, conditioned on a context from the encoder (Kingma et al. 2016)",
        choices=POSTERIORS,
    )
    flow_steps: int = option(
        2, "autoregressive steps of --posterior iaf", rule=POSITIVE, metavar="T"
    )
    kl: str = option(
        "analytic",
        "the KL term of the ELBO: analytic, the closed form where q(z|x) and p(z) have one (a"
        " Gaussian posterior, N(0, I) and one stochastic layer), else from the draws; sampled,"
        " always log q(z|x) - log p(z) at the draws (Burda et al.'s and the VampPrior's code)",
        choices=KL_ESTIMATES,
        default_text="analytic; the preset's",
    )
    # Checked in validate: () is one stochastic layer.
    upper_z_dims: tuple[int, ...] = option(
        (),
        "sizes of stochastic layers z_2, ..., z_L above z_1 (--z-dim), inferred bottom-up and"
        " generated top-down (Burda et al. 2015)",
        metavar="D2,D3",
        default_text="none, one layer; the preset's",
    )
    upper_hidden: tuple[int, ...] = option(
        (100, 100),
        "hidden sizes of the MLPs of q(z_l+1|z_l) and p(z_l|z_l+1) between stochastic layers",
        rule=SIZES,
        metavar="H1,H2",
    )
    conditional: bool = option(
        False,
        "a conditional VAE (Sohn et al. 2015): q(z|x, y) and p(x|z, y) read each image's label y"
        " (IDX labels, class folders, or y_train and y_test in an .npz), and --prior per-class"
        " makes p(z|y) a learned Gaussian per class; evaluate then reports log p(x|y)",
        rule=SWITCH,
    )
    # Known once the data is: a conditional model's class names, label i the i-th ("0", "1", ...
    # where the data names none). () for an unconditional model.
    classes: tuple[str, ...] = ()
    family: str = option(
        "vae",
        "the model: vae, a VAE with continuous latents; vq-vae, a grid of discrete codes from a"
        " conv encoder and a codebook of --codebook-size vectors (van den Oord et al. 2017), whose"
        " prior over codes `vaelab train-prior` learns afterwards; topdown, a deep hierarchy of"
        " Gaussian layers inferred top-down along the generative path (VDVAE, Child 2021)",
        choices=FAMILIES, flag="--model", default_text="vae; the preset's",
    )
    codebook_size: int = option(
        512, "--model vq-vae: the codebook's vectors K", rule=POSITIVE, metavar="K")
    commitment: float = option(
        0.25, "--model vq-vae: the commitment loss's weight beta, pulling the encoder's outputs to"
        " their codes (a training term only, outside the bound)", rule=NUMBER_AT_LEAST_0,
        metavar="BETA")
    codebook_decay: float = option(
        0.99, "--model vq-vae: the decay of the codebook's exponential moving averages",
        rule=FRACTION)
    width: int = option(
        32, "--model topdown: channels of the hierarchy's residual stream", rule=POSITIVE,
        default_text="32; the preset's")
    blocks: tuple[int, ...] = option(
        (1, 2, 2, 1),
        "--model topdown: stochastic layers at each resolution, the top's (1x1) first, then each"
        " doubling up to the image's (28x28: 1, 7, 14, 28; 32x32: 1, 4, 8, 16, 32), of --z-dim"
        " channels each; the encoder has as many residual blocks at each",
        rule=SIZES, metavar="B1,B2", default_text="1,2,2,1; the preset's")

    def normal(self, name: str, value):
        # JSON gives lists; the runs saved before (C, H, W) stored (H, W)
        if name == "classes" and _integer(value):  # a count: the classes 0, 1, ...
            value = tuple(map(str, range(value)))
        if name in (*SHAPES, "classes") and isinstance(value, list):
            value = tuple(value)
        if name == "image_shape" and isinstance(value, tuple) and len(value) == 2:
            value = (1, *value)
        return value

    @property
    def x_dim(self) -> int:
        """Values per image, C * H * W."""
        c, h, w = self.image_shape
        return c * h * w

    def validate(self) -> None:
        """Raise VaelabError naming the first option that makes no sense."""
        # Your own networks: encoder_hidden records their feature size, the rest is not theirs.
        check(self, ("decoder_hidden", "activation") if self.architecture == CUSTOM else ())
        if not (len(self.image_shape) == 3 and all(POSITIVE.test(s) for s in self.image_shape)):
            raise VaelabError(
                f"image_shape must be three positive sizes (C, H, W), got {self.image_shape}"
            )
        if self.architecture == "conv" and not SIZES.test(self.conv_channels):
            raise VaelabError(
                f"{flag_for('conv_channels')} {SIZES.says}, got {self.conv_channels!r}"
            )
        if self.upper_z_dims:
            if not SIZES.test(self.upper_z_dims):
                raise VaelabError(f"--upper-z-dims {SIZES.says}, got {self.upper_z_dims!r}")
            for option, value, other in (
                ("prior", "vamp",
                 "its pseudo-inputs' q(z_L|u) has no closed form in a bottom-up hierarchy"),
                ("posterior", "iaf", "the flow is for one stochastic layer"),
            ):
                if getattr(self, option) == value:
                    raise VaelabError(
                        f"--{option} {value} does not go with --upper-z-dims: {other}")
        if not (isinstance(self.classes, tuple) and all(isinstance(c, str) for c in self.classes)):
            raise VaelabError(f"classes must be the class names, got {self.classes!r}")
        if self.conditional and self.upper_z_dims:
            raise VaelabError("--conditional does not go with --upper-z-dims: the layers above z_1"
                              " do not read the labels")
        why = PRIORS[self.prior].refuses(self)
        if why:
            raise VaelabError(f"--prior {self.prior} {why}")
        if self.architecture != "conv" and self.conv_channels:
            raise VaelabError(
                "--conv-channels sets the convolutions of --preset conv; an MLP has none"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of to_dict, every field counted as set; runs saved before (C, H, W) also
        stored x_dim, which follows from image_shape."""
        d = {k: v for k, v in d.items() if k != "x_dim"}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise VaelabError(f"model config has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**{**defaults(cls), **d})


# --- a training run ----------------------------------------------------------------------------

# Options of earlier versions that chose among training paths now gone; a saved
# config.json that names them still loads, and they are ignored.
RETIRED = ("backward", "kernels")
# Options added since, with the value a config.json written before them meant.
ABSENT = {"output_init": "none"}
DATA_DIR_HELP = (
    "the four IDX files' folder, a folder of PNG or JPEG images (classes in subfolders, "
    "optionally below train/ and test/) or a .npz file with x_train and x_test"
)
DATA_DIR_DEFAULT = "$VAELAB_DATA_DIR, then ~/.cache/vaelab/mnist"


# --- the options that several commands share: one declaration each ---------------------------
# A factory, as a dataclass field belongs to one class; what differs between commands (a default,
# a help text) is its argument.

RUN_HELP = "run directory"
RUN_DATA_HELP = (
    "the four IDX files' folder, a folder of images or a .npz file (default: the one the run "
    "was trained on when it named one, else $VAELAB_DATA_DIR, then ~/.cache/vaelab/mnist)"
)


def run_option(metavar: str | None = None) -> Any:
    """The run directory a command reads: its first positional argument."""
    return option(MISSING, RUN_HELP, positional=True, metavar=metavar)


def data_dir_option(training: bool = False) -> Any:
    """`--data-dir`: the images a run trains on (training), else those a command on a saved run
    reads instead of the run's own."""
    if training:
        return option(None, DATA_DIR_HELP, default_text=DATA_DIR_DEFAULT, rule=PATH, resume=True)
    return option(None, RUN_DATA_HELP, rule=PATH)


def device_option(resume: bool = False) -> Any:
    """`--device`: where the work runs."""
    return option("auto", "where to compute: auto, a CUDA GPU where there is one, else the CPU",
                  choices=DEVICES, resume=resume)


def seed_option(default: int = EVAL_SEED, help: str = "fixes binarization and noise") -> Any:
    """`--seed`. Its default differs by what it seeds: a run's weights, batches and noise (0);
    the test images' binarization and noise (EVAL_SEED, the run's own test set's draws, so that
    the commands on runs pair up); the draws of z of `vaelab sample` (0)."""
    return option(default, help, rule=INTEGER)


def quiet_option() -> Any:
    """`--quiet`: nothing on the terminal but errors."""
    return option(False, "print nothing but errors: no progress, no summary", rule=SWITCH)


def mlflow_option(help: str) -> Any:
    """`--mlflow URI`: an MLflow tracking server or folder to log to (the `mlflow` extra)."""
    return option(None, f"{help}, e.g. file:./mlruns; needs pip install 'vaelab[mlflow]'",
                  metavar="URI", rule=Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                                           "must be a tracking URI"))


# What image folders may be converted to, and the backgrounds transparency may be flattened onto.
CHANNELS = ("grey", "rgb")
BACKGROUNDS = ("white", "black")


def image_size_option(default_text: str = "keep the size; all must agree") -> Any:
    """Image folders: the side every image is resized to."""
    return option(None, "image folders: resize every image to S x S pixels", metavar="S",
                  rule=PIXELS, default_text=default_text)


def channels_option(default_text: str = "keep the kind; all must agree") -> Any:
    """Image folders: one kind for every image, grey or RGB."""
    return option(None, "image folders: convert every image to grey (1 channel, ITU-R 601 luma) or"
                  " rgb (3 channels), so that a folder mixing the two reads as one kind",
                  choices=CHANNELS, default_text=default_text)


def background_option(default_text: str = "none: transparent images are refused") -> Any:
    """Image folders: what transparent images are flattened onto."""
    return option(None, "image folders: flatten transparent images (RGBA, LA, a palette with"
                  " transparency) onto a white or black background", choices=BACKGROUNDS,
                  default_text=default_text)


def skip_bad_option(help_tail: str = "") -> Any:
    """Image folders: skip the files that cannot be read or do not fit, and list them."""
    return option(False, "image folders: skip every file that cannot be read or does not fit"
                  " (another size or kind than the first readable image, transparency, 16-bit"
                  " pixels) and list them all, with a count, in one report; without it the first"
                  " such file stops the read" + help_tail, rule=SWITCH)


def test_fraction_option(default: float | None, default_text: str | None = None) -> Any:
    """Image folders without train/ and test/: the fraction held out as the test set."""
    return option(default, "image folders without train/ and test/: hold out this fraction as the"
                  " test set", metavar="F", rule=FRACTION, default_text=default_text)


def split_seed_option(default: int | None, default_text: str | None = None) -> Any:
    """Image folders without train/ and test/: the seed of their split."""
    return option(default, "image folders without train/ and test/: seed of the train/test split,"
                  " apart from --seed so that runs with different seeds share one test set",
                  rule=WHOLE, default_text=default_text)


# The options that say how an image folder is read, besides its split.
FOLDER_OPTIONS = ("image_size", "channels", "background", "skip_bad")
# All that says how a folder is read and split: `vaelab encode` and `vaelab score` take them too,
# defaulting to the run's.
READ_OPTIONS = (*FOLDER_OPTIONS, "test_fraction", "split_seed")
# What train.build reads before the data, so before it resolves the run: the caller's values (or
# the defaults) alone, which no preset or likelihood may set.
CALLERS_ONLY = ("preset", "plugins", "data_dir", *READ_OPTIONS, "train_size", "test_size",
                "device", "deterministic")


@options_dataclass
class RunConfig(Options):
    """A training run. The defaults are the tutorial's recipe. Its fields are keywords; to change
    some in a copy, use `replace` (dataclasses.replace would count every field as set)."""

    preset: str = option("tutorial", "architecture preset", choices=PRESETS)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: str = option(
        "elbo", "elbo, or iwae: the importance-weighted bound of Burda et al.", choices=OBJECTIVES
    )
    estimator: str = option(
        "reparam",
        "the inference network's gradient: reparam, the objective's plain reparameterized"
        " gradient; stl, sticking the landing (Roeder et al. 2017: q's parameters held fixed in"
        " log q; unbiased for the ELBO, whose KL it takes from the draws; biased for iwae); dreg,"
        " the doubly reparameterized gradient of --objective iwae (Tucker et al. 2018, unbiased)."
        " Both need --posterior gaussian",
        choices=ESTIMATORS,
    )
    # KL weight of the training objective (beta-VAE), reached linearly step by step over the
    # first kl_warmup epochs (0: from the start). The test loss always uses weight 1.
    beta: float = option(
        1.0,
        "weight of the KL term in the training objective (beta-VAE); test_loss and "
        "evaluate stay the true negative ELBO and NLL",
        rule=NUMBER_AT_LEAST_0,
        default_text="1, the ELBO",
    )
    kl_warmup: int = option(
        0,
        "raise the KL weight linearly, step by step, from 0 to --beta over the first E epochs",
        rule=EPOCHS,
        metavar="E",
        default_text="0, no warm-up",
    )
    free_bits: float = option(
        0.0,
        "free bits (Kingma et al. 2016): each latent dimension's KL, averaged over the batch, costs"
        " at least LAMBDA nats in the training objective, so that a KL below it earns nothing"
        " (where q and p do not factorize over dimensions, the layer's KL costs at least LAMBDA"
        " x its size; a top-down hierarchy's, each layer's at least LAMBDA); test_loss and"
        " evaluate stay the true negative ELBO and NLL",
        rule=NUMBER_AT_LEAST_0,
        metavar="LAMBDA",
        default_text="0, off",
    )
    samples: int = option(
        1, "Monte-Carlo samples of z per image in the ELBO", rule=POSITIVE, metavar="L"
    )
    k: int = option(5, "importance samples per image for --objective iwae", rule=POSITIVE)
    # the default texts are read when help is shown: a plugin's likelihoods and presets count
    optimizer: str = option(
        "sgd", choices=OPTIMIZERS,
        default_text=lambda: _default_with_recommendations("optimizer", "sgd"),
    )
    lr: float = option(
        5e-3,
        "learning rate",
        rule=POSITIVE_NUMBER,
        default_text=lambda: _default_with_recommendations("lr", 5e-3),
    )
    # "burda": the schedule of Burda et al. (2015): lr * 10^(-i/7) for 3^i epochs, i = 0, 1, ...
    schedule: str = option(
        "constant",
        "learning rate schedule; burda: lr * 10^(-i/7) for 3^i epochs, "
        "i = 0, 1, ... (Burda et al. 2015; 3280 epochs for i up to 7)",
        choices=SCHEDULES,
    )
    adam_eps: float = option(
        1e-8, "Adam's epsilon (Burda et al.: 1e-4)", rule=POSITIVE_NUMBER,
        default_text="1e-08; the preset's",
    )
    init: str = option(
        "torch",
        "initial weights of the networks (encoder, head, decoder, the layers between"
        " stochastic layers): torch, PyTorch's; glorot, Glorot & Bengio's uniform with zero biases"
        " (Burda et al.)",
        choices=INITS,
        default_text="torch; the preset's",
    )
    output_init: str = option(
        "data",
        "the decoder's output bias: data, set from the training images (the likelihood's rule: the"
        " logit of each pixel's mean for bernoulli, the mean and spread of its grey levels for the"
        " others), as in Burda et al.'s code; none, the network's own initialisation",
        choices=OUTPUT_INITS,
        default_text="data; none with --preset tutorial",
    )
    batch_size: int = option(100, rule=POSITIVE)
    epochs: int = option(20, rule=POSITIVE, resume=True, default_text="20; the preset's")
    grad_clip: float | None = option(
        None,
        "scale each step's gradient down to this global norm where it is larger",
        rule=POSITIVE_NUMBER,
        metavar="NORM",
        default_text="no clipping",
        resume=True,
    )
    skip_threshold: float | None = option(
        None,
        "skip the update of a step whose gradient norm (before --grad-clip) is above NORM or not"
        " finite, as in VDVAE; metrics.jsonl counts the skips, and an epoch that skips more than"
        f" {SKIP_LIMIT:.0%} of its steps stops the run",
        rule=POSITIVE_NUMBER,
        metavar="NORM",
        default_text="skip none",
        resume=True,
    )
    ema: float = option(
        0.0,
        "keep an exponential moving average of the weights (VDVAE's), average = RATE * average"
        " + (1 - RATE) * weights after every update (RATE warmed up as (1 + t) / (10 + t) over the"
        " first updates t), and test, save, evaluate and sample with it; 0: none",
        rule=Rule(lambda v: _real(v) and 0 <= v < 1, "must be a number >= 0 and below 1"),
        metavar="RATE",
        default_text="0, none; the preset's",
    )
    seed: int = seed_option(0, "seed for weights, batches and noise")
    device: str = device_option(resume=True)
    cuda_graph: bool = option(
        True,
        "on CUDA, capture the training step as a graph and replay it",
        rule=SWITCH,
        values=ON_OFF,
        resume=True,
    )
    # Set before CUDA starts: a resumed run is then bitwise the uninterrupted one on the same card.
    deterministic: bool = option(
        False,
        "on CUDA, deterministic cuBLAS and kernels: a resumed run repeats an "
        "uninterrupted one bit for bit on the same card (a little slower)",
        rule=SWITCH,
    )
    data_dir: str | None = data_dir_option(training=True)
    # Image folders only. The split has its own seed: runs with different seeds share a test set.
    image_size: int | None = image_size_option()
    channels: str | None = channels_option()
    background: str | None = background_option()
    skip_bad: bool = skip_bad_option()
    test_fraction: float = test_fraction_option(0.1)
    split_seed: int = split_seed_option(0)
    train_size: int | None = option(
        None, "train on the first N training images only", metavar="N", rule=POSITIVE
    )
    test_size: int | None = option(
        None, "report the loss of the first N test images only", metavar="N", rule=POSITIVE
    )
    # Recorded, so that the commands that load the run (evaluate, --resume, score) import them.
    plugins: tuple[str, ...] = option(
        (),
        "import MODULE first, a module importable from the current folder or sys.path that"
        " registers components (likelihoods, priors, posteriors, objectives, activations,"
        " presets) for the other options to name; repeat it or separate modules by commas",
        flag="--plugin",
        metavar="MODULE",
        rule=MODULES,
        default_text="none",
    )
    eval_seed: int = EVAL_SEED  # fixes the test set's binarization and noise

    def normal(self, name: str, value):
        if name == "data_dir" and isinstance(value, os.PathLike):
            return os.fspath(value)
        if name == "plugins" and isinstance(value, (str, list)):  # one name; JSON's list
            return (value,) if isinstance(value, str) else tuple(value)
        return value

    def validate(self, processes: int = 1) -> None:
        """Raise VaelabError naming the first option of the resolved run that makes no sense,
        for training shared among `processes` (torchrun's world size)."""
        config = resolve(self)  # on the images of config.model.image_shape: no data is read
        config.model.validate()
        check(config)
        if config.batch_size % processes:
            raise VaelabError(f"--batch-size {config.batch_size} does not divide among {processes}"
                              f" processes; give a multiple of {processes}")
        OBJECTIVES[config.objective].check(config)  # the objective's own rules
        FAMILIES[config.model.family].check(config)  # the model family's

    def to_dict(self) -> dict:
        return asdict(self)

    def data_options(self) -> dict:
        """What load_data needs besides the folder."""
        return dict(test_fraction=self.test_fraction, split_seed=self.split_seed,
                    **{name: getattr(self, name) for name in FOLDER_OPTIONS})

    @property
    def weighted(self) -> bool:
        """Whether training optimizes another objective than the plain ELBO or IWAE bound."""
        return self.beta != 1 or self.kl_warmup > 0 or self.free_bits > 0

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch (1-based) under the schedule."""
        if self.schedule == "constant":
            return self.lr
        stage, end = 0, 1  # stage i covers 3^i epochs
        while epoch > end:
            stage += 1
            end += 3**stage
        return self.lr * 10 ** (-stage / 7)

    @classmethod
    def from_options(cls, options: dict, model_cls: type = ModelConfig) -> "RunConfig":
        """A config from flat option values (model fields among them), each counted as set."""
        model_names = {f.name for f in fields(model_cls)}
        model = model_cls(**{k: v for k, v in options.items() if k in model_names})
        return cls(model=model, **{k: v for k, v in options.items() if k not in model_names})

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The inverse of to_dict, every field counted as set (a saved run is never re-preset);
        missing keys take their defaults, retired ones are ignored."""
        d = {**ABSENT, **{k: v for k, v in d.items() if k not in RETIRED}}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise VaelabError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**{**defaults(cls), **d, "model": ModelConfig.from_dict(d.get("model", {}))})


def resolve(config: RunConfig, image_shape: tuple[int, int, int] | None = None) -> RunConfig:
    """The effective options of a run on images of shape image_shape (C, H, W; by default
    config.model's, which it then records): each option the caller did not set takes the
    likelihood's recommendation for such images, else the preset's value, else the default.
    A new config, every field counted as set (resolving it again changes nothing); `config` is
    left as it was. An unknown preset is a one-line VaelabError; `validate` checks the rest."""
    run_cls, model_cls = type(config), type(config.model)
    caller = {**given_values(config.model), **given_values(config)}
    caller.pop("model", None)  # its own fields are in caller
    default = ChainMap(defaults(model_cls), defaults(run_cls))
    name = ChainMap(caller, default)["preset"]
    chosen = PRESETS[name]
    likelihood = ChainMap(caller, chosen, default)["likelihood"]
    shape = tuple(config.model.image_shape if image_shape is None else image_shape)
    recommended = (likelihoods.recommended(likelihood, shape)
                   if likelihood in likelihoods.LIKELIHOODS else {})  # validate names it
    names = {f.name for f in fields(model_cls)} | {f.name for f in fields(run_cls)}
    settable = names - {"model", "image_shape", *CALLERS_ONLY}
    for source, what in ((chosen, f"preset {name!r}"), (recommended, f"likelihood {likelihood!r}")):
        if set(source) - settable:  # a plugin's, say: refused rather than ignored
            raise VaelabError(f"{what} sets {', '.join(sorted(set(source) - settable))}; a preset"
                              " or a likelihood sets options of the model and its training only")
    # The precedence rule, highest first; the images' shape is a fact of the data, not an option.
    effective = ChainMap({"image_shape": shape}, caller, recommended, chosen, default)
    return run_cls.from_options({name: effective[name] for name in names - {"model"}}, model_cls)


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset, with some fields set (None: the preset's)."""
    model = ModelConfig(**{k: v for k, v in overrides.items() if v is not None})
    return resolve(RunConfig(preset=name, model=model)).model


# --- the other commands ------------------------------------------------------------------------


def resumable(cls) -> list:
    """The fields of cls's options that `vaelab train --resume` may change."""
    return [f for f in declared(cls) if f.metadata["option"]["resume"]]


def flag_for(name: str) -> str:
    """The flag of option `name` of a run or its model."""
    for cls in (RunConfig, ModelConfig):
        if name in cls.__dataclass_fields__:
            return flag_of(cls.__dataclass_fields__[name])
    return "--" + name.replace("_", "-")


def precision_option() -> Any:
    """The decoder's arithmetic in importance sampling (evaluate, score). fp32 by default:
    "auto" would pick bf16 on some hosts and not others, so one command would decode differently
    from host to host."""
    return option(
        "fp32",
        "decoder arithmetic: fp32; bf16, faster where the CPU or GPU has native bf16 and within"
        " far less than the Monte-Carlo error of fp32's log p(x); auto, bf16 where it is native",
        choices=PRECISIONS,
    )


def label_option(what: str, default_text: str) -> Any:
    """`--label Y`: one class, by name or number, for a conditional run's `what`."""
    return option(None, f"a conditional run's class (its name, or its number 0, 1, ...) for {what}",
                  metavar="Y", rule=Rule(lambda v: isinstance(v, (str, int)), "must be a class"),
                  default_text=default_text)


def first_images_option(default: int | None, what: str, aliases: tuple[str, ...] = ()) -> Any:
    """`--images N`: the first N images only (evaluate, gap, encode, score)."""
    return option(default, f"the first N {what}", flag="--images", aliases=aliases, metavar="N",
                  rule=POSITIVE, default_text=None if default else "all")


@options_dataclass
class Launch(Options):
    """How `vaelab train` runs, apart from what it trains (not in config.json)."""

    out: str | None = option(
        None, "run directory (default: runs/<timestamp>); must not hold a run already", rule=PATH
    )
    resume: str | None = option(
        None,
        "continue RUN from its last finished epoch with its own config.json; "
        f"only {listed([flag_of(f) for f in resumable(RunConfig)])} may be given with it",
        metavar="RUN",
        rule=PATH,
    )
    tensorboard: str | None = option(
        None,
        "also write each epoch's losses, KL, learning rate, KL weight, reconstructions and samples"
        " as TensorBoard events into DIR (needs pip install 'vaelab[tensorboard]')",
        metavar="DIR",
        rule=PATH,
    )
    mlflow: str | None = mlflow_option(
        "log parameters, per-epoch metrics and artifacts to this MLflow tracking URI"
    )
    no_plots: bool = option(False, "skip drawing the figures", rule=SWITCH)
    quiet: bool = quiet_option()


@options_dataclass
class EvaluateOptions(Options):
    """`vaelab evaluate`: the test log-likelihood of a run by importance sampling."""

    run: str = run_option()
    k: int | None = option(
        None, "importance samples per test image", rule=POSITIVE,
        default_text="the model's: 5000, and 100 for --model topdown, whose every draw is a pass"
        " through its whole decoder")
    seed: int = seed_option()
    images: int | None = first_images_option(None, "test images only", aliases=("--test-size",))
    data_dir: str | None = data_dir_option()
    device: str = device_option()
    precision: str = precision_option()
    mlflow: str | None = mlflow_option(
        "also log the evaluation (eval.json, its numbers, the KL figure) into the run's MLflow"
        " run at this tracking URI (the one `vaelab train --mlflow` made, else a new one)"
    )
    quiet: bool = quiet_option()


@options_dataclass
class GapOptions(Options):
    """`vaelab gap`: the approximation and amortization gaps of a run (Cremer et al. 2018)."""

    run: str = run_option()
    images: int = first_images_option(1000, "test images")
    k: int = option(5000, "importance samples per image for log p(x) and the ELBOs", rule=POSITIVE)
    # A fixed budget, the same for every image: an image's result does not depend on the others.
    steps: int = option(1000, "Adam steps fitting each image's posterior", rule=POSITIVE)
    samples: int = option(
        10, "draws of z per image in each step's ELBO", rule=POSITIVE, metavar="S"
    )
    lr: float = option(1e-2, "Adam's learning rate for the fitted posteriors", rule=POSITIVE_NUMBER)
    seed: int = seed_option()
    data_dir: str | None = data_dir_option()
    device: str = device_option()
    quiet: bool = quiet_option()


SPLITS = ("train", "test", "all")
CODES_HELP = "file to write: FILE.npz, and the same values as FILE.csv beside it"


@options_dataclass
class RunImagesOptions(Options):
    """What `vaelab encode` and `vaelab score` share: a run, the images of a split, the output."""

    run: str = run_option()
    output: str = option(MISSING, CODES_HELP, short="-o", rule=PATH, metavar="FILE")
    data_dir: str | None = data_dir_option()
    split: str | None = option(
        None,
        "which of the data's images: train, test, or all (the test images first, so that theirs"
        " are the values of --split test and of `vaelab evaluate`)",
        choices=SPLITS,
        default_text="all for a folder of images or an .npz file, every image you brought; test for"
        " IDX files such as MNIST, whose test set is the benchmark that `vaelab evaluate` scores",
    )
    images: int | None = first_images_option(None, "images of the split only")
    image_size: int | None = image_size_option("the run's, from its config.json")
    channels: str | None = channels_option("the run's")
    background: str | None = background_option("the run's")
    skip_bad: bool = skip_bad_option(" (default: the run's)")
    test_fraction: float | None = test_fraction_option(None, "the run's")
    split_seed: int | None = split_seed_option(None, "the run's")
    label: str | None = label_option("every image", "the data's labels")
    seed: int = seed_option()
    device: str = device_option()
    force: bool = option(False, "overwrite the output files if they exist", rule=SWITCH)
    quiet: bool = quiet_option()


@options_dataclass
class EncodeOptions(RunImagesOptions):
    """`vaelab encode`: each image's latent code under a run's encoder."""

    draws: int = option(
        100,
        "keyed draws of z per image for E_q[z] of a flow posterior and of the upper layers",
        rule=POSITIVE,
        metavar="S",
    )


@options_dataclass
class ScoreOptions(RunImagesOptions):
    """`vaelab score`: each image's log p(x) under a run's model, by importance sampling."""

    k: int | None = option(None, "importance samples per image", rule=POSITIVE,
                           default_text="the model's, as evaluate's")
    precision: str = precision_option()


@options_dataclass
class CompareOptions(Options):
    """`vaelab compare`: the paired difference of two evaluated runs."""

    run_a: str = run_option("RUN_A")
    run_b: str = run_option("RUN_B")


@options_dataclass
class PlotOptions(Options):
    """`vaelab plot`: a run's figures, drawn again."""

    run: str = run_option()
    data_dir: str | None = data_dir_option()


@options_dataclass
class SampleOptions(Options):
    """`vaelab sample`: images from the prior, into a PNG."""

    run: str = run_option()
    n: int = option(64, "number of samples", rule=POSITIVE, flag="-n")
    output: str = option(MISSING, "PNG file to write", short="-o", rule=PATH)
    seed: int = seed_option(0, "fixes the draws of z")
    label: str | None = label_option("every sample", "its classes in turn")
    temperature: float = option(
        1.0, "--model topdown: scale each layer's prior standard deviation by T (below 1: less"
        " variety, cleaner images)", rule=POSITIVE_NUMBER, metavar="T")
    force: bool = option(False, "overwrite the output file if it exists", rule=SWITCH)


@options_dataclass
class TrainPriorOptions(Options):
    """`vaelab train-prior`: a VQ-VAE run's learned prior over its codes, into RUN/prior."""

    run: str = run_option()
    epochs: int = option(20, "epochs over the training images' codes; more than RUN/prior holds"
                         " continue it", rule=POSITIVE)
    lr: float = option(1e-3, "Adam's learning rate", rule=POSITIVE_NUMBER)
    batch_size: int = option(100, rule=POSITIVE)
    seed: int = seed_option(0, "seed of the binarization, the order and the weights")
    data_dir: str | None = data_dir_option()
    device: str = device_option()
    quiet: bool = quiet_option()


@options_dataclass
class ReportOptions(Options):
    """`vaelab report`: one HTML page of a run."""

    run: str = run_option()
    output: str | None = option(
        None, "HTML file to write (default: RUN/report.html)", short="-o", rule=PATH
    )
    data_dir: str | None = data_dir_option()


# `vaelab data` takes these options of a run (the same defaults and rules as `vaelab train`).
DATA_COMMAND_OPTIONS = ("data_dir", *FOLDER_OPTIONS, "test_fraction", "split_seed")

# One flat namespace of option names across a run and its model (the command line's flags).
assert not {f.name for f in fields(RunConfig)} & {f.name for f in fields(ModelConfig)}
