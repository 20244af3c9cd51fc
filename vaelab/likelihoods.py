"""Observation models p(x|z): the only module that names a likelihood.

Each likelihood knows
- `observe(images, keys)`: stored uint8 images -> what the model sees (float32);
- `log_prob(out, x)`: log p(x|z) in nats per image, from the decoder's output;
- `mean(out)`: E[x|z] in [0, 1], for figures;
- `out_channels(c)`: the decoder's output channels for images of c channels (`channels` per
  image channel, for most).

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
    # whether mean(out) is the sigmoid of out's first C channels (what the report's in-browser
    # decoder shows)
    sigmoid_mean: bool = True

    @classmethod
    def recommends(cls, image_shape: tuple[int, int, int]) -> bool:
        """Whether `recommended` applies to images of shape (C, H, W)."""
        return True

    @classmethod
    def from_options(cls, sigma: float) -> "Likelihood":
        """This likelihood for a model's options (those it reads it checks; the others are
        ignored): what `make` builds."""
        return cls()

    @classmethod
    def from_config(cls, config) -> "Likelihood":
        """This likelihood as a model config (a ModelConfig, read by field) asks for it: what
        `for_model` builds. By default from_options(config.sigma)."""
        return cls.from_options(config.sigma)

    def out_channels(self, c: int) -> int:
        """The decoder's output channels for images of c channels."""
        return c * self.channels

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
        log_s = out[..., c:, :, :].clamp(min=self.MIN_LOG_SCALE)
        return logistic_bins(x, torch.sigmoid(out[..., :c, :, :]), log_s).flatten(-3).sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out[..., :out.shape[-3] // 2, :, :])

    def output_bias(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The logit of the mean, and the log-scale of the logistic with the grey levels'
        standard deviation (s = std * sqrt(3) / pi)."""
        scale = std.clamp(min=MIN_START_STD) * (math.sqrt(3) / math.pi)
        return torch.cat([_logit(mean), scale.log()])


def logistic_bins(x: torch.Tensor, mean: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """log P(level k) of a logistic (mean, scale e^log_s) discretized into the 256 grey levels,
    elementwise at x = k / 255 (broadcast): level k has the mass over [k - 1/2, k + 1/2] / 255,
    levels 0 and 255 the tails beyond."""
    inv_s = torch.exp(-log_s)
    centred = x - mean
    upper, lower = (centred + 0.5 / 255) * inv_s, (centred - 0.5 / 255) * inv_s
    # log of the mass below each edge, and above it: log(1 - sigmoid(v)) = log sigmoid(v) - v
    below_upper, below_lower = F.logsigmoid(upper), F.logsigmoid(lower)
    above_upper, above_lower = below_upper - upper, below_lower - lower
    # log(1 - e^d) for d <= 0; float32 cannot tell 1 - e^d from 0 beyond 1e-7
    log1mexp = lambda d: torch.log1p(-torch.exp(d).clamp(max=1 - 1e-7))  # noqa: E731
    # A bin's mass, from whichever side of the mean it lies on: the difference of two tail
    # masses, each far from 1, stays exact where that of two CDF values would not.
    below = below_upper + log1mexp(below_lower - below_upper)
    above = above_lower + log1mexp(above_upper - above_lower)
    inside = torch.where(centred > 0, above, below)
    top = torch.where(x > 1 - 0.5 / 255, above_lower, inside)
    return torch.where(x < 0.5 / 255, below_upper, top)


@LIKELIHOODS.register("logistic-mixture")
class LogisticMixture(Likelihood):
    """A mixture of K discretized logistics per pixel (PixelCNN++, Salimans et al. 2017): the
    components are shared by a pixel's channels, and within a component each colour channel's
    mean moves with the channels before it (red, then green, then blue), so that a pixel's
    colours are modelled jointly:

        p(x_pixel) = sum_k pi_k prod_c Logistic_255(x_c; mu_ck + sum_{c' < c} a_{c'c,k} x_c', s_ck)

    with mu_ck = sigmoid(m_ck) in [0, 1] and a = tanh of the decoder's raw coefficients, each bin
    as in `logistic_bins`. With K = 1 and the coefficients at 0 it is the discretized logistic.

    Decoder output (..., N, K (1 + 2C + C(C-1)/2), H, W): the K mixture logits, then the C x K
    mean logits m (channel-major), the C x K log-scales, and the K coefficients of each pair
    (c' < c) in the order (0, 1), (0, 2), (1, 2): 3K for grey images, 10K for RGB.
    """

    name = "logistic-mixture"
    recommended = ADAM
    discrete = True
    sigmoid_mean = False
    MIN_LOG_SCALE = DiscretizedLogistic.MIN_LOG_SCALE

    def __init__(self, k: int = 10):
        if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1):
            raise VaelabError(f"--mixture-components must be a positive integer, got {k!r}")
        self.k = int(k)
        self.temporaries = 8 * self.k  # the (..., C, K, H, W) terms log_prob makes

    @classmethod
    def from_config(cls, config) -> "LogisticMixture":
        return cls(config.mixture_components)

    def out_channels(self, c: int) -> int:
        return self.k * (1 + 2 * c + c * (c - 1) // 2)

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return images.to(torch.float32).div_(255.0)

    def _split(self, out: torch.Tensor, c: int) -> tuple[torch.Tensor, ...]:
        """out (..., O, H, W) -> log pi (..., K, H, W), mean logits and log-scales
        (..., C, K, H, W), coefficients (..., C(C-1)/2, K, H, W)."""
        k, lead, hw = self.k, out.shape[:-3], out.shape[-2:]
        logits = out[..., :k, :, :]
        m = out[..., k:k + c * k, :, :].reshape(*lead, c, k, *hw)
        log_s = out[..., k + c * k:k + 2 * c * k, :, :].reshape(*lead, c, k, *hw)
        a = out[..., k + 2 * c * k:, :, :].reshape(*lead, c * (c - 1) // 2, k, *hw)
        return logits.log_softmax(-3), m, log_s.clamp(min=self.MIN_LOG_SCALE), torch.tanh(a)

    def _means(self, m: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each channel's component means (..., C, K, H, W), moved by the channels before it:
        x (..., C, 1, H, W), the observed values (or their expectations, for `mean`)."""
        means = [torch.sigmoid(m[..., 0, :, :, :])]
        pair = 0
        for c in range(1, m.shape[-4]):
            mean = torch.sigmoid(m[..., c, :, :, :])
            for before in range(c):
                mean = mean + a[..., pair, :, :, :] * x[..., before, :, :, :]
                pair += 1
            means.append(mean)
        return torch.stack(torch.broadcast_tensors(*means), -4)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, workspace=None) -> torch.Tensor:
        c = x.shape[-3]
        log_pi, m, log_s, a = self._split(out, c)
        xs = x.unsqueeze(-3)                                        # (..., N, C, 1, H, W)
        log_p = logistic_bins(xs, self._means(m, a, xs), log_s)     # (..., N, C, K, H, W)
        return torch.logsumexp(log_pi + log_p.sum(-4), -3).flatten(-2).sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x|z] of the continuous mixture (each component's coupled means at the channels'
        expectations before it), clamped to [0, 1]."""
        # out_channels inverted: O / K = 1 + 2C + C(C - 1) / 2
        c = round((math.sqrt(1 + 8 * out.shape[-3] / self.k) - 3) / 2)
        log_pi, m, _, a = self._split(out, c)
        expected = []
        for channel in range(c):  # each channel's component means, at the earlier ones' means
            known = torch.stack(expected + [torch.zeros_like(m[..., 0, :, :, :])] * (c - channel),
                                -4)
            expected.append(self._means(m, a, known)[..., channel, :, :, :])
        means = torch.stack(expected, -4)                           # (..., C, K, H, W)
        return (log_pi.exp().unsqueeze(-4) * means).sum(-3).clamp(0, 1)

    def output_bias(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Equal weights; every component at the logit of the mean with the log-scale of the
        grey levels' spread (as the single logistic); no coupling."""
        c, k = mean.shape[0], self.k
        scale = (std.clamp(min=MIN_START_STD) * (math.sqrt(3) / math.pi)).log()
        return torch.cat([torch.zeros(k, *mean.shape[1:]), _logit(mean).repeat_interleave(k, 0),
                          scale.repeat_interleave(k, 0),
                          torch.zeros(k * c * (c - 1) // 2, *mean.shape[1:])])


def for_model(config) -> Likelihood:
    """The likelihood a model config (a ModelConfig) names, with its options."""
    return LIKELIHOODS[config.likelihood].from_config(config)


def recommended(name: str, image_shape: tuple[int, int, int]) -> dict:
    """The training options a likelihood recommends for images of shape (C, H, W)
    (config.resolve puts them under what the caller set explicitly and over the preset)."""
    kind = LIKELIHOODS[name]
    return dict(kind.recommended) if kind.recommends(image_shape) else {}


def make(name: str, sigma: float = 0.1) -> Likelihood:
    """The likelihood object named `name` (sigma: the Gaussian's standard deviation); an
    unknown name or a bad sigma is a one-line VaelabError."""
    return LIKELIHOODS[name].from_options(sigma)
