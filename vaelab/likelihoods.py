"""Observation models p(x|z): the only module that names a likelihood.

Each likelihood knows
- `observe(images, keys)`: stored uint8 images -> what the model sees (float32);
- `log_prob(out, x)`: log p(x|z) in nats per image, from the decoder's output;
- `mean(out)`: E[x|z] in [0, 1], for figures;
- `channels`: decoder output channels per image channel.

Shapes: images (N, C, H, W) uint8; x (N, C, H, W) float32; decoder output
(..., N, C * channels, H, W); log_prob (..., N).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import rng
from .errors import VaelabError
from .objectives import LOG_2PI
from .registry import Registry

# By name, in the order the command line lists them (each class registers below).
LIKELIHOODS = Registry("likelihood")


def _tracked(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def softplus_sum(logits: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """sum_d softplus(l_d) over the last dimension: (..., D) -> (...).

    Outside autograd it is max(l, 0) - log sigmoid(|l|) with one log per group of
    16 values (a product of numbers in [1/2, 1] cannot underflow): one log where
    F.softplus takes a log1p per value (scalar code on the CPU), and as exact in float32.
    scratch: a contiguous tensor shaped like logits to work in (outside autograd).
    """
    if _tracked(logits):
        return F.softplus(logits).sum(-1)
    positive = torch.clamp_min(logits, 0, out=scratch).sum(-1)
    p = torch.abs(logits, out=scratch).sigmoid_()
    group = math.gcd(p.shape[-1], 16)
    return positive - p.view(*p.shape[:-1], -1, group).prod(-1).log_().sum(-1)


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor,
                    log_sigma: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, sigma^2) summed over each image's values: (..., N, C, H, W) -> (..., N)
    nats."""
    z = (x - mean) * torch.exp(-torch.as_tensor(log_sigma, dtype=x.dtype))
    return (-0.5 * z.square() - log_sigma - 0.5 * LOG_2PI).flatten(-3).sum(-1)


# What the likelihoods of grey levels and colours train with: they sum thousands of pixel terms,
# each steep where the standard deviation or scale is small, so plain SGD's step (which grows with
# the gradient) diverges; Adam's step is bounded by its rate.
ADAM = {"optimizer": "adam", "lr": 1e-3}


class Likelihood:
    name: str = ""
    channels: int = 1
    random: bool = False  # whether observe() draws random numbers
    # a probability of the data's values (nats convert to bits per dimension)
    discrete: bool = False
    # Image-sized tensors that log_prob keeps alive at once outside a workspace, roughly: evaluation
    # sizes its CPU calls by them (sampling.CPU_CALL_BYTES).
    temporaries: int = 0
    # Training options this likelihood trains best with, by option name (config.resolve puts them
    # under what the caller set and over the preset), for images where `recommends` holds.
    recommended: dict = {}
    recommended_where: str = ""  # when `recommends` depends on the images: for --help

    @classmethod
    def recommends(cls, image_shape: tuple[int, int, int]) -> bool:
        """Whether `recommended` applies to images of shape (C, H, W)."""
        return True

    @classmethod
    def from_options(cls, sigma: float) -> "Likelihood":
        """This likelihood for a model's options (those it reads it checks; the others are
        ignored): what `make` builds."""
        return cls()

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, workspace=None) -> torch.Tensor:
        """workspace: a nets.Workspace for temporaries, outside autograd (evaluation's hot loop)."""
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def output_bias(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The decoder output that fits the training images before any training, from each
        value's mean and standard deviation over them: mean, std (C, H', W') in [0, 1] ->
        (C * channels, H', W'); H' = W' = 1 for statistics per channel.

        The location is the logit of the mean, clamped to [1e-3, 1 - 1e-3] as in Burda et
        al.'s code: an output that starts there leaves the hidden units nothing to saturate.
        """
        return _logit(mean)


def _logit(mean: torch.Tensor) -> torch.Tensor:
    """log p / (1 - p) of p clamped to [1e-3, 1 - 1e-3]."""
    return torch.logit(mean.clamp(OUTPUT_CLAMP, 1 - OUTPUT_CLAMP))


OUTPUT_CLAMP = 1e-3
# The narrowest starting spread of the continuous likelihoods: one grey level. A pixel that
# never varies (a border) would otherwise start at the floor of the scale, where its gradient
# is clamped away.
MIN_START_STD = 1 / 255


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Pixels binarized afresh for every draw (dynamic binarization); logits out."""

    name = "bernoulli"
    random = True
    discrete = True
    # The tutorial's plain SGD at 5e-3 is tuned on MNIST's 784 pixels; its step grows with the
    # number of pixel terms, and on larger images it diverges.
    recommended = ADAM
    recommended_where = "on images of more than 784 values"

    @classmethod
    def recommends(cls, image_shape: tuple[int, int, int]) -> bool:
        return math.prod(image_shape) > 784

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Each pixel on with probability k / 255 (k its grey level): (N, ...) uint8 -> float32 0/1.

        keys: (N,) int64, one per image (rng.row_keys). A uniform 16-bit r is
        compared with 65536 k / 255: exact at k = 0 and 255, within 1/65536 elsewhere.
        """
        if keys is None:
            raise ValueError("Bernoulli.observe draws random pixels: it needs one key per image")
        r = rng.uniform16(keys, images[0].numel()).view(images.shape)
        return r.mul_(255).lt_(images.to(torch.int32).mul_(65536)).to(torch.float32)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, workspace=None) -> torch.Tensor:
        """x * l - softplus(l) summed over pixels, from logits l (never a sigmoid then a log)."""
        logits = out.flatten(-3)
        scratch = (None if workspace is None or _tracked(logits)
                   else workspace.get("bernoulli", logits.shape, logits))
        xl = torch.mul(logits, x.flatten(-3), out=scratch).sum(-1)
        return xl - softplus_sum(logits, scratch)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


@LIKELIHOODS.register("gaussian")
class Gaussian(Likelihood):
    """Grey levels in [0, 1] ~ N(sigmoid(out), sigma^2), sigma fixed: a density, not comparable with
    Bernoulli nats."""

    name = "gaussian"
    recommended = ADAM
    temporaries = 2

    def __init__(self, sigma: float):
        self.sigma = sigma

    @classmethod
    def from_options(cls, sigma: float) -> "Gaussian":
        # what the command line's rule says, here where sigma is used: no import of config
        good = isinstance(sigma, numbers.Real) and not isinstance(sigma, bool)
        if not (good and math.isfinite(sigma) and sigma > 0):
            raise VaelabError(f"--sigma must be a positive number, got {sigma!r}")
        return cls(sigma)

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return images.to(torch.float32).div_(255.0)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, workspace=None) -> torch.Tensor:
        return normal_log_prob(x, torch.sigmoid(out), math.log(self.sigma))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def describe(self) -> str:
        return f"gaussian (sigma {self.sigma})"


@LIKELIHOODS.register("gaussian-learned")
class GaussianLearned(Likelihood):
    """Grey levels ~ N(sigmoid(m), sigma^2) with a standard deviation per pixel that the decoder
    learns (log sigma, floored at -7). The grey levels are dequantized first, x = (k + u) / 256 with
    u ~ U(0, 1) keyed like any draw: on the 256 exact levels a learned sigma could shrink to 0 and
    the density grow without bound. A density, not comparable with the discrete likelihoods' nats.

    Decoder output (..., N, 2C, H, W): the C mean channels first, then the C log-sigmas.
    """

    name = "gaussian-learned"
    recommended = ADAM
    channels = 2
    temporaries = 3
    random = True
    MIN_LOG_SIGMA = -7.0

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        if keys is None:
            raise ValueError("GaussianLearned.observe dequantizes with random noise: it needs one"
                             " key per image")
        # 15 bits of u: k + u then fits float32's 24-bit mantissa exactly and stays inside k's bin
        r = rng.uniform16(keys, images[0].numel()).view(images.shape).bitwise_right_shift_(1)
        u = r.to(torch.float32).add_(0.5).div_(32768)
        return images.to(torch.float32).add_(u).div_(256.0)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, workspace=None) -> torch.Tensor:
        c = x.shape[-3]
        log_sigma = out[..., c:, :, :].clamp(min=self.MIN_LOG_SIGMA)
        return normal_log_prob(x, torch.sigmoid(out[..., :c, :, :]), log_sigma)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out[..., :out.shape[-3] // 2, :, :])

    def output_bias(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The logit of the mean, and log sigma at the grey levels' standard deviation."""
        return torch.cat([_logit(mean), std.clamp(min=MIN_START_STD).log()])


@LIKELIHOODS.register("logistic")
class DiscretizedLogistic(Likelihood):
    """Each channel's 256 grey levels as bins of a logistic distribution (as in PixelCNN++, one
    component): the decoder gives, per pixel and channel, the mean logit m (mean sigmoid(m) in
    [0, 1]) and the log-scale log_s. Level k has the logistic's mass over [k - 1/2, k + 1/2] / 255,
    levels 0 and 255 the tails beyond. A probability, so nats convert to bits per dimension.

    Decoder output (..., N, 2C, H, W): the C mean channels first, then the C log-scales.
    """

    name = "logistic"
    recommended = ADAM
    channels = 2
    temporaries = 6
    discrete = True
    MIN_LOG_SCALE = -7.0  # keeps 1 / s finite; a bin is 1/255 wide, e^-7 is a quarter of it

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return images.to(torch.float32).div_(255.0)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, workspace=None) -> torch.Tensor:
        c = x.shape[-3]
        mean = torch.sigmoid(out[..., :c, :, :])
        log_s = out[..., c:, :, :].clamp(min=self.MIN_LOG_SCALE)
        inv_s = torch.exp(-log_s)
        centred = x - mean
        upper, lower = (centred + 0.5 / 255) * inv_s, (centred - 0.5 / 255) * inv_s
        # log of the mass below each edge, and above it: log(1 - sigmoid(v)) = log sigmoid(v) - v
        below_upper, below_lower = F.logsigmoid(upper), F.logsigmoid(lower)
        above_upper, above_lower = below_upper - upper, below_lower - lower
        # log(1 - e^d) for d <= 0; float32 cannot tell 1 - e^d from 0 beyond 1e-7
        log1mexp = lambda d: torch.log1p(-torch.exp(d).clamp(max=1 - 1e-7))
        # A bin's mass, from whichever side of the mean it lies on: the difference of two
        # tail masses, each far from 1, stays exact where that of two CDF values would not.
        below = below_upper + log1mexp(below_lower - below_upper)
        above = above_lower + log1mexp(above_upper - above_lower)
        inside = torch.where(centred > 0, above, below)
        top = torch.where(x > 1 - 0.5 / 255, above_lower, inside)
        log_p = torch.where(x < 0.5 / 255, below_upper, top)
        return log_p.flatten(-3).sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out[..., :out.shape[-3] // 2, :, :])

    def output_bias(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The logit of the mean, and the log-scale of the logistic with the grey levels'
        standard deviation (s = std * sqrt(3) / pi)."""
        scale = std.clamp(min=MIN_START_STD) * (math.sqrt(3) / math.pi)
        return torch.cat([_logit(mean), scale.log()])


def recommended(name: str, image_shape: tuple[int, int, int]) -> dict:
    """The training options a likelihood recommends for images of shape (C, H, W)
    (config.resolve puts them under what the caller set explicitly and over the preset)."""
    kind = LIKELIHOODS[name]
    return dict(kind.recommended) if kind.recommends(image_shape) else {}


def make(name: str, sigma: float = 0.1) -> Likelihood:
    """The likelihood object named `name` (sigma: the Gaussian's standard deviation); an
    unknown name or a bad sigma is a one-line VaelabError."""
    return LIKELIHOODS[name].from_options(sigma)
