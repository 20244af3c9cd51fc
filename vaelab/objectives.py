"""The maths of the VAE, once. Every quantity is in nats, per example.

The model computes the terms (VAE.forward -> Terms); the objectives below are
pure functions of them, used alike by training, the test loss and evaluation.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .densities import (LOG_2PI, kl_normal, kl_normal_per_dim, log_normal,  # noqa: F401
                        log_normal_from_eps, log_standard_normal, reparametrize)
from .errors import VaelabError
from .posteriors import POSTERIORS
from .registry import Registry



class Terms:
    """What every objective needs of S draws z_s ~ q(z|x) of N examples, per example, in nats:

        log_px_z    (S, N) log p(x | z_s)
        kl          (N,) KL(q(z|x) || p(z)): in closed form where the (posterior, prior) pair has
                    one (kl.py), else the draws' mean of log q - log p
        z           (S, N, D) the draws (every stochastic layer's)
        log_qz      (S, N) log q(z_s | x)
        log_pz      (S, N) log p(z_s)
        kl_per_dim  (N, z_dim) each dimension's KL in closed form, or None where it has none
        penalty     (N,) a training term of the model's outside the bound (a VQ-VAE's
                    commitment loss), which training adds and the bounds leave out; or None

    log_qz and log_pz may be given as functions, computed when first asked: the ELBO with a
    closed-form KL never asks, so training on it launches none of their kernels.
    """

    def __init__(self, log_px_z: torch.Tensor, kl: torch.Tensor | None, z: torch.Tensor,
                 log_qz: torch.Tensor | Callable[[], torch.Tensor],
                 log_pz: torch.Tensor | Callable[[], torch.Tensor],
                 kl_per_dim: torch.Tensor | None = None, penalty: torch.Tensor | None = None):
        self.log_px_z, self.z, self.kl_per_dim, self.penalty = log_px_z, z, kl_per_dim, penalty
        self._log_qz, self._log_pz = log_qz, log_pz
        self.kl = (self.log_qz - self.log_pz).mean(0) if kl is None else kl

    @property
    def log_qz(self) -> torch.Tensor:
        if callable(self._log_qz):
            self._log_qz = self._log_qz()
        return self._log_qz

    @property
    def log_pz(self) -> torch.Tensor:
        if callable(self._log_pz):
            self._log_pz = self._log_pz()
        return self._log_pz

    def replace(self, **changes) -> "Terms":
        """A copy with some of the fields changed."""
        fields = dict(log_px_z=self.log_px_z, kl=self.kl, z=self.z, log_qz=self._log_qz,
                      log_pz=self._log_pz, kl_per_dim=self.kl_per_dim, penalty=self.penalty)
        return Terms(**{**fields, **changes})


def log_weights(terms: Terms) -> torch.Tensor:
    """Importance weights log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x): (S, N) nats."""
    return terms.log_px_z + terms.log_pz - terms.log_qz


def negative_elbo(terms: Terms, kl_weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """-ELBO = -(1/S) sum_s log p(x|z_s) + KL(q(z|x) || p(z)): (N,) nats, the KL as the terms
    hold it (analytic where the prior allows).

    kl_weight (beta, a float or a 0-d tensor) weights the KL term, giving the beta-VAE
    objective, which is not a bound on log p(x) unless beta is 1; None is the ELBO itself.
    """
    kl = terms.kl if kl_weight is None else kl_weight * terms.kl
    return kl - terms.log_px_z.mean(0)


def free_bits_negative_elbo(terms: Terms, free_bits: float,
                            kl_weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """The batch's mean negative ELBO with free bits (Kingma et al. 2016): each dimension's KL,
    averaged over the batch, counts as at least free_bits nats, so that a KL below it earns
    nothing. Where the KL has no closed form per dimension (terms.kl_per_dim is None), the whole
    KL counts as at least free_bits x its dimensions. Not a bound on log p(x): a 0-d training
    objective only. kl_weight: as in negative_elbo."""
    per_dim = terms.kl_per_dim
    if per_dim is None:
        kl = terms.kl.mean().clamp(min=free_bits * terms.z.shape[-1])
    else:
        kl = per_dim.mean(0).clamp(min=free_bits).sum()
    kl = kl if kl_weight is None else kl_weight * kl
    return kl - terms.log_px_z.mean(0).mean()


def negative_iwae(terms: Terms) -> torch.Tensor:
    """Negative importance-weighted bound of Burda et al. (2015) with k = S samples:
    -log (1/k) sum_s w_s, (N,) nats. With k = 1 it is the ELBO with a sampled KL."""
    k = terms.log_px_z.shape[0]
    return math.log(k) - torch.logsumexp(log_weights(terms), dim=0)


# Gradient estimators of the inference network's gradient. reparam: the plain reparameterized
# gradient of the objective. stl, "sticking the landing" (Roeder et al. 2017): log q(z|x) with q's
# parameters held fixed, so the score term, zero in expectation, drops out; unbiased for the ELBO
# (whose KL is then taken from the draws), biased for the IWAE bound. dreg, the doubly
# reparameterized gradient of the IWAE bound (Tucker et al. 2018): the same, with the gradient
# reaching q through each draw z_s weighted once more by its normalized weight, which makes it
# unbiased. The generative network's gradient is the objective's own under all three.
ESTIMATORS = ("reparam", "stl", "dreg")


def dreg_weighted(terms: Terms) -> Terms:
    """The terms (made with q's parameters held fixed) with DReG's reweighting: a hook on z
    multiplies the gradient reaching each draw z_s by its normalized importance weight, so one
    backward pass gives the doubly reparameterized gradient. What does not flow through z keeps
    its ordinary gradient: the decoder's and a learned prior's parameters, and a VampPrior's
    dependence on the encoder through its pseudo-inputs' posteriors."""
    weights = torch.softmax(log_weights(terms).detach(), dim=0).unsqueeze(-1)  # (S, N, 1)
    if terms.z.requires_grad:
        terms.z.register_hook(lambda grad: grad * weights)
    return terms


class Objective:
    """A training objective, made from the run's config (a RunConfig, read by field):

    - `samples`: draws of z per image in a training step;
    - `fixed_q`: whether the model's forward holds q's parameters fixed in log q (the gradient
      estimator's choice, config.estimator);
    - `loss(terms, kl_weight)`: the 0-d loss of a batch (kl_weight: None, or a 0-d tensor that
      a KL warm-up or beta sets);
    - `test_passes()`: the test values each epoch records, as (samples, {name: terms -> (N,)});
    - `check(config)`: a one-line error where the config does not fit it;
    - `epoch_line(record)`, `summary(record)`: what training prints.
    """

    def __init__(self, config):
        self.config = config
        self.estimator = config.estimator
        self.fixed_q = config.estimator != "reparam"
        self.samples = config.samples

    @classmethod
    def check(cls, config) -> None:
        posterior = config.model.posterior
        if config.estimator != "reparam" and not POSTERIORS[posterior].has_log_prob:
            raise VaelabError(f"--estimator {config.estimator} evaluates log q(z|x) with q's "
                              f"parameters held fixed, which needs the inverse of --posterior "
                              f"{posterior}; use --posterior gaussian")

    @staticmethod
    def refuse_kl_weighting(config, name: str) -> None:
        """For a bound without the ELBO's KL term (named name): refuse the options that weight
        that term (config.weighted)."""
        if config.weighted:
            raise VaelabError("--beta, --kl-warmup and --free-bits act on the ELBO's KL term, "
                              f"which the {name} bound does not have; leave them out with "
                              f"--objective {name}")

    def loss(self, terms: Terms, kl_weight: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def test_passes(self) -> list[tuple[int, dict[str, Callable[[Terms], torch.Tensor]]]]:
        """The ELBO's test values, from the run's samples: every objective records them."""
        return [(self.config.samples, {"test_loss": negative_elbo, "test_kl": lambda t: t.kl})]

    def epoch_line(self, record: dict) -> str:
        return (f"epoch {record['epoch']:3d}  train {record['train_loss']:8.3f}  test"
                f" {record['test_loss']:8.3f} nats  ({record['seconds']:.1f} s)")

    def summary(self, record: dict) -> str:
        return f"test negative ELBO after {_epochs(record)}: {record['test_loss']:.2f} nats per image"


def _epochs(record: dict) -> str:
    return f"{record['epoch']} epoch{'' if record['epoch'] == 1 else 's'}"


OBJECTIVES = Registry("objective")


@OBJECTIVES.register("elbo")
class Elbo(Objective):
    """The negative ELBO with L = config.samples draws, its KL weighted by beta (and a warm-up),
    with free bits where config.free_bits is set."""

    def __init__(self, config):
        super().__init__(config)
        self.free_bits = config.free_bits

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        if config.estimator == "dreg":
            raise VaelabError("--estimator dreg is the gradient of the iwae bound: add "
                              "--objective iwae, or use --estimator stl for the ELBO")

    def loss(self, terms: Terms, kl_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.free_bits:
            loss = free_bits_negative_elbo(terms, self.free_bits, kl_weight)
        else:
            loss = negative_elbo(terms, kl_weight).mean()
        return loss if terms.penalty is None else loss + terms.penalty.mean()


@OBJECTIVES.register("iwae")
class Iwae(Objective):
    """The negative IWAE bound of Burda et al. (2015) with k = config.k samples."""

    def __init__(self, config):
        super().__init__(config)
        self.k = self.samples = config.k

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        cls.refuse_kl_weighting(config, "iwae")

    def loss(self, terms: Terms, kl_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.estimator == "dreg":
            terms = dreg_weighted(terms)
        return negative_iwae(terms).mean()

    def test_passes(self):
        return [*super().test_passes(), (self.k, {"test_iwae": negative_iwae})]

    def epoch_line(self, record: dict) -> str:
        return (f"epoch {record['epoch']:3d}  negative IWAE bound (k={self.k}): train"
                f" {record['train_loss']:8.3f}  test {record['test_iwae']:8.3f};  test negative"
                f" ELBO {record['test_loss']:8.3f} nats  ({record['seconds']:.1f} s)")

    def summary(self, record: dict) -> str:
        return (f"test negative IWAE bound (k={self.k}) after {_epochs(record)}: "
                f"{record['test_iwae']:.2f} nats per image (negative ELBO "
                f"{record['test_loss']:.2f})")


# The bounds by name, as functions of the terms (the test pass and evaluation read them).
BOUNDS = {"elbo": negative_elbo, "iwae": negative_iwae}


def estimated(model, x: torch.Tensor, eps: torch.Tensor, estimator: str, **forward) -> Terms:
    """model(x, eps, **forward)'s terms whose gradient, through an objective, is the estimator's
    (ESTIMATORS): stl and dreg hold q's parameters fixed in log q (and take the KL from the
    draws), dreg reweights the gradient at z (dreg_weighted). The values are the plain terms'
    (up to rounding)."""
    terms = model(x, eps, fixed_q=estimator != "reparam", **forward)
    return dreg_weighted(terms) if estimator == "dreg" else terms
