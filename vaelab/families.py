"""Model families by name (`--model`, ModelConfig.family): each a class of its own module
(models.VAE, vq.VQVAE) that registers itself here, as a component does in its registry.

    FAMILIES.register("vq-vae", VQVAE)

A family's class knows which of its classes a config builds (`variant`: the conditional VAE
for `--conditional`), the run options it refuses (`check`), and how evaluation estimates its
log-likelihood (`estimate`). `vaelab` imports every family's module, so each name is known
once the package is."""

from __future__ import annotations

from .registry import Registry

FAMILIES = Registry("model")
