"""Conditional VAE: the perturbation enters encoder and decoder as an input, not as a latent.

    z_i ~ N(0, I)
    x_ig ~ NB(mean = l_i softmax(f([z_i, d_i]))_g, theta_g)
    q(z_i | x_i, d_i) = N(mu([x_i, d_i]), sigma([x_i, d_i])^2)          (mean-field, amortised)

The dosage d_i (a CSR row of T values) is never expanded to a dense T-wide input: its
contribution to a first layer is ``torch.sparse.mm(dosage, W_d)`` with W_d a (T, hidden) weight,
the same value as concatenating d_i to the input, at the cost of its non-zeros. There are no
global latent variables, so the perturbation counts are unused and the ELBO is purely local.
"""
from __future__ import annotations

import torch

from .base import PerturbationModel
from .distributions import kl_normal, normal_log_prob, std_normal_log_prob
from .counter_noise import local_noise
from .networks import DecoderBody, GaussianEncoder, sparse_rows_matmul


class ConditionalVAE(PerturbationModel):
    """CVAE (``model="cvae"``, ``guide="mean_field"``); arguments as :class:`PerturbationModel`
    plus ``gene_log1p_mean`` / ``gene_log1p_std`` for the encoder input."""

    def __init__(self, *, model: str = "cvae", guide: str = "mean_field", n_genes: int,
                 n_perturbations: int, n_latent: int = 100, n_hidden: int = 400,
                 gene_log1p_mean=None, gene_log1p_std=None,
                 perturbation_counts=None, n_batches: int = 0):
        if model != "cvae" or guide != "mean_field":
            raise ValueError(f"ConditionalVAE is model 'cvae' with guide 'mean_field', got "
                             f"{model!r}/{guide!r}")
        super().__init__(model=model, guide=guide, n_genes=n_genes,
                         n_perturbations=n_perturbations, n_latent=n_latent, n_hidden=n_hidden,
                         perturbation_counts=perturbation_counts, n_batches=n_batches)
        T, L = self.n_perturbations, self.n_latent
        self.encoder = GaussianEncoder(self.n_genes, self.n_hidden, L,
                                       gene_log1p_mean=gene_log1p_mean,
                                       gene_log1p_std=gene_log1p_std, n_dosage=T,
                                       n_batches=self.n_batches)
        self.decoder = DecoderBody(L, self.n_hidden, self.n_genes, n_dosage=T,
                                   n_batches=self.n_batches)
        with torch.no_grad():  # no perturbation effect until the data teach one
            self.decoder.dosage_weight.zero_()

    def _encode(self, batch):
        pre = (self.encoder.gene_part(batch.counts, getattr(batch, "batch_index", None))
               + self.encoder.dosage_part(batch.dosage))
        q = self.encoder.posterior(pre)
        return q.loc, q.scale

    def _decoder_dosage(self, dosage):
        return sparse_rows_matmul(dosage, self.decoder.dosage_weight)          # (B, H)

    def _elbo_parts(self, batch, particles, generator, warming_up=False):
        loc, scale = self._encode(batch)
        eps = torch.randn((particles,) + tuple(loc.shape), dtype=loc.dtype, device=loc.device,
                          generator=generator)
        hidden = self.decoder.hidden(loc + scale * eps, self._decoder_dosage(batch.dosage),
                                     getattr(batch, "batch_index", None))
        log_lik = self._log_lik(batch.counts, hidden, self._log_library(batch))
        return {"log_lik": log_lik, "kl_local": kl_normal(loc, scale).sum(-1), "global": None}

    def _iwelbo_setup(self, batch):
        loc, scale = self._encode(batch)
        return {"loc": loc, "scale": scale, "dosage_part": self._decoder_dosage(batch.dosage),
                "log_library": self._log_library(batch),
                "cell_key": int(batch.index[0]) if getattr(batch, "index", None) is not None
                and batch.index.numel() else 0}

    def _log_weights(self, batch, state, start, n, seed):
        loc, scale = state["loc"], state["scale"]
        eps = local_noise(seed, start, n, state["cell_key"], loc.shape[0], self.n_latent,
                          dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps
        log_lik = self._log_lik(batch.counts,
                                self.decoder.hidden(z, state["dosage_part"],
                                                    getattr(batch, "batch_index", None)),
                                state["log_library"])
        return log_lik + std_normal_log_prob(z).sum(-1) - normal_log_prob(z, loc, scale).sum(-1)

    def _predictive_hidden(self, dosage, n_samples, *, seed, start, mean_effects=False,
                           batch_index=None):
        dtype, device = self.decoder.input.weight.dtype, self.decoder.input.weight.device
        z = torch.randn(n_samples, 1, self.n_latent, dtype=dtype, device=device)
        return self.decoder.hidden(z, self._decoder_dosage(dosage), batch_index)

    def _latent(self, batch, kind):
        # z is the only latent; it already plays the basal role, so "full" == "basal".
        return self._encode(batch)[0]

    def perturbation_parameters(self) -> list:
        """Each perturbation's rows of the encoder's and decoder's dosage inputs."""
        return [self.encoder.dosage_weight, self.decoder.dosage_weight]

    def perturbation_embeddings(self) -> torch.Tensor:
        """(T, n_hidden): each perturbation's additive input to the decoder's hidden layer.
        The CVAE has no latent perturbation shift; this is its closest analogue."""
        return self.decoder.dosage_weight.detach().clone()
