"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017): a grid of discrete codes, a codebook, and
a learned prior over the codes.

    x (N, C, H, W) -> GridEncoder -> z_e (N, D, h, w) -> nearest codebook vector per cell
      -> z_q (N, D, h, w) -> GridDecoder -> the likelihood's parameters -> p(x|z_q)

with h, w = H / 2^L, W / 2^L for L stride-2 convolutions (7x7 for MNIST and two). Training
minimises -log p(x|z_q) + beta ||z_e - sg(z_q)||^2 (the commitment loss, summed over the grid),
the gradient reaching the encoder through z_q by the straight-through estimator; the codebook
follows exponential moving averages of the encoder outputs assigned to each code (the paper's
appendix A.1, as in its authors' `VectorQuantizerEMA` in Sonnet: decay 0.99, Laplace smoothing
of the counts with eps 1e-5), and a code that no output has chosen for a while is restarted at
an encoder output of the batch.

The posterior is a point, q(z|x) = 1 at z_q(x). With a prior p(z) over code grids,

    -log p(x) <= -log p(x|z_q(x)) - log p(z_q(x)),

an upper bound, not an estimate: with the uniform prior, log K per code (the paper's setting,
the ELBO the epoch's test loss reports); with the learned prior (CodePrior, a small causal
transformer over the grid's codes in raster order, trained afterwards by `vaelab train-prior`),
its own log-probability. `bound` gives both.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from . import likelihoods
from .config import EVAL_SEED, ModelConfig
from .distributed import SINGLE, World
from .errors import VaelabError
from .families import FAMILIES
from .images import stored
from .models import Model
from .nets import GridDecoder, GridEncoder, conv_check
from .objectives import Terms
from .rng import image_keys

# A code is restarted when its moving average of assignments per step falls below this: a code
# chosen once in a hundred steps stays, one unused for a few hundred steps goes. Every code
# starts at 0, so the first step places the whole codebook on encoder outputs.
DEAD = 1e-2
EPS = 1e-5  # the counts' Laplace smoothing (Sonnet's epsilon)
RESTART_SEED = 0x5EED  # keys the restarts' draws, with the codebook's count of updates


def _world() -> tuple[int, int]:
    """(rank, size) of the process group where one is running, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Codebook(nn.Module):
    """K code vectors of size D, learned by exponential moving averages (no gradient).

    Buffers, all in the state dict so that a resumed run continues them exactly:
        embedding     (K, D) the codes
        cluster_size  (K,) moving average of each code's assignments per step
        embed_sum     (K, D) moving average of the sum of the vectors assigned to it
        usage         (K,) assignments since the epoch began (epoch_usage reads and clears it)
        updates       () updates made (keys the restarts' draws)
    Under torchrun the counts and sums of each update are summed over the ranks first, so that
    every rank keeps the codebook one process would keep on the whole batch.
    """

    def __init__(self, k: int, d: int, decay: float):
        super().__init__()
        self.k, self.d, self.decay = k, d, decay
        self.register_buffer("embedding", torch.zeros(k, d))
        self.register_buffer("cluster_size", torch.zeros(k))
        self.register_buffer("embed_sum", torch.zeros(k, d))
        self.register_buffer("usage", torch.zeros(k))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: (M, D) -> (M,) int64, each row's nearest code (squared distance)."""
        e = self.embedding
        distance = flat.square().sum(1, keepdim=True) - 2 * flat @ e.T + e.square().sum(1)
        return distance.argmin(1)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, index: torch.Tensor) -> None:
        """One moving-average step from a batch's encoder outputs flat (M, D) and their codes
        index (M,) (every rank's, under torchrun), then the restart of dead codes."""
        rank, size = _world()
        counts = torch.bincount(index, minlength=self.k).to(flat.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, index, flat)
        if size > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage += counts
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        dead = self.cluster_size < DEAD
        if dead.any():
            # Each dead code takes an encoder output of the global batch, drawn alike on every
            # rank and sent by the rank that holds it: the draws one process would make.
            generator = torch.Generator(flat.device).manual_seed(RESTART_SEED + int(self.updates))
            chosen = torch.randint(0, len(flat) * size, (self.k,), generator=generator,
                                   device=flat.device)
            mine = chosen // len(flat) == rank
            candidates = torch.where(mine[:, None], flat[chosen % len(flat)], 0.0)
            if size > 1:
                dist.all_reduce(candidates)
            self.embed_sum[dead] = candidates[dead]
            self.cluster_size[dead] = 1.0
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + EPS) / (n + self.k * EPS) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self.updates += 1

    def epoch_usage(self) -> dict:
        """The epoch's use of the codebook, and a fresh count for the next: the perplexity of
        the codes' frequencies (exp of their entropy: K when all are used alike, 1 when one is)
        and the codes no encoder output chose."""
        total = self.usage.sum()
        if total == 0:
            return {}
        p = self.usage / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        record = {"perplexity": entropy.exp().item(), "dead_codes": int((self.usage == 0).sum())}
        self.usage.zero_()
        return record


# The learned prior's size: a few hundred thousand weights, to be trained on two CPU cores in
# minutes (benchmarks/results/vq.md measures it).
PRIOR_WIDTH, PRIOR_LAYERS, PRIOR_HEADS = 64, 2, 4


class CodePrior(nn.Module):
    """p(c) = prod_i p(c_i | c_<i) over a grid's codes c (N, L), L = h * w in raster order: a
    causal transformer (PRIOR_LAYERS pre-norm layers of width PRIOR_WIDTH) reading a start
    token, then each earlier code with its position, and giving the next code's K logits."""

    def __init__(self, k: int, cells: int):
        super().__init__()
        self.k, self.cells = k, cells
        self.embed = nn.Embedding(k + 1, PRIOR_WIDTH)  # code k: the start token
        self.position = nn.Parameter(torch.randn(cells, PRIOR_WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(PRIOR_WIDTH, PRIOR_HEADS, 4 * PRIOR_WIDTH,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, PRIOR_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(PRIOR_WIDTH)
        self.head = nn.Linear(PRIOR_WIDTH, k)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(cells),
                             persistent=False)

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (N, L') int64, the first L' <= L codes -> (N, L', K): logits of code i given
        the codes before it."""
        n, length = codes.shape
        start = torch.full((n, 1), self.k, dtype=codes.dtype, device=codes.device)
        h = self.embed(torch.cat([start, codes[:, :-1]], 1)) + self.position[:length]
        mask = self.causal[:length, :length]
        return self.head(self.norm(self.body(h, mask=mask, is_causal=True)))

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (N, L) int64 -> (N,) log p(c) in nats."""
        log_p = self.logits(codes).log_softmax(-1)
        return log_p.gather(-1, codes[..., None]).squeeze(-1).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n code grids (n, L) int64, drawn code by code."""
        codes = torch.zeros(n, self.cells, dtype=torch.int64, device=generator.device)
        for i in range(self.cells):
            p = self.logits(codes[:, :i + 1])[:, i].softmax(-1)
            codes[:, i] = torch.multinomial(p, 1, generator=generator)[:, 0]
        return codes


@FAMILIES.register("vq-vae")
class VQVAE(Model):
    """The VQ-VAE of a ModelConfig with family "vq-vae": vaelab's GridEncoder and GridDecoder
    (architecture "conv": conv_channels, activation), codes of z_dim = D channels, a Codebook of
    codebook_size = K vectors, the likelihood, and, once `vaelab train-prior` has run, a
    CodePrior (`attach`). Its draws of z are the flattened code vectors (N, D * h * w),
    channel-major, which `decode` quantises again (a no-op for codes, the nearest code for any
    other point, such as an interpolation between two encoder outputs)."""

    estimate = "bound"
    has_active_units = False
    capturable = False  # a restart reads the host

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        problem = conv_check(config.image_shape, config.conv_channels)
        if problem:
            raise VaelabError(problem)
        self.config = config
        self.likelihood = likelihoods.for_model(config)
        c, h, w = config.image_shape
        self.out_shape = (self.likelihood.out_channels(c), h, w)
        scale = 2 ** len(config.conv_channels)
        self.grid = (h // scale, w // scale)
        self.encoder = GridEncoder(config.image_shape, config.conv_channels, config.z_dim,
                                   config.activation)
        self.decoder = GridDecoder(config.z_dim, config.conv_channels, config.activation,
                                   self.out_shape[0])
        self.codebook = Codebook(config.codebook_size, config.z_dim, config.codebook_decay)
        self._prior: tuple[CodePrior, ...] = ()  # attached, not a submodule: a stage of its own

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VQVAE":
        return cls(config)

    @classmethod
    def check(cls, config) -> None:
        m = config.model
        refused = [
            (m.architecture != "conv", "--preset vq-vae (architecture conv: its codes are a grid)"),
            (m.conditional, "no --conditional"),
            (bool(m.upper_z_dims), "no --upper-z-dims"),
            (m.prior != "standard", "no --prior: its prior over codes is uniform, then learned by"
             " `vaelab train-prior`"),
            (m.posterior != "gaussian", "no --posterior: its posterior is the nearest code"),
            (config.objective != "elbo", "--objective elbo: its posterior is a point, so k draws"
             " are one"),
            (config.estimator != "reparam", "--estimator reparam: its codes are not drawn"),
            (config.samples != 1, "--samples 1: its codes are not drawn"),
            (config.weighted, "no --beta, --kl-warmup or --free-bits: its KL, log K per code, is"
             " a constant"),
            (config.skip_threshold is not None, "no --skip-threshold: a skipped update could not"
             " put back the codebook's moving averages, which the step has moved already"),
            (bool(config.ema), "no --ema: its codebook follows the encoder's own outputs, which an"
             " average of the weights would not give"),
        ]
        for wrong, needs in refused:
            if wrong:
                raise VaelabError(f"--model vq-vae needs {needs}")

    noise_dim = 0  # nothing is drawn

    @property
    def cells(self) -> int:
        """Codes per image, h * w."""
        return self.grid[0] * self.grid[1]

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.config.z_dim * self.cells,)

    @property
    def code_prior(self) -> CodePrior | None:
        """The learned prior over codes, once trained and attached; else None."""
        return self._prior[0] if self._prior else None

    def second_stage(self) -> CodePrior:
        """A fresh CodePrior for this model's codes: what `vaelab train-prior` trains, and what
        load_run fills from RUN/prior."""
        return CodePrior(self.config.codebook_size, self.cells).to(self.device)

    def attach(self, prior: CodePrior | None) -> None:
        """Use prior as the model's learned prior over codes (None: the uniform one only); it
        then moves and switches mode with the model, outside its state dict."""
        self._prior = () if prior is None else (prior.to(self.device).train(self.training),)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for prior in self._prior:
            prior._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for prior in self._prior:
            prior.train(mode)
        return self

    def posterior_params(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor]:
        """x -> (z_e,): the encoder's outputs, flattened (N, D * h * w)."""
        return (self.encoder(x.reshape(len(x), *self.config.image_shape)).flatten(1),)

    def posterior_mean(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """x -> z_e (N, D * h * w), the point before quantisation (decode quantises it)."""
        return self.posterior_params(x)[0]

    def _grid(self, z: torch.Tensor) -> torch.Tensor:
        """(M, D * h * w) -> (M, D, h, w)."""
        return z.reshape(len(z), self.config.z_dim, *self.grid)

    def _vectors(self, z: torch.Tensor) -> torch.Tensor:
        """(M, D * h * w) -> each cell's vector, (M * h * w, D), cells in raster order."""
        return self._grid(z).permute(0, 2, 3, 1).reshape(-1, self.config.z_dim)

    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (M, D * h * w) -> each cell's nearest code (M, h * w) int64."""
        return self.codebook.nearest(self._vectors(z_e)).view(len(z_e), self.cells)

    def quantised(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (M, h * w) -> their vectors z_q (M, D * h * w), channel-major."""
        e = self.codebook.embedding[codes]                        # (M, h * w, D)
        return e.transpose(1, 2).reshape(len(codes), -1)

    def decode(self, z: torch.Tensor, workspace=None, *, y=None) -> torch.Tensor:
        """z (..., D * h * w), any point -> its nearest codes' decoder output
        (..., C * channels, H, W), float32."""
        flat = z.reshape(-1, z.shape[-1])
        out = self.decoder(self._grid(self.quantised(self.codes(flat))))
        return out.reshape(*z.shape[:-1], *self.out_shape)

    def decode_mean(self, z: torch.Tensor, y=None) -> torch.Tensor:
        return self.likelihood.mean(self.decode(z))

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None, workspace=None,
                posterior: tuple[torch.Tensor] | None = None, components=None, *, y=None,
                fixed_q: bool = False) -> Terms:
        """x: (N, C, H, W) as the model sees it -> the terms of its one point z_q: log p(x|z_q)
        (1, N), the uniform prior's KL h * w * log K, and the commitment loss as the penalty.
        In training mode the codebook takes its moving-average step from this batch."""
        flat = self.posterior_params(x)[0] if posterior is None else posterior[0]
        codes = self.codes(flat.detach())
        # the codes as they were chosen, before this batch moves them (as in Sonnet)
        z_e, z_q = self._grid(flat), self._grid(self.quantised(codes))
        if self.training:
            self.codebook.update(self._vectors(flat.detach()), codes.flatten())
        commitment = self.config.commitment * (z_e - z_q).square().sum((1, 2, 3))
        z = z_e + (z_q - z_e).detach()  # straight through: z_q forward, the identity backward
        log_px_z = self.likelihood.log_prob(self.decoder(z), x, workspace)[None]
        kl = torch.full((len(x),), self.cells * math.log(self.config.codebook_size),
                        device=x.device)
        return Terms(log_px_z, kl, z.flatten(1)[None], torch.zeros_like(log_px_z), -kl[None],
                     penalty=commitment)

    def prior_components(self, y=None) -> None:
        return None

    def latent_means(self, q) -> None:
        return None

    latent_mean_columns = 0

    def kl_per_dim(self, q, y=None) -> None:
        return None

    def kl_per_dim_note(self) -> str:
        return "a VQ-VAE's KL is log K per code, the same for every image"

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None,
                     y=None) -> torch.Tensor:
        """n code grids from the learned prior, as vectors (n, D * h * w). VaelabError before
        `vaelab train-prior` has given it one."""
        if self.code_prior is None:
            raise VaelabError("a VQ-VAE samples from its learned prior over codes, which this run"
                              " has not trained yet: run `vaelab train-prior RUN` first")
        generator = self.generator(generator)
        return self.quantised(self.code_prior.sample(n, generator))

    @property
    def can_sample(self) -> bool:
        return self.code_prior is not None

    def epoch_metrics(self) -> dict:
        return self.codebook.epoch_usage()


@torch.no_grad()
def bound(model: VQVAE, images: torch.Tensor, *, seed: int = EVAL_SEED, batch_size: int = 500,
          world: World = SINGLE) -> dict:
    """The upper bound -log p(x) <= -log p(x|z_q) - log p(z_q) on images (N, C, H, W) at each
    image's code grid z_q (image i observed with the keys (seed, i), as evaluation observes it),
    under the uniform prior (log K per code) and, where the run has one, the learned prior.

    Returns eval.json's record: "nll" the tighter bound (nats per image; "bound" names its
    prior), "bounds" both (nats, and bits per dimension for a discrete likelihood), "log_px"
    (N,) each image's lower bound on log p(x) under that prior (float64), and what fixes
    them. Under torchrun the ranks share the images and gather every value."""
    from . import distributed
    from .diagnostics import fingerprint
    from .sampling import bits_per_dim

    model.eval()
    images = stored(images, model.config.image_shape)
    device, n = model.device, len(images)
    log_px_z = torch.zeros(n, dtype=torch.float64, device=device)
    log_prior = torch.zeros(n, dtype=torch.float64, device=device)
    for start in range(world.rank * batch_size, n, world.size * batch_size):
        index = torch.arange(start, min(start + batch_size, n), device=device)
        x = model.observe(images[index.cpu()].to(device), image_keys(seed, "observe", index))
        q = model.posterior_params(x)  # one encoder pass for both terms
        log_px_z[index] = model(x, posterior=q).log_px_z[0].double()
        if model.code_prior is not None:
            log_prior[index] = model.code_prior.log_prob(model.codes(q[0])).double()
    log_px_z = distributed.all_sum(log_px_z, world)
    uniform = model.cells * math.log(model.config.codebook_size)
    shape = model.config.image_shape
    per_image = {"uniform": log_px_z - uniform}  # lower bounds on log p(x)
    if model.code_prior is not None:
        per_image["learned"] = log_px_z + distributed.all_sum(log_prior, world)
    bounds = {name: -values.mean().item() for name, values in per_image.items()}
    best = min(bounds, key=bounds.get)  # the tighter
    return {
        "nll": bounds[best],
        "nll_se": 0.0,  # no Monte Carlo: the bound is computed exactly at z_q
        "nll_se_images": (per_image[best].std() / math.sqrt(n)).item() if n > 1 else None,
        "bound": best,
        "bounds": {name: {"nats": value, **({"bits_per_dim": bits_per_dim(value, shape)}
                                            if model.likelihood.discrete else {})}
                   for name, value in bounds.items()},
        "reconstruction": -log_px_z.mean().item(),
        **({"bits_per_dim": bits_per_dim(bounds[best], shape)}
           if model.likelihood.discrete else {}),
        "test_images": n,
        "test_set_sha256": fingerprint(images),
        "seed": seed,
        "unit": "nats per image",
        "estimate": "bound",
        "quantity": "log p(x)",
        "estimator": ("an upper bound on -log p(x), not an importance-sampled estimate:"
                      " -log p(x|z_q) - log p(z_q) at each image's code grid z_q, the"
                      f" {best} prior's log p(z_q), the tighter of the two"),
        "codes": {"grid": list(model.grid), "codebook_size": model.config.codebook_size},
        "log_px": per_image[best].cpu().numpy(),
    }
