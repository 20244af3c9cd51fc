"""A deep hierarchy of Gaussian latents with top-down inference, built as Child's Very Deep VAE
(2021; its code, github.com/openai/vdvae, vae.py), the line of the Ladder VAE (Sønderby et al.
2016) and of IAF-VAE's bidirectional inference (Kingma et al. 2016):

    bottom-up  x -> 3x3 conv -> residual blocks at (H, W), average pool to (H/2, W/2), blocks,
               ... , pool to (1, 1), blocks: a_r, the last activation at each resolution r
    top-down   h = a learned bias at (1, 1); for each stochastic layer l, the top first, h
               upsampled (nearest) and added to that resolution's learned bias where the
               resolution grows:
                   p(z_l | z_>l)    = N(mu_p, exp(logvar_p)), and extra channels, from prior(h)
                   q(z_l | z_>l, x) = N(mu_q, exp(logvar_q)) from posterior([h, a_r])
                   h = resnet(h + extra + project(z_l))
               out = 1x1 conv(h * gain + bias): the likelihood's parameters of p(x | z)

The generative path and the inference path share h, so q(z_l | ...) reads everything the prior
knows. Each layer's z_l is (z_dim, h_l, w_l); its KL given the layers above is analytic between
the two diagonal Gaussians, and the ELBO is log p(x|z) - sum_l KL_l.

Draws: noise eps (S, N, noise_dim), noise_dim = sum_l z_dim * h_l * w_l, the layers in the order
they are drawn (the top first), each (z_dim, h_l, w_l) flattened channel-major; a draw z has the
same layout. Every draw is a full top-down pass, so importance sampling costs a decoder pass per
sample (benchmarks/results/topdown.md measures it).

Stabilisers from VDVAE's code: every residual block's last convolution, and each layer's
projection of z, start scaled by sqrt(1 / blocks) (the encoder's and the decoder's counts); the
prior's last convolution starts at zero, so that p(z_l | z_>l) starts as N(0, I) and leaves h
alone; every bias starts at zero. Gradient clipping and update skipping are the run's options
(--grad-clip, --skip-threshold), as is an average of the weights (--ema).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import likelihoods
from .config import ModelConfig
from .densities import kl_normals_per_dim, log_normal
from .errors import VaelabError
from .families import FAMILIES
from .models import Model
from .nets import ACTIVATIONS
from .objectives import Terms

BOTTLENECK = 4  # a block's inner width is width / 4 (VDVAE's bottleneck_multiple 0.25)


def resolutions(h: int, w: int) -> list[tuple[int, int]]:
    """The bottom-up pass's resolutions for (H, W) images: (H, W), then halved while both are even
    and above 4, then (1, 1). 28x28: 28, 14, 7, 1; 32x32: 32, 16, 8, 4, 1."""
    sizes = [(h, w)]
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 4:
        h, w = h // 2, w // 2
        sizes.append((h, w))
    return sizes if sizes[-1] == (1, 1) else [*sizes, (1, 1)]


def _conv(c_in: int, c_out: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    """A same-size convolution with a zero bias and PyTorch's weights times scale."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.zero_()
    return conv


class Block(nn.Module):
    """VDVAE's bottleneck block: act, 1x1 conv to the inner width, act, 3x3, act, 3x3, act, 1x1
    to c_out (1x1s for the 3x3s at resolutions of 2 or less), plus the input where residual.
    last_scale multiplies the last convolution's initial weights (0: it starts as zero).

    x: (M, c_in, h, w) -> (M, c_out, h, w)."""

    def __init__(self, c_in: int, c_out: int, inner: int, activation: str, *, residual: bool,
                 spatial: bool, last_scale: float = 1.0):
        super().__init__()
        k = 3 if spatial else 1
        self.residual = residual
        self.act = ACTIVATIONS[activation][0]()
        self.convs = nn.ModuleList([_conv(c_in, inner, 1), _conv(inner, inner, k),
                                    _conv(inner, inner, k), _conv(inner, c_out, 1, last_scale)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = conv(self.act(h))
        return x + h if self.residual else h


class BottomUp(nn.Module):
    """The encoder: x (N, C, H, W) -> [a_r (N, width, h_r, w_r) for each resolution r, the input's
    first], `counts[i]` residual blocks at resolution i."""

    def __init__(self, channels: int, width: int, sizes: list[tuple[int, int]],
                 counts: tuple[int, ...], activation: str):
        super().__init__()
        self.sizes = sizes
        scale = math.sqrt(1 / sum(counts))
        inner = max(1, width // BOTTLENECK)
        self.stem = _conv(channels, width, 3)
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(width, width, inner, activation, residual=True,
                                spatial=min(size) > 2, last_scale=scale) for _ in range(count))
            for size, count in zip(sizes, counts))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, acts = self.stem(x), []
        for i, (size, stage) in enumerate(zip(self.sizes, self.stages)):
            if i:
                h = F.adaptive_avg_pool2d(h, size)  # halving: 2x2 means; to (1, 1): the mean
            for block in stage:
                h = block(h)
            acts.append(h)
        return acts


class Layer(nn.Module):
    """One stochastic layer of the top-down pass at resolution `size` (VDVAE's DecBlock): its
    prior, its posterior, the projection of z_l into h, and a residual block.

    `n` is the decoder's count of layers, which scales the projection and the block."""

    def __init__(self, width: int, z_dim: int, size: tuple[int, int], activation: str, n: int):
        super().__init__()
        self.z_dim, self.size = z_dim, size
        inner, spatial, scale = max(1, width // BOTTLENECK), min(size) > 2, math.sqrt(1 / n)
        self.posterior = Block(2 * width, 2 * z_dim, inner, activation, residual=False,
                               spatial=spatial)
        self.prior = Block(width, 2 * z_dim + width, inner, activation, residual=False,
                           spatial=spatial, last_scale=0.0)
        self.project = _conv(z_dim, width, 1, scale)
        self.resnet = Block(width, width, inner, activation, residual=True, spatial=spatial,
                            last_scale=scale)

    @property
    def noise_size(self) -> int:
        """Values of z_l: z_dim * h * w."""
        return self.z_dim * self.size[0] * self.size[1]


class TopDown(nn.Module):
    """The decoder: the learned starting states, the stochastic layers (the top first), and the
    output convolution, registered last (nets.output_layer finds it for --output-init)."""

    def __init__(self, width: int, z_dim: int, sizes: list[tuple[int, int]],
                 counts: tuple[int, ...], out_channels: int, activation: str):
        super().__init__()
        n = sum(counts)
        self.sizes = sizes  # the top's (1, 1) first
        self.starts = nn.ParameterList(nn.Parameter(torch.zeros(1, width, *size)) for size in sizes)
        self.layers = nn.ModuleList(Layer(width, z_dim, size, activation, n)
                                    for size, count in zip(sizes, counts) for _ in range(count))
        self.gain = nn.Parameter(torch.ones(1, width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.out = _conv(width, out_channels, 1)


@FAMILIES.register("topdown")
class TopDownVAE(Model):
    """The top-down hierarchy of a ModelConfig with family "topdown": a BottomUp encoder and a
    TopDown decoder of `width` channels, `blocks[i]` stochastic layers of z_dim channels at the
    i-th resolution from the top (1x1 first; resolutions(H, W) reversed) and as many residual
    blocks in the encoder at it, and the likelihood.

    The Model protocol as models.VAE gives it, for this family: posterior_params(x) is the
    bottom-up pass's activations (computed once per image, then shared by every draw); a draw z
    is every layer's z_l (the module docstring's layout); decode(z) runs the top-down pass with
    those z_l; sample_prior draws them from the priors, at a temperature."""

    own_decoder = False  # its decoder runs in float32, without evaluation's workspaces
    # A draw is a pass through the whole decoder: K=100 keeps the evaluation of 10,000 MNIST
    # test images within an hour on two CPU cores (benchmarks/results/topdown.md).
    default_k = 100
    kl_per_layer = True
    top_down = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        c, h, w = config.image_shape
        sizes = resolutions(h, w)
        if len(config.blocks) != len(sizes):
            shown = ", ".join(f"{a}x{b}" for a, b in reversed(sizes))
            raise VaelabError(f"--blocks gives {len(config.blocks)} resolutions, but {h}x{w} images"
                              f" have {len(sizes)} ({shown}): give one count for each, the top's"
                              " first")
        self.config = config
        self.likelihood = likelihoods.for_model(config)
        self.out_shape = (self.likelihood.out_channels(c), h, w)
        counts = tuple(reversed(config.blocks))  # bottom-up
        self.encoder = BottomUp(c, config.width, sizes, counts, config.activation)
        self.decoder = TopDown(config.width, config.z_dim, sizes[::-1], config.blocks,
                               self.out_shape[0], config.activation)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "TopDownVAE":
        return cls(config)

    @classmethod
    def check(cls, config) -> None:
        m = config.model
        refused = [
            (m.conditional, "no --conditional"),
            (bool(m.upper_z_dims), "no --upper-z-dims: its layers are --blocks"),
            (m.prior != "standard", "no --prior: each layer's prior is its own, p(z_l | z_>l)"),
            (m.posterior != "gaussian", "no --posterior: each layer's posterior is a Gaussian"),
            (config.estimator == "dreg", "--estimator reparam or stl: DReG reweights the gradient"
             " at each draw of z, but its layers are drawn one after another"),
        ]
        for wrong, needs in refused:
            if wrong:
                raise VaelabError(f"--model topdown needs {needs}")

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def sizes(self) -> tuple[int, ...]:
        """Each stochastic layer's values, the top first: the columns of a draw z."""
        return tuple(layer.noise_size for layer in self.layers)

    @property
    def noise_dim(self) -> int:
        return sum(self.sizes)

    def posterior_params(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, ...]:
        """x: (N, C, H, W) as the model sees it -> the bottom-up activations a_r, (N, width,
        h_r, w_r) each, the input's resolution first."""
        return tuple(self.encoder(x.reshape(len(x), *self.config.image_shape)))

    def _top_down(self, rows: int, acts: tuple[torch.Tensor, ...] | None = None,
                  eps: torch.Tensor | None = None, z: torch.Tensor | None = None, *,
                  from_q: int = 0, temperature: float = 1.0, fixed_q: bool = False):
        """The top-down pass for `rows` rows -> (the decoder's output (rows, C * channels, H, W),
        one record per layer, the top's first).

        Layer l's z_l is z's columns where z (rows, noise_dim) is given; else, for the first
        from_q layers, mu_q + sigma_q * eps_l from q(z_l | z_>l, x) (acts: the bottom-up
        activations, `rows` rows; eps 0: q's mean); else mu_p + temperature * sigma_p * eps_l
        from the prior. eps: (rows, noise_dim). Every record holds z_l (rows, z_dim, h_l, w_l);
        a layer drawn from q's also q's mu and logvar, and log q, log p and the analytic KL,
        (rows,) each (log q with q's parameters detached where fixed_q)."""
        dec = self.decoder
        starts = {tuple(p.shape[-2:]): p for p in dec.starts}
        h, records, column = None, [], 0
        for i, layer in enumerate(dec.layers):
            start = starts[layer.size]
            if h is None:
                h = start.expand(rows, -1, -1, -1)
            elif h.shape[-2:] != layer.size:
                h = start + F.interpolate(h, size=layer.size, mode="nearest")
            shape = (rows, layer.z_dim, *layer.size)
            cut = slice(column, column + layer.noise_size)
            column += layer.noise_size
            feats = layer.prior(h)
            mu_p, logvar_p = feats[:, :layer.z_dim], feats[:, layer.z_dim:2 * layer.z_dim]
            extra = feats[:, 2 * layer.z_dim:]
            if z is not None:
                record = {"z": z[:, cut].reshape(shape)}
            elif i < from_q:
                a = acts[len(acts) - 1 - dec.sizes.index(layer.size)]
                mu_q, logvar_q = layer.posterior(torch.cat([h, a], 1)).chunk(2, 1)
                z_l = mu_q + torch.exp(0.5 * logvar_q) * eps[:, cut].reshape(shape)
                z_, mu, logvar, mu_p_, logvar_p_ = (t.flatten(1) for t in
                                                    (z_l, mu_q, logvar_q, mu_p, logvar_p))
                q = (mu.detach(), logvar.detach()) if fixed_q else (mu, logvar)
                record = {"z": z_l, "mu": mu, "logvar": logvar,
                          "log_q": log_normal(z_, *q), "log_p": log_normal(z_, mu_p_, logvar_p_),
                          "kl": kl_normals_per_dim(mu, logvar, mu_p_, logvar_p_).sum(-1)}
            else:
                e = eps[:, cut].reshape(shape)
                record = {"z": mu_p + temperature * torch.exp(0.5 * logvar_p) * e}
            records.append(record)
            h = layer.resnet(h + extra + layer.project(record["z"]))
        out = dec.out(h * dec.gain + dec.bias)
        return out, records

    def _expanded(self, acts: tuple[torch.Tensor, ...], s: int) -> tuple[torch.Tensor, ...]:
        """Each activation (N, ...) repeated for s draws: (s * N, ...), draw-major."""
        return tuple(a.expand(s, *a.shape).reshape(s * len(a), *a.shape[1:]) for a in acts)

    def forward(self, x: torch.Tensor, eps: torch.Tensor, workspace=None,
                posterior: tuple[torch.Tensor, ...] | None = None, components=None, *, y=None,
                fixed_q: bool = False) -> Terms:
        """x: (N, C, H, W) as the model sees it; eps: (S, N, noise_dim) -> the terms of S draws
        of every layer from q: log p(x|z), log q(z|x) and log p(z) summed over the layers, the
        KL as the sum of the layers' analytic KLs (their mean over the draws; from the draws
        where config.kl is "sampled" or fixed_q), and kl_per_dim the KL of each layer (N, L).
        posterior: posterior_params(x), when the caller has them."""
        s, n = eps.shape[:2]
        acts = self.posterior_params(x) if posterior is None else posterior
        out, records = self._top_down(s * n, self._expanded(acts, s), eps.reshape(s * n, -1),
                                      from_q=len(self.layers), fixed_q=fixed_q)
        log_px_z = self.likelihood.log_prob(out.view(s, n, *self.out_shape), x, workspace)
        total = lambda name: sum(r[name] for r in records).view(s, n)  # noqa: E731
        per_layer = torch.stack([r["kl"] for r in records], -1).view(s, n, -1).mean(0)
        analytic = self.config.kl == "analytic" and not fixed_q
        z = torch.cat([r["z"].flatten(1) for r in records], 1).view(s, n, -1)
        return Terms(log_px_z, per_layer.sum(-1) if analytic else None, z, total("log_q"),
                     total("log_p"), per_layer)

    def decode(self, z: torch.Tensor, workspace=None, *, y=None) -> torch.Tensor:
        """z (..., noise_dim), every layer's -> the decoder's output (..., C * channels, H, W)."""
        flat = z.reshape(-1, z.shape[-1])
        out, _ = self._top_down(len(flat), z=flat)
        return out.reshape(*z.shape[:-1], *self.out_shape)

    def decode_mean(self, z: torch.Tensor, y=None) -> torch.Tensor:
        return self.likelihood.mean(self.decode(z))

    def gaussian(self, q: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The bottom-up activations -> mu, logvar (N, noise_dim): every layer's q along the pass
        that takes each layer at its mean."""
        records = self._at_means(q)
        return (torch.cat([r["mu"] for r in records], 1),
                torch.cat([r["logvar"] for r in records], 1))

    fits_posterior = False  # `vaelab gap` fits a Gaussian q(z|x); its q is a chain of layers

    def _at_means(self, acts: tuple[torch.Tensor, ...]) -> list[dict]:
        """The records of the pass that takes every layer at q's mean (_top_down with eps 0)."""
        rows = len(acts[0])
        eps = torch.zeros(rows, self.noise_dim, device=acts[0].device)
        return self._top_down(rows, acts, eps, from_q=len(self.layers))[1]

    def posterior_mean(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """x -> (N, noise_dim) every layer at q's mean, given the layers above at theirs."""
        return self.encode_observed(x)[0]

    def prior_components(self, y=None) -> None:
        return None

    def latent_means(self, q: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Every layer's mu along the pass that takes each layer at q's mean, (N, noise_dim): the
        means evaluation and the test pass count active units over. Not E_q[z] below the top
        layer (that averages over the layers above), but free of Monte-Carlo noise, which at
        this family's K=100 would lift every unit over the threshold."""
        return self.gaussian(q)[0]

    @property
    def latent_mean_columns(self) -> int:
        return self.noise_dim

    posterior_mean_note = "every layer's mu of q along the pass at the means of the layers above"

    @property
    def units(self) -> int:
        return self.noise_dim

    def kl_per_dim(self, q, y=None) -> None:
        return None

    def kl_per_dim_note(self) -> str:
        return "a top-down hierarchy's KL is given per layer (kl_per_layer)"

    def draw_footprint(self) -> tuple[int, int, int]:
        """What one draw costs: about six values per channel and position of each layer's state
        (its blocks' outputs and the posterior's and prior's), in float32."""
        floats = sum(6 * self.config.width * layer.size[0] * layer.size[1] for layer in self.layers)
        return floats + 4 * math.prod(self.out_shape), 4, 0

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None, y=None, *,
                     temperature: float = 1.0) -> torch.Tensor:
        """n draws of every layer from the priors p(z_l | z_>l), their standard deviations times
        temperature: (n, noise_dim). generator: on the model's device, for draws that repeat."""
        generator = self.generator(generator)
        eps = torch.randn(n, self.noise_dim, generator=generator, device=self.device)
        return self._drawn(n, eps, 0, temperature)

    def _drawn(self, n: int, eps: torch.Tensor, from_q: int, temperature: float,
               acts: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Every layer's z of one top-down pass (n, noise_dim): the first from_q layers at q's
        means, the rest drawn from the priors at temperature with eps (n, noise_dim)."""
        if from_q:
            eps = eps.clone()
            eps[:, :sum(self.sizes[:from_q])] = 0  # the top layers at q's means
        records = self._top_down(n, acts, eps, from_q=from_q, temperature=temperature)[1]
        return torch.cat([r["z"].flatten(1) for r in records], 1)

    @torch.no_grad()
    def reconstruct_top(self, x: torch.Tensor, layers: int, generator: torch.Generator, *,
                        temperature: float = 1.0) -> torch.Tensor:
        """x (N, C, H, W) as the model sees it -> z (N, noise_dim) with its top `layers` layers
        at q's means and the rest drawn from the priors at temperature: what the top layers
        encode of each image (Child 2021, figure 4)."""
        eps = torch.randn(len(x), self.noise_dim, generator=generator, device=self.device)
        return self._drawn(len(x), eps, layers, temperature, self.posterior_params(x))
