"""The VAE, from components: an encoder, q(z|x) (a Gaussian head, optionally an IAF from
posteriors.py), a prior p(z) (priors.py), a decoder, and a likelihood object (likelihoods.py)
that turns the decoder's output into p(x|z).

    encoder: x (N, C, H, W) -> network -> features (N, F) -> linear head -> mu, logvar (N, z_dim)
    decoder: z (..., z_dim) -> network on (M, z_dim) -> output (..., C * channels, H, W)

The networks are vaelab's (`VAE.from_config`: MLPs on the flattened image, architecture "mlp",
or convolutional, "conv", nets.ConvEncoder and nets.ConvDecoder) or your own `nn.Module`s
(`VAE(encoder, decoder, z_dim=...)`, architecture "custom").

`VAE.forward(x, eps)` returns the per-example terms every objective needs
(objectives.Terms), so whatever wraps the module (DDP, graph capture) wraps the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import likelihoods, nets, posteriors, priors
from .config import ARCHITECTURES, CUSTOM, PRESETS, ModelConfig, preset  # noqa: F401  (re-exported)
from .config import EVAL_SEED
from .errors import VaelabError
from .hierarchy import Hierarchy
from .images import stored
from .nets import MLP, ConvDecoder, ConvEncoder, ImageMLP, Workspace, conv_check
from .objectives import Terms, kl_normal, reparametrize
from .rng import image_keys


class VAE(nn.Module):
    """A VAE from components: an encoder x -> features, a posterior head and flow, a prior, a
    decoder z -> the likelihood's parameters, and the likelihood.

    `VAE(encoder, decoder, z_dim=..., ...)` takes your own networks: any `nn.Module`s with
        encoder: x (N, C, H, W) float -> features (N, F)
        decoder: z (M, z_dim) -> (M, C * m, H, W) or (M, C * m * H * W), m the likelihood's
                 `channels` (1, or 2 for gaussian-learned)
    vaelab adds the linear head features -> q(z|x)'s parameters, reading F from one dry run of
    the encoder on an image of zeros, and flattens and restores z's leading dimensions around
    the decoder. The other keywords are ModelConfig's component fields: image_shape,
    likelihood, sigma, prior, prior_components, posterior, flow_steps. The model's `config`
    then records architecture "custom", and `load_run(run, encoder=..., decoder=...)` rebuilds
    it from the same modules.

    `VAE.from_config(config)` builds vaelab's own networks (a preset's MLP or conv nets).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        config: ModelConfig | None = None,
        *,
        head: nn.Linear | None = None,
        **options,
    ):
        super().__init__()
        if config is None:
            config = _custom_config(encoder, options)
        elif options:
            raise VaelabError(
                "give the model's options in config or as keywords, not both "
                f"({', '.join(sorted(options))})"
            )
        config.validate()
        self.config = config
        self.likelihood = likelihoods.make(config.likelihood, config.sigma)
        c, h, w = config.image_shape
        self.out_shape = (c * self.likelihood.channels, h, w)
        features = _dry_run(encoder, torch.zeros(1, *config.image_shape), "encoder")
        if features.dim() != 2:
            raise VaelabError(
                f"the encoder maps one image (1, {c}, {h}, {w}) to shape "
                f"{tuple(features.shape)}; it must give features (1, F)"
            )
        if config.architecture == CUSTOM and features.shape[1] != config.encoder_hidden[-1]:
            raise VaelabError(
                f"the encoder gives {features.shape[1]} features, but the model's config records"
                f" {config.encoder_hidden[-1]}: build the encoder as it was"
            )
        out = _dry_run(decoder, torch.zeros(1, config.z_dim), "decoder")
        if tuple(out.shape) not in ((1, *self.out_shape), (1, math.prod(self.out_shape))):
            raise VaelabError(
                f"the decoder maps z (1, {config.z_dim}) to shape {tuple(out.shape)}; the "
                f"{config.likelihood} likelihood needs (1, {', '.join(map(str, self.out_shape))})"
            )
        # Registered in this order (encoder, head, decoder, then prior, flow, hierarchy): optimizer
        # checkpoints list parameters by position.
        self.encoder = encoder
        self.context = _context(config)
        self.head = (
            nn.Linear(features.shape[1], 2 * config.z_dim + self.context) if head is None else head
        )
        if (self.head.in_features, self.head.out_features) != (
            features.shape[1],
            2 * config.z_dim + self.context,
        ):
            raise VaelabError("the head does not fit the encoder's features and the posterior")
        self.decoder = decoder
        # Evaluation's workspaces, bf16 decoding and sizing by layer are capabilities of
        # vaelab's own decoders; any other module runs plainly, in float32.
        self.own_decoder = isinstance(decoder, (MLP, ConvDecoder))
        # After the networks, in the order they were added to vaelab (prior, flow, hierarchy):
        # optimizer checkpoints list parameters by position.
        sizes = (config.z_dim, *config.upper_z_dims)
        self.prior = priors.make(
            config.prior, sizes[-1], config.prior_components, config.image_shape
        )
        self.flow = (
            posteriors.IAF(config.z_dim, config.flow_steps) if config.posterior == "iaf" else None
        )
        self.hierarchy = (
            Hierarchy(sizes, config.upper_hidden, config.activation)
            if config.upper_z_dims
            else None
        )

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VAE":
        """A VAE with vaelab's own networks, as config (a preset's, say) describes them."""
        if config.architecture == CUSTOM:
            raise VaelabError(
                "this model was built from your own networks: rebuild it in Python with "
                "vaelab.load_run(run, encoder=..., decoder=...)"
            )
        config.validate()
        # The image shape is known once the data is (a config is validated before that).
        problem = (
            conv_check(config.image_shape, config.conv_channels)
            if config.architecture == "conv"
            else None
        )
        if problem:
            raise VaelabError(problem)
        channels = likelihoods.make(config.likelihood, config.sigma).channels
        c, h, w = config.image_shape
        # Made in this order, encoder, head, decoder: a seed gives the weights it always gave.
        if config.architecture == "conv":
            encoder = ConvEncoder(
                config.image_shape, config.conv_channels, config.encoder_hidden, config.activation
            )
        else:
            encoder = ImageMLP(
                [config.x_dim, *config.encoder_hidden], config.activation, final_activation=True
            )
        # mu and logvar (and an IAF's context) come from one linear layer: one GEMM, not two.
        head = nn.Linear(config.encoder_hidden[-1], 2 * config.z_dim + _context(config))
        if config.architecture == "conv":
            decoder = ConvDecoder(
                config.z_dim,
                config.image_shape,
                config.conv_channels,
                config.decoder_hidden,
                config.activation,
                c * channels,
            )
        else:
            decoder = MLP(
                [config.z_dim, *config.decoder_hidden, c * channels * h * w], config.activation
            )
        return cls(encoder, decoder, config, head=head)

    @property
    def noise_dim(self) -> int:
        """Standard normals one draw of z needs: z_dim, or every stochastic layer's size."""
        return self.config.z_dim if self.hierarchy is None else self.hierarchy.noise_dim

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.head.weight.device

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, C, H, W) or flat, uint8 or floats in [0, 1] (images.stored) -> what the
        model sees, x: (N, C, H, W) float32 (see likelihoods). keys: (N,) one per image, for
        the likelihoods that draw (rng.image_keys)."""
        return self.likelihood.observe(stored(images, self.config.image_shape), keys)

    def encode(self, images: torch.Tensor, *,
               seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, C, H, W) or flat (N, C * H * W), uint8 or floats in [0, 1] (one meaning:
        images.stored) -> mu, logvar: (N, z_dim) each, q(z|x)'s Gaussian (with an IAF posterior,
        its base Gaussian's).

        Image i is observed as `vaelab.score.encode` and evaluation observe it: with the draws
        keyed by (seed, i) where the likelihood draws (a Bernoulli's binarization). For what the
        model sees already (VAE.observe's x), use encode_observed."""
        images = stored(images, self.config.image_shape).to(self.device)
        index = torch.arange(len(images), device=self.device)
        return self.encode_observed(self.observe(images, image_keys(seed, "observe", index)))

    def encode_observed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) or flat (N, D), float32 as the model sees it (VAE.observe) -> mu,
        logvar: (N, z_dim) each (with an IAF posterior, its base Gaussian's)."""
        return self.encode_posterior(x)[:2]

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x, as the model sees it -> everything q(z|x) needs: (mu, logvar), and an IAF's
        context h (N, context)."""
        out = self.head(self.encoder(x.reshape(len(x), *self.config.image_shape)))
        if self.flow is None:
            return tuple(out.chunk(2, dim=-1))
        z_dim = self.config.z_dim
        return tuple(out.split([z_dim, z_dim, self.context], dim=-1))

    def decode(self, z: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """z: (..., z_dim) -> decoder output (..., C * channels, H, W), float32 (logits for a
        Bernoulli). vaelab's own decoders may take a workspace and hold lower-precision weights
        (evaluation's bf16): z is cast to them and the output back to float32."""
        flat = z.reshape(-1, z.shape[-1])
        if not self.own_decoder:
            return self.decoder(flat).reshape(*z.shape[:-1], *self.out_shape).float()
        dtype = next(self.decoder.parameters()).dtype
        out = self.decoder(flat.to(dtype), workspace)
        if dtype != torch.float32:
            out = (
                out.float()
                if workspace is None
                else workspace.get("out32", out.shape, z).copy_(out)
            )
        return out.view(*z.shape[:-1], *self.out_shape)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., z_dim) -> E[x|z]: (..., C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.decode(z))

    def forward(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        workspace: Workspace | None = None,
        posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
        components=None,
    ) -> Terms:
        """x: (N, C, H, W) observed images; eps: (S, N, noise_dim) standard normal noise.

        Returns the per-example terms for z_s = mu + sigma * eps_s (objectives.Terms), with a
        hierarchy's upper layers drawn from the rest of eps.
        posterior: encode_posterior(x), when the caller has it already (evaluation
        decodes one tile's samples in several calls); components: prior_components(), likewise
        (evaluation computes them once, a training step once per step).
        """
        mu, logvar, *context = self.encode_posterior(x) if posterior is None else posterior
        if self.hierarchy is not None:  # the noise of z_1, then of the layers above
            eps, upper_eps = eps.split(
                [self.config.z_dim, eps.shape[-1] - self.config.z_dim], dim=-1
            )
        z = reparametrize(mu, logvar, eps)
        log_det = upper = None
        if self.flow is not None:
            z, log_det = self.flow(z, context[0])
        z1 = z
        if self.hierarchy is not None:  # z: every layer's draws; z_1 read back from it
            z, upper = self.hierarchy.sample_up(z, upper_eps)
            z1 = upper.bottom(z)
        log_px_z = self.likelihood.log_prob(self.decode(z1, workspace), x, workspace)
        if self.analytic_kl:
            return Terms(
                log_px_z=log_px_z, kl=kl_normal(mu, logvar), z=z, eps=eps, logvar=logvar, mu=mu
            )
        # No closed form: the KL from the same draws; the prior's components once for the call.
        terms = Terms(
            log_px_z=log_px_z,
            kl=None,
            z=z,
            eps=eps,
            logvar=logvar,
            prior=self.prior,
            components=self.prior_components() if components is None else components,
            log_det=log_det,
            mu=mu,
            upper=upper,
        )
        return terms._replace(kl=(terms.log_qz - terms.log_pz).mean(0))

    @property
    def analytic_kl(self) -> bool:
        """Whether forward takes KL(q(z|x) || p(z)) in closed form (config.kl, where q and p
        have one) rather than from the draws."""
        return (self.config.kl == "analytic" and self.prior.analytic_kl and self.flow is None
                and self.hierarchy is None)

    def set_output_bias(self, images: torch.Tensor) -> str | None:
        """Set the decoder's output bias so that p(x|z) fits the images' statistics before any
        training (the likelihood's rule, likelihoods.Likelihood.output_bias): per value where
        the output layer is linear, per channel where it is a convolution.

        images: (N, C, H, W) uint8, the training split. Returns None, or why it cannot be done.
        """
        layer = nets.output_layer(self.decoder)
        bias = getattr(layer, "bias", None)
        channels = self.out_shape[0]
        values = math.prod(self.out_shape)
        if isinstance(layer, nn.Linear) and bias is not None and len(bias) == values:
            dims = (0,)
        elif (isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and bias is not None
              and len(bias) == channels):
            dims = (0, 2, 3)
        else:
            return (f"the decoder's last layer ({type(layer).__name__}) is not a linear layer with "
                    f"{values} outputs or a convolution with {channels} channels, each with a "
                    "bias")
        mean, std = pixel_moments(images, dims)
        with torch.no_grad():
            bias.copy_(self.likelihood.output_bias(mean, std).flatten())
        return None

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x -> (N, z_dim): mu, or with an IAF the flow applied to it (its draw at eps = 0)."""
        mu, logvar, *context = self.encode_posterior(x)
        return mu if self.flow is None else self.flow(mu.unsqueeze(0), context[0])[0].squeeze(0)

    def prior_components(self):
        """What log p(z) needs besides z, for one call or many (priors.Prior.components)."""
        return self.prior.components(self.encode_observed)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ p(z): (n, z_dim), with a hierarchy drawn down from its top layer.
        generator: a torch.Generator on the model's device, for draws that repeat; without one,
        fresh draws each call."""
        if generator is None:
            generator = torch.Generator(self.device)
            generator.seed()
        z = self.prior.sample(n, generator, self.encode_observed)
        return z if self.hierarchy is None else self.hierarchy.sample_down(z, generator)


def pixel_moments(images: torch.Tensor, dims: tuple[int, ...], rows: int = 4096
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of images / 255 over dims (0: per value; 0, 2, 3: per
    channel), kept as size-1 dimensions but the first, which goes: images (N, C, H, W) uint8 ->
    mean, std (C, H, W) or (C, 1, 1) float32. In float64, a block of rows at a time."""
    total = square = 0
    for start in range(0, len(images), rows):
        x = images[start:start + rows].to(torch.float64).div_(255)
        total = total + x.sum(dims, keepdim=True)
        square = square + x.square().sum(dims, keepdim=True)
    count = images.numel() / math.prod(total.shape)
    mean = total / count
    std = (square / count - mean.square()).clamp(min=0).sqrt()
    return mean[0].float(), std[0].float()


def initialise(model: VAE, init: str, output_init: str, images: torch.Tensor,
               seed: int) -> str | None:
    """Set a fresh model's weights in place by the run's recipe (config.INITS, OUTPUT_INITS):
    init "glorot" redraws the layers of the encoder, head, decoder and hierarchy, keyed by seed;
    output_init "data" sets the decoder's output bias from images (N, C, H, W) uint8, the
    training split. Returns None, or why the output bias could not be set."""
    if init == "glorot":
        generator = torch.Generator().manual_seed(seed)
        for net in (model.encoder, model.head, model.decoder, model.hierarchy):
            if net is not None:
                nets.glorot_(net, generator)
    return model.set_output_bias(images) if output_init == "data" else None


def build_model(config: ModelConfig, seed: int | None = None) -> VAE:
    """A freshly initialised VAE with vaelab's own networks; with a seed, the same weights
    every time."""
    if seed is None:
        return VAE.from_config(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return VAE.from_config(config)


# What a model from your own networks records: the components' options, no network's.
COMPONENT_OPTIONS = (
    "z_dim",
    "image_shape",
    "likelihood",
    "sigma",
    "prior",
    "prior_components",
    "posterior",
    "flow_steps",
    "kl",
)


def _custom_config(encoder: nn.Module, options: dict) -> ModelConfig:
    """The ModelConfig of a VAE from your own networks, every field counted as set (a preset
    never changes it); encoder_hidden records the encoder's feature size F."""
    wrong = sorted(set(options) - set(COMPONENT_OPTIONS))
    if wrong:
        raise VaelabError(
            f"{wrong[0]!r} is not an option of a VAE from your own networks; "
            f"give some of {', '.join(COMPONENT_OPTIONS)}"
        )
    if "z_dim" not in options:
        raise VaelabError("give z_dim, the size of the decoder's input")
    config = ModelConfig(architecture=CUSTOM, decoder_hidden=(), **options)
    config.validate()
    features = _dry_run(encoder, torch.zeros(1, *config.image_shape), "encoder")
    return ModelConfig.from_dict({**config.to_dict(), "encoder_hidden": (features.shape[-1],)})


def _context(config: ModelConfig) -> int:
    """The size of the context an IAF posterior takes from the encoder's head (0 without)."""
    return posteriors.context_size(config.z_dim) if config.posterior == "iaf" else 0


@torch.no_grad()
def _dry_run(net: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """net's output for one input x (zeros), in eval mode, with net's mode and RNG left alone."""
    parameter = next(net.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.device, parameter.dtype)
    training = net.training
    try:
        with torch.random.fork_rng(devices=[]):
            return net.eval()(x)
    except Exception as e:  # a user's module: say which of the two failed, and on what
        raise VaelabError(
            f"the {name} failed on an input of shape {tuple(x.shape)}: {type(e).__name__}: {e}"
        ) from None
    finally:
        net.train(training)
