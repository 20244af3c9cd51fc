"""The VAE: a Gaussian recognition model q(z|x), a standard normal prior p(z) and a
decoder whose output a likelihood object (likelihoods.py) turns into p(x|z).

    encoder: x (N, C, H, W) -> network -> one linear head -> mu, logvar (N, z_dim)
    decoder: z (..., z_dim) -> network -> output (..., C * channels, H, W)

The networks are MLPs on the flattened image (architecture "mlp") or convolutional
(architecture "conv"; nets.ConvEncoder and nets.ConvDecoder).

`VAE.forward(x, eps)` returns the per-example terms every objective needs
(objectives.Terms), so whatever wraps the module (DDP, graph capture) wraps the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import likelihoods, posteriors, priors
from .config import ARCHITECTURES, PRESETS, ModelConfig, preset  # noqa: F401  (re-exported)
from .errors import VaelabError
from .nets import MLP, ConvDecoder, ConvEncoder, Workspace, conv_check
from .objectives import Terms, kl_normal, reparametrize


class VAE(nn.Module):
    """A Gaussian-latent VAE with MLP or conv encoder and decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        # The image shape is known once the data is (a config is validated before that).
        problem = (
            conv_check(config.image_shape, config.conv_channels)
            if config.architecture == "conv"
            else None
        )
        if problem:
            raise VaelabError(problem)
        self.config = config
        self.likelihood = likelihoods.make(config.likelihood, config.sigma)
        c, h, w = config.image_shape
        self.out_shape = (c * self.likelihood.channels, h, w)
        # Registered in this order (encoder, head, decoder, then prior and flow): optimizer
        # checkpoints list parameters by position.
        conv = config.architecture == "conv"
        self.encoder = (
            ConvEncoder(
                config.image_shape, config.conv_channels, config.encoder_hidden, config.activation
            )
            if conv
            else MLP(
                [config.x_dim, *config.encoder_hidden], config.activation, final_activation=True
            )
        )
        # mu and logvar (and an IAF's context) come from one linear layer: one GEMM, not two.
        self.context = posteriors.context_size(config.z_dim) if config.posterior == "iaf" else 0
        self.head = nn.Linear(config.encoder_hidden[-1], 2 * config.z_dim + self.context)
        self.decoder = (
            ConvDecoder(
                config.z_dim,
                config.image_shape,
                config.conv_channels,
                config.decoder_hidden,
                config.activation,
                self.out_shape[0],
            )
            if conv
            else MLP(
                [config.z_dim, *config.decoder_hidden, math.prod(self.out_shape)], config.activation
            )
        )
        # After the networks: a learned prior's parameters come last in the optimizer's list.
        self.prior = priors.make(
            config.prior, config.z_dim, config.prior_components, config.image_shape
        )
        self.flow = (
            posteriors.IAF(config.z_dim, config.flow_steps) if config.posterior == "iaf" else None
        )

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.head.weight.device

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Stored images (N, C, H, W) uint8 -> what the model sees, float32 (see likelihoods)."""
        return self.likelihood.observe(images, keys)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) or flat (N, D), float -> mu, logvar: (N, z_dim) each (with an IAF
        posterior, its base Gaussian's)."""
        return self.encode_posterior(x)[:2]

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x -> everything q(z|x) needs: (mu, logvar), and an IAF's context h (N, context)."""
        out = self.head(self.encoder(x.reshape(len(x), -1)))  # conv: reshaped back
        if self.flow is None:
            return tuple(out.chunk(2, dim=-1))
        z_dim = self.config.z_dim
        return tuple(out.split([z_dim, z_dim, self.context], dim=-1))

    def decode(self, z: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """z: (..., z_dim) -> decoder output (..., C * channels, H, W), float32 (logits for a
        Bernoulli). The decoder may hold lower-precision weights (evaluation's bf16);
        z is cast to them and the output back to float32."""
        dtype = next(self.decoder.parameters()).dtype
        out = self.decoder(z.to(dtype), workspace)
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
        """x: (N, C, H, W) observed images; eps: (S, N, z_dim) standard normal noise.

        Returns the per-example terms for z_s = mu + sigma * eps_s (objectives.Terms).
        posterior: encode_posterior(x), when the caller has it already (evaluation
        decodes one tile's samples in several calls); components: prior_components(), likewise
        (evaluation computes them once, a training step once per step).
        """
        mu, logvar, *context = self.encode_posterior(x) if posterior is None else posterior
        z = reparametrize(mu, logvar, eps)
        log_det = None
        if self.flow is not None:
            z, log_det = self.flow(z, context[0])
        log_px_z = self.likelihood.log_prob(self.decode(z, workspace), x, workspace)
        if self.prior.analytic_kl and self.flow is None:
            return Terms(log_px_z=log_px_z, kl=kl_normal(mu, logvar), z=z, eps=eps, logvar=logvar)
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
        )
        return terms._replace(kl=(terms.log_qz - terms.log_pz).mean(0))

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """x -> (N, z_dim): mu, or with an IAF the flow applied to it (its draw at eps = 0)."""
        mu, logvar, *context = self.encode_posterior(x)
        return mu if self.flow is None else self.flow(mu.unsqueeze(0), context[0])[0].squeeze(0)

    def prior_components(self):
        """What log p(z) needs besides z, for one call or many (priors.Prior.components)."""
        return self.prior.components(self.encode)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws z ~ p(z): (n, z_dim)."""
        return self.prior.sample(n, generator, self.encode)


def build_model(config: ModelConfig, seed: int | None = None) -> VAE:
    """A freshly initialised VAE; with a seed, the same weights every time."""
    if seed is None:
        return VAE(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return VAE(config)
