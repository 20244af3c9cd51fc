"""The VAE, from components: an encoder, a posterior q(z|x) (posteriors.py), a prior p(z)
(priors.py), a decoder, and a likelihood (likelihoods.py) that turns the decoder's output into
p(x|z); the KL in closed form where the (posterior, prior) pair has one (kl.py).

    encoder: x (N, C, H, W) [, y] -> network -> features (N, F) -> linear head -> q's parameters
    decoder: z (..., z_dim) [, y] -> network on (M, z_dim) -> output (..., C * channels, H, W)

y is a conditioning tensor (N, ...), labels say, that a conditional model's networks and prior
read (`VAE.conditional`); an unconditional model is never given one, so it costs nothing.

The networks are vaelab's (`VAE.from_config`: MLPs on the flattened image, architecture "mlp",
or convolutional, "conv", nets.ConvEncoder and nets.ConvDecoder) or your own `nn.Module`s
(`VAE(encoder, decoder, z_dim=...)`, architecture "custom").

`VAE.forward(x, eps[, y])` returns the per-example terms every objective needs
(objectives.Terms), so whatever wraps the module (DDP, graph capture) wraps the loss. Callers
(evaluation, score, gap, the plots) ask the model, never its components' internals:
`posterior_params`, `latent_means`, `kl_per_dim`, `posterior_mean`, `sample_prior`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kl, likelihoods, nets, posteriors, priors
from .families import FAMILIES
from .config import ARCHITECTURES, CUSTOM, PRESETS, ModelConfig, preset  # noqa: F401  (re-exported)
from .config import EVAL_SEED
from .errors import VaelabError
from .images import stored
from .nets import MLP, ConvDecoder, ConvEncoder, ImageMLP, Workspace, conv_check
from .objectives import Terms
from .rng import image_keys


class Model(nn.Module):
    """What every model family gives the code that trains, evaluates and shows it, beside
    `forward(x, eps, ...) -> objectives.Terms`, `posterior_params`, `posterior_mean`, `decode`,
    `decode_mean` and `sample_prior` (see VAE):

    - `conditional`: whether it reads labels y (then `checked_labels`, `label_number`);
    - `capturable`: whether its training step may be captured as a CUDA graph;
    - `estimate`: how evaluation estimates log p(x): "importance sampling" of z
      (sampling.importance_sampled), or "bound", the family's own upper bound on -log p(x);
    - `has_active_units`: whether the test pass counts active units (of `test_unit_means`);
    - `kl_per_layer`: whether evaluation reports the KL of each layer, from the draws;
    - `top_down`: whether it gives `reconstruct_top` and draws at a temperature;
    - `networks()`: the modules an initialisation scheme redraws;
    - `epoch_metrics()`: what it records of each training epoch (a codebook's use, say);
    - `check(config)`: the run options (a RunConfig) it refuses, in one line.
    """

    conditional = False
    capturable = True
    estimate = "importance sampling"
    has_active_units = True
    kl_per_layer = False  # whether its terms' kl_per_dim holds each layer's KL (N, L)
    default_k = 5000  # importance samples per image that `vaelab evaluate` draws by default
    top_down = False  # whether it can reconstruct from its top layers (reconstruct_top)
    fits_posterior = True  # whether `vaelab gap` can fit each image's q (posterior_params)
    posterior_mean_note: str | None = None  # what latent_means gives, where not E_q[z]
    config: ModelConfig

    @classmethod
    def variant(cls, config: ModelConfig) -> type["Model"]:
        """The class of this family that config builds."""
        return cls

    @classmethod
    def check(cls, config) -> None:
        """Raise VaelabError where the run (a RunConfig) asks for what this family cannot do."""

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.parameters()).device

    def generator(self, generator: torch.Generator | None = None) -> torch.Generator:
        """generator, or without one a fresh generator on the model's device, seeded anew: draws
        that differ from call to call."""
        if generator is None:
            generator = torch.Generator(self.device)
            generator.seed()
        return generator

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, C, H, W) or flat, uint8 or floats in [0, 1] (images.stored) -> what the
        model sees, x: (N, C, H, W) float32 (see likelihoods). keys: (N,) one per image, for
        the likelihoods that draw (rng.image_keys)."""
        return self.likelihood.observe(stored(images, self.config.image_shape), keys)

    def encode(self, images: torch.Tensor, y: torch.Tensor | None = None, *,
               seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, C, H, W) or flat (N, C * H * W), uint8 or floats in [0, 1] (one meaning:
        images.stored) -> mu, logvar: (N, units) each, q's Gaussian (Model.gaussian: q(z|x)'s,
        with an IAF posterior its base Gaussian's; a top-down hierarchy's every layer). y: the
        images' labels (N,), for a conditional model.

        Image i is observed as `vaelab.score.encode` and evaluation observe it: with the draws
        keyed by (seed, i) where the likelihood draws (a Bernoulli's binarization). For what the
        model sees already (Model.observe's x), use encode_observed."""
        images = stored(images, self.config.image_shape).to(self.device)
        index = torch.arange(len(images), device=self.device)
        x = self.observe(images, image_keys(seed, "observe", index))
        return self.encode_observed(x, y)

    def encode_observed(self, x: torch.Tensor,
                        y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) or flat (N, D), float32 as the model sees it (Model.observe) -> mu,
        logvar: (N, units) each, as encode gives them."""
        return self.gaussian(self.posterior_params(x, y))

    def networks(self) -> list[nn.Module]:
        """The modules whose layers an initialisation scheme (models.initialise) redraws."""
        return [self.encoder, self.decoder]

    def test_unit_means(self, q: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """What the test pass counts active units over, from q's parameters (posterior_params):
        (N, units) the first columns of latent_means (z_1's closed-form E_q[z_1]; a top-down
        hierarchy's every layer), or where it has none q's first parameter (a flow's base
        Gaussian's mu)."""
        mean = self.latent_means(q)
        return q[0] if mean is None else mean[:, :self.units]

    @property
    def units(self) -> int:
        """The columns of test_unit_means, and of encode's mu and logvar."""
        return self.config.z_dim

    def gaussian(self, q: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """q's Gaussian from posterior_params' output: mu, logvar (N, units) each (with an IAF
        posterior, its base Gaussian's)."""
        return q[0], q[1]

    def epoch_metrics(self) -> dict:
        """What the model records of the training epoch just ended, for metrics.jsonl."""
        return {}

    @property
    def can_sample(self) -> bool:
        """Whether sample_prior can draw (a VQ-VAE's needs its learned prior)."""
        return True

    @property
    def plane(self) -> bool:
        """Whether its decoder reads a 2-D code, which the manifold and latent-plane figures
        and the report's explorer draw."""
        return False

    def second_stage(self) -> nn.Module | None:
        """A fresh module of what is trained after the run, from its codes (a VQ-VAE's prior
        over them), which load_run fills from RUN/prior; None for a model without one."""
        return None

    def attach(self, stage: nn.Module | None) -> None:
        """Use a trained second stage (second_stage's module with its weights)."""

    def decoder_layers(self) -> dict | None:
        """The decoder as plain data (nets.decoder_layers), where it is one of vaelab's own and
        reads z alone; None otherwise."""
        return None

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

    def label_number(self, label: str | int) -> int:
        """A conditional model's label given by class name or number (a name first: MNIST's "3"
        is both) -> its number. VaelabError for an unknown one, or a model without labels."""
        classes = self.config.classes
        if not self.conditional:
            raise VaelabError("this run's model is not conditional: it takes no --label")
        if str(label) in classes:
            return classes.index(str(label))
        if str(label).isdigit() and int(label) < len(classes):
            return int(label)
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise VaelabError(f"unknown label {label!r}; the model's classes are {shown} (or their"
                          f" numbers 0 to {len(classes) - 1})")

    def checked_labels(self, labels: torch.Tensor | None, what: str = "the images"
                       ) -> torch.Tensor | None:
        """The labels (N,) a conditional model reads of `what`, checked to lie below its
        classes; None for any other model. VaelabError where they are missing or out of range."""
        if not self.conditional:
            return None
        if labels is None:
            raise VaelabError(f"this model is conditional and {what} have no labels: give them"
                              " labels (or --label)")
        bad = labels[(labels < 0) | (labels >= len(self.config.classes))]
        if len(bad):
            raise VaelabError(f"{what} have the label {int(bad[0])}, but the model knows"
                              f" {len(self.config.classes)} classes, 0 to"
                              f" {len(self.config.classes) - 1}")
        return labels


class VAE(Model):
    """A VAE from components: an encoder x -> features, a linear head features -> the
    posterior's parameters, a posterior, a prior, a decoder z -> the likelihood's parameters,
    and the likelihood.

    `VAE(encoder, decoder, z_dim=..., ...)` takes your own networks: any `nn.Module`s with
        encoder: x (N, C, H, W) float [, y] -> features (N, F)
        decoder: z (M, z_dim) [, y] -> (M, C * m, H, W) or (M, C * m * H * W), m the
                 likelihood's `channels` (1, or 2 for gaussian-learned)
    vaelab adds the linear head features -> q(z|x)'s parameters, reading F from one dry run of
    the encoder on an image of zeros, and flattens and restores z's leading dimensions around
    the decoder. The other keywords are ModelConfig's component fields: image_shape,
    likelihood, sigma, prior, prior_components, posterior, flow_steps, kl. The model's `config`
    then records architecture "custom", and `load_run(run, encoder=..., decoder=...)` rebuilds
    it from the same modules.

    `VAE.from_config(config)` builds vaelab's own networks (a preset's MLP or conv nets).
    A subclass with `conditional = True` is given y, the images' labels (N,) int64, in
    training, the test pass, evaluation and every command, and passes it to its networks
    (as a second argument) and its prior.
    """

    @classmethod
    def variant(cls, config: ModelConfig) -> type["VAE"]:
        return ConditionalVAE if config.conditional else VAE

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
            options = {**options, "conditional": self.conditional}
            config = _custom_config(encoder, options, self._dry_y())
        elif options:
            raise VaelabError(
                "give the model's options in config or as keywords, not both "
                f"({', '.join(sorted(options))})"
            )
        if config.conditional != self.conditional:
            raise VaelabError(f"config.conditional is {config.conditional}, but a"
                              f" {type(self).__name__} is{'' if self.conditional else ' not'}"
                              " conditional: build it with models.model_class(config)")
        config.validate()
        self.config = config
        self.likelihood = likelihoods.for_model(config)
        c, h, w = config.image_shape
        self.out_shape = (self.likelihood.out_channels(c), h, w)
        features = _dry_run(encoder, torch.zeros(1, *config.image_shape), "encoder", self._dry_y())
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
        out = _dry_run(decoder, torch.zeros(1, config.z_dim), "decoder", self._dry_y())
        if tuple(out.shape) not in ((1, *self.out_shape), (1, math.prod(self.out_shape))):
            raise VaelabError(
                f"the decoder maps z (1, {config.z_dim}) to shape {tuple(out.shape)}; the "
                f"{config.likelihood} likelihood needs (1, {', '.join(map(str, self.out_shape))})"
            )
        kind = posteriors.POSTERIORS[config.posterior]
        head_size = kind.head_size(config.z_dim)
        # Registered in this order (encoder, head, decoder, prior, posterior): optimizer
        # checkpoints list parameters by position.
        self.encoder = encoder
        self.head = nn.Linear(features.shape[1], head_size) if head is None else head
        if (self.head.in_features, self.head.out_features) != (features.shape[1], head_size):
            raise VaelabError("the head does not fit the encoder's features and the posterior")
        self.decoder = decoder
        # Evaluation's workspaces, bf16 decoding and sizing by layer are capabilities of
        # vaelab's own decoders; any other module runs plainly, in float32.
        self.own_decoder = isinstance(decoder, (MLP, ConvDecoder))
        # Made in the order they were added to vaelab (prior, flow, upper layers): a seed gives
        # the weights it always gave.
        sizes = (config.z_dim, *config.upper_z_dims)
        prior = priors.make(config.prior, sizes[-1], config)
        if config.upper_z_dims:  # the layers above z_1: a posterior and prior sharing them
            posterior = posteriors.Hierarchical(sizes, config.upper_hidden, config.activation)
            prior = priors.Hierarchical(prior, posterior.layers)
        else:
            posterior = kind.from_config(config)
        self.prior, self.posterior = prior, posterior
        self._closed_form = kl.closed_form(posterior, prior)
        self.register_load_state_dict_pre_hook(_renamed_keys)

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
        c, h, w = config.image_shape
        out_channels = likelihoods.for_model(config).out_channels(c)
        labels = len(config.classes) if cls.conditional else 0  # one-hot columns beside inputs
        if cls.conditional and not labels:
            raise VaelabError("a conditional model needs its classes (config.classes, known from "
                              "the data)")
        # Made in this order, encoder, head, decoder: a seed gives the weights it always gave.
        if config.architecture == "conv":
            encoder = ConvEncoder(config.image_shape, config.conv_channels, config.encoder_hidden,
                                  config.activation, labels)
        else:
            encoder = ImageMLP([config.x_dim, *config.encoder_hidden], config.activation,
                               final_activation=True, labels=labels)
        # All of q's parameters come from one linear layer: one GEMM, not two.
        head_size = posteriors.POSTERIORS[config.posterior].head_size(config.z_dim)
        head = nn.Linear(config.encoder_hidden[-1], head_size)
        if config.architecture == "conv":
            decoder = ConvDecoder(
                config.z_dim,
                config.image_shape,
                config.conv_channels,
                config.decoder_hidden,
                config.activation,
                out_channels,
                labels,
            )
        else:
            decoder = MLP([config.z_dim, *config.decoder_hidden, out_channels * h * w],
                          config.activation, labels=labels)
        return cls(encoder, decoder, config, head=head)

    def _dry_y(self) -> torch.Tensor | None:
        """The conditioning of one example for the networks' dry runs (a conditional model's)."""
        return torch.zeros(1, dtype=torch.int64) if self.conditional else None

    @property
    def noise_dim(self) -> int:
        """Standard normals one draw of z needs: the posterior's (every stochastic layer's)."""
        return self.posterior.noise_dim

    @property
    def sizes(self) -> tuple[int, ...]:
        """Each stochastic layer's size, the decoder's z_1 first: the columns of a draw z."""
        return self.posterior.sizes

    def posterior_params(self, x: torch.Tensor, y: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, ...]:
        """x, as the model sees it [, y] -> q(z|x)'s parameters, (N, ...) each, the first two a
        Gaussian's mu and logvar (posteriors.Posterior.params)."""
        x = x.reshape(len(x), *self.config.image_shape)
        features = self.encoder(x) if y is None else self.encoder(x, y)
        return self.posterior.params(self.head(features))

    def decode(self, z: torch.Tensor, workspace: Workspace | None = None, *,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (..., z_dim) [, y: labels broadcastable to z's leading dimensions (...), such as
        (N,) for z (S, N, z_dim)] -> decoder output (..., C * channels, H, W), float32 (logits
        for a Bernoulli). vaelab's own decoders may take a workspace and hold lower-precision
        weights (evaluation's bf16): z is cast to them and the output back to float32."""
        flat = z.reshape(-1, z.shape[-1])
        if y is not None:  # each row's label
            y = y.expand(z.shape[:-1]).reshape(len(flat))
        if not self.own_decoder:
            out = self.decoder(flat) if y is None else self.decoder(flat, y)
            return out.reshape(*z.shape[:-1], *self.out_shape).float()
        dtype = next(self.decoder.parameters()).dtype
        out = self.decoder(flat.to(dtype), y, workspace)
        if dtype != torch.float32:
            out = (
                out.float()
                if workspace is None
                else workspace.get("out32", out.shape, z).copy_(out)
            )
        return out.view(*z.shape[:-1], *self.out_shape)

    def decode_mean(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z: (..., z_dim) -> E[x|z]: (..., C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.decode(z, y=y))

    def forward(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        workspace: Workspace | None = None,
        posterior: tuple[torch.Tensor, ...] | None = None,
        components=None,
        *,
        y: torch.Tensor | None = None,
        fixed_q: bool = False,
    ) -> Terms:
        """x: (N, C, H, W) observed images; eps: (S, N, noise_dim) standard normal noise;
        y: their conditioning (N, ...), for a conditional model.

        Returns the per-example terms of the draws z_s the posterior makes from eps_s
        (objectives.Terms): the KL in closed form where the (posterior, prior) pair has one and
        config.kl is "analytic", else from the draws.
        posterior: posterior_params(x, y), when the caller has them already (evaluation
        decodes one tile's samples in several calls); components: prior_components(y), likewise
        (evaluation computes them once, a training step once per step). fixed_q: log q(z|x)
        with q's parameters held fixed, the gradient reaching q through z only (STL and DReG),
        and the KL then from the draws.
        """
        q = self.posterior_params(x, y) if posterior is None else posterior
        closed = None if fixed_q or self.config.kl != "analytic" else self._closed_form
        if closed is not None:
            z = self.posterior.sample(q, eps)
            log_qz = lambda: self.posterior.rsample(q, eps)[1]  # noqa: E731  (asked rarely)
        elif fixed_q:
            z = self.posterior.sample(q, eps)
            log_qz = self.posterior.log_prob(z, q, fixed=True)
        else:
            z, log_qz = self.posterior.rsample(q, eps)
        log_px_z = self.likelihood.log_prob(
            self.decode(self.posterior.decoded(z), workspace, y=y), x, workspace)
        if closed is not None:
            per_dim = closed(self.posterior, self.prior, q, components, y)
            return Terms(log_px_z, per_dim.sum(-1), z, log_qz, lambda: self._log_pz(z, components, y),
                         per_dim)
        # No closed form: the KL from the same draws; the prior's components once for the call.
        if components is None:
            components = self.prior_components(y)
        return Terms(log_px_z, None, z, log_qz, self._log_pz(z, components, y),
                     self._kl_per_dim(q, components, y))

    def _log_pz(self, z: torch.Tensor, components, y) -> torch.Tensor:
        if components is None:
            components = self.prior_components(y)
        return self.prior.log_prob(z, components, y)

    def _kl_per_dim(self, q, components, y) -> torch.Tensor | None:
        if self._closed_form is None:
            return None
        return self._closed_form(self.posterior, self.prior, q, components, y)

    def draw_footprint(self) -> tuple[int, int, int]:
        """What one decoded draw of z costs, for evaluation to size its calls by: the values the
        decoder makes across its layers (vaelab's own decoders count them; any other is taken
        to make four outputs' worth, a guess but a fixed one, so the chunking and with it the
        per-image values stay the same), the bytes of each (the decoder's dtype: bf16 in
        evaluation), and the bytes the prior's log-density makes (a mixture's temporaries)."""
        floats = (self.decoder.row_floats if self.own_decoder
                  else 4 * math.prod(self.out_shape))
        itemsize = next(self.decoder.parameters()).dtype.itemsize
        return floats, itemsize, self.prior.row_bytes

    def kl_per_dim(self, q: tuple[torch.Tensor, ...], y: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
        """Each latent dimension's KL(q(z_d|x) || p(z_d)) in closed form, (N, z_dim) nats, for
        q's parameters (posterior_params); None where the pair has none (kl.py)."""
        return self._kl_per_dim(q, None, y)

    def kl_per_dim_note(self) -> str | None:
        """Why kl_per_dim is None for this model (None where it is defined)."""
        if self._closed_form is not None:
            return None
        if len(self.sizes) > 1:
            return "the layers of a hierarchy depend on each other"
        if kl.closed_form(posteriors.Gaussian(1), self.prior) is None:
            return f"the {self.config.prior} prior does not factorize over dimensions"
        name = self.config.posterior
        return f"an {name.upper() if len(name) <= 4 else name} posterior does not factorize " \
               "over dimensions"

    def latent_means(self, q: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """E_q[z] in closed form, (N, m) for the first m = latent_mean_columns <= noise_dim
        columns of z (z_1's mu of a hierarchy), or None where it has none (a flow): the caller
        averages draws for the rest."""
        return self.posterior.mean(q) if self.latent_mean_columns else None

    @property
    def latent_mean_columns(self) -> int:
        """How many first columns of z latent_means gives (0: none)."""
        return self.posterior.mean_columns

    @property
    def analytic_kl(self) -> bool:
        """Whether forward takes the KL in closed form (config.kl "analytic", and the pair
        (posterior, prior) has one)."""
        return self.config.kl == "analytic" and self._closed_form is not None

    @property
    def plane(self) -> bool:
        return self.config.z_dim == 2

    def decoder_layers(self) -> dict | None:
        if self.conditional or not self.likelihood.sigmoid_mean:
            return None
        return nets.decoder_layers(self.decoder)

    def networks(self) -> list[nn.Module]:
        # a hierarchy's layers too: Burda et al.'s recipe draws them as the networks
        upper = getattr(self.posterior, "layers", None)
        return [self.encoder, self.head, self.decoder, *([upper] if upper is not None else [])]

    def posterior_mean(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [, y] -> (N, z_dim) the code the decoder reads: q's mean, or with a flow its draw
        at eps = 0 (posteriors.Posterior.point)."""
        return self.posterior.decoded(self.posterior.point(self.posterior_params(x, y)))

    def prior_components(self, y: torch.Tensor | None = None):
        """What log p(z) needs besides z, for one call or many (priors.Prior.components)."""
        return self.prior.components(self.encode_observed, y)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None,
                     y: torch.Tensor | None = None) -> torch.Tensor:
        """n draws z ~ p(z [| y]) as the decoder reads them: (n, z_dim), with upper layers drawn
        down from the top one. generator: a torch.Generator on the model's device, for draws that
        repeat; without one, fresh draws each call. y: (n, ...) for a conditional model."""
        generator = self.generator(generator)
        return self.posterior.decoded(self.prior.sample(n, generator, self.encode_observed, y))


class ConditionalVAE(VAE):
    """A conditional VAE (Sohn et al. 2015): q(z|x, y), p(x|z, y) and p(z) or p(z|y) (--prior
    per-class), for y an image's label (N,) int64 below len(config.classes).

    vaelab's networks read y as one-hot columns beside their first dense layer's input (nets);
    your own `ConditionalVAE(encoder, decoder, z_dim=..., classes=...)` networks are called as
    encoder(x, y) and decoder(z, y) with the labels themselves, to embed as they like. Its bound
    is on log p(x|y): evaluation, score and the gap report the conditional log-likelihood."""

    conditional = True


FAMILIES.register("vae", VAE)


def model_class(config: ModelConfig) -> type[Model]:
    """The model class config describes: its family's (families.FAMILIES), and of the VAE's,
    ConditionalVAE where config.conditional."""
    return FAMILIES[config.family].variant(config)


def _renamed_keys(module, state_dict, prefix, *args) -> None:
    """Load a state dict saved before the posterior was a component: the IAF's weights were
    `flow.*`, the upper layers `hierarchy.*` beside a prior that is now their top (`prior.top.*`).
    Renamed in place; the parameters' order was, and is, the same."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    upper = any(k.startswith(prefix + "hierarchy.") for k in keys)
    for key in keys:
        rest = key[len(prefix):]
        for old, new in (("flow.", "posterior."), ("hierarchy.", "posterior.layers."),
                         *((("prior.", "prior.top."),) if upper else ())):
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


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


def initialise(model: Model, init: str, output_init: str, images: torch.Tensor,
               seed: int) -> str | None:
    """Set a fresh model's weights in place by the run's recipe (config.INITS, OUTPUT_INITS):
    init "glorot" redraws the layers of its networks (Model.networks: a VAE's encoder, head,
    decoder and hierarchy), keyed by seed; output_init "data" sets the decoder's output bias
    from images (N, C, H, W) uint8, the training split. Returns None, or why the output bias
    could not be set."""
    if init == "glorot":
        generator = torch.Generator().manual_seed(seed)
        for net in model.networks():
            nets.glorot_(net, generator)
    return model.set_output_bias(images) if output_init == "data" else None


def build_model(config: ModelConfig, seed: int | None = None) -> Model:
    """A freshly initialised VAE with vaelab's own networks; with a seed, the same weights
    every time."""
    if seed is None:
        return model_class(config).from_config(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return model_class(config).from_config(config)


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
    "classes",
)


def _custom_config(encoder: nn.Module, options: dict, y: torch.Tensor | None) -> ModelConfig:
    """The ModelConfig of a VAE from your own networks, every field counted as set (a preset
    never changes it); encoder_hidden records the encoder's feature size F."""
    wrong = sorted(set(options) - {*COMPONENT_OPTIONS, "conditional"})
    if wrong:
        raise VaelabError(
            f"{wrong[0]!r} is not an option of a VAE from your own networks; "
            f"give some of {', '.join(COMPONENT_OPTIONS)}"
        )
    if "z_dim" not in options:
        raise VaelabError("give z_dim, the size of the decoder's input")
    config = ModelConfig(architecture=CUSTOM, decoder_hidden=(), **options)
    config.validate()
    features = _dry_run(encoder, torch.zeros(1, *config.image_shape), "encoder", y)
    return ModelConfig.from_dict({**config.to_dict(), "encoder_hidden": (features.shape[-1],)})


@torch.no_grad()
def _dry_run(net: nn.Module, x: torch.Tensor, name: str,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """net's output for one input x (zeros) [and y], in eval mode, with net's mode and RNG left
    alone."""
    parameter = next(net.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.device, parameter.dtype)
    training = net.training
    try:
        with torch.random.fork_rng(devices=[]):
            return net.eval()(x) if y is None else net.eval()(x, y.to(x.device))
    except Exception as e:  # a user's module: say which of the two failed, and on what
        raise VaelabError(
            f"the {name} failed on an input of shape {tuple(x.shape)}: {type(e).__name__}: {e}"
        ) from None
    finally:
        net.train(training)
