"""SVAE+ (Lopez et al. 2023, "Learning causal representations of single cells via sparse
mechanism shift modeling"): a sparse shift of the latent prior mean per perturbation label.

    pi_k ~ Beta(1, beta2)                              k = 1..L
    m_lk ~ Bernoulli(pi_k)                             per label l
    z_i ~ N(m_{l_i} * gamma_{l_i}, I)                  (control cells: N(0, I))
    x_ig ~ NB(mean = l_i softmax(f(z_i))_g, theta_g)

gamma_l is a learned point parameter; z has no separate basal part. Every cell has exactly one
label, so a combination of perturbations is a label of its own (``labels.py``).
Guide: q(z | x) amortised Gaussian; q(m_l) = Bernoulli(sigmoid(logit_l)), sampled as a
Gumbel-sigmoid rounded with a straight-through gradient (log q = exact Bernoulli log-prob of the
rounded sample); q(pi_k) = Beta(a_k, b_k) with learned a, b (reparameterised samples).

Default ``beta2 = 10``: prior mean of pi 1/11 ~ 0.09, sparse but weak enough that a handful of
cells can switch a mask entry on (the Beta(1, beta2) density falls off smoothly instead of the
hard 0.01 of SAMS-VAE's fixed Bernoulli prior).

Global terms: label l carries G_l = log p(m_l | pi) - log q(m_l) plus an equal 1/n_labels share
of the pi term log p(pi) - log q(pi); each cell with label l carries G_l / N_l (N_l = training
cells with label l), so over the training split each term counts exactly once.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Beta

from ..ops import draw_noise, relaxed_bernoulli_st
from ..ops.embedding import UNIFORM_EPS
from .base import PerturbationModel, rng_scope
from .counter_noise import global_noise, local_noise
from .distributions import bernoulli_log_prob, kl_normal, normal_log_prob
from .labels import LabelIndex, _csr_parts
from .networks import DecoderBody, GaussianEncoder

_PI_EPS = 1e-6


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host int64 array on ``device``, copied without waiting for the device."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class SVAEPlus(PerturbationModel):
    """SVAE+ (``model="svae_plus"``, ``guide="mean_field"``).

    Args (beyond :class:`PerturbationModel`'s):
        labels: label vocabulary, a list of perturbation-column lists (see
            :func:`samsvae.models.svae_plus_labels`); None -> one label per dosage column
            (screens of single perturbations).
        label_counts: (n_labels,) training cells per label (needed when the vocabulary holds
            combinations; otherwise derived from the perturbation counts).
        beta2: second parameter of the Beta(1, beta2) prior on the mask probabilities.
        temperature: Gumbel-sigmoid temperature. mask_init_logit: initial guide logits.
        shift_init_std: standard deviation of the random initial gamma (0, the default: no
            shift until the label's cells teach one).
    """

    has_masks = True

    def __init__(self, *, model: str = "svae_plus", guide: str = "mean_field", n_genes: int,
                 n_perturbations: int, n_latent: int = 100, n_hidden: int = 400,
                 gene_log1p_mean=None, gene_log1p_std=None,
                 perturbation_counts=None, labels: Optional[Sequence[Sequence[int]]] = None,
                 label_counts=None, beta2: float = 10.0, temperature: float = 1.0,
                 mask_init_logit: float = 0.0, shift_init_std: float = 0.0,
                 n_batches: int = 0):
        if model != "svae_plus" or guide != "mean_field":
            raise ValueError(f"SVAEPlus is model 'svae_plus' with guide 'mean_field', got "
                             f"{model!r}/{guide!r}")
        if not beta2 > 0 or not temperature > 0:
            raise ValueError(f"beta2 and temperature must be > 0, got {beta2}, {temperature}")
        labels_cfg = None if labels is None else [[int(c) for c in l] for l in labels]
        extra = dict(labels=labels_cfg, beta2=float(beta2), temperature=float(temperature),
                     mask_init_logit=float(mask_init_logit), shift_init_std=float(shift_init_std))
        super().__init__(model=model, guide=guide, n_genes=n_genes,
                         n_perturbations=n_perturbations, n_latent=n_latent, n_hidden=n_hidden,
                         perturbation_counts=None, extra_config=extra, n_batches=n_batches)
        self.label_index = LabelIndex(
            labels_cfg if labels_cfg is not None else [[t] for t in range(self.n_perturbations)],
            self.n_perturbations)
        n_labels, L = len(self.label_index), self.n_latent
        self.n_labels = n_labels
        self.beta2 = float(beta2)
        self.temperature = float(temperature)
        self.register_buffer("label_counts", torch.zeros(n_labels))
        self.register_buffer("label_counts_set", torch.zeros((), dtype=torch.bool))

        self.encoder = GaussianEncoder(self.n_genes, self.n_hidden, L,
                                       gene_log1p_mean=gene_log1p_mean,
                                       gene_log1p_std=gene_log1p_std,
                                       n_batches=self.n_batches)
        self.decoder = DecoderBody(L, self.n_hidden, self.n_genes, n_batches=self.n_batches)
        self.shift = nn.Parameter(torch.randn(n_labels, L) * float(shift_init_std))   # gamma
        self.mask_logits = nn.Parameter(torch.full((n_labels, L), float(mask_init_logit)))
        self.pi_raw_a = nn.Parameter(torch.full((L,), _inv_softplus(1.0)))
        self.pi_raw_b = nn.Parameter(torch.full((L,), _inv_softplus(float(beta2))))
        if perturbation_counts is not None or label_counts is not None:
            self.set_perturbation_counts(
                perturbation_counts if perturbation_counts is not None
                else np.zeros(self.n_perturbations), label_counts=label_counts)

    # -- counts ------------------------------------------------------------------------------

    def set_perturbation_counts(self, counts, label_counts=None) -> None:
        """Set N_t per dosage column and N_l per label (training cells).

        ``label_counts`` (n_labels,) is required when the vocabulary holds combinations;
        for single-perturbation vocabularies it is derived from ``counts``.
        """
        super().set_perturbation_counts(counts)
        if label_counts is not None:
            t = torch.as_tensor(np.asarray(label_counts, dtype=np.float64)).reshape(-1)
            if t.numel() != self.n_labels or (t < 0).any() or not torch.isfinite(t).all():
                raise ValueError(f"label_counts must hold {self.n_labels} non-negative counts "
                                 f"(one per label), got {t.numel()} values")
        elif self.label_index.only_singletons:
            cols = torch.tensor([k[0] for k in self.label_index.labels], dtype=torch.int64)
            t = self.perturbation_counts.detach().cpu()[cols]
        else:
            return
        self.label_counts.copy_(t.to(self.label_counts.dtype))
        self.label_counts_set.fill_(True)

    def _require_label_counts(self) -> torch.Tensor:
        return self._require_set(
            self.label_counts, self.label_counts_set,
            "SVAE+ label counts are not set: build it with "
            "**samsvae.models.svae_plus_labels(training dosage) (gives labels and "
            "label_counts) or call set_perturbation_counts(counts, label_counts=...)")

    # -- sampling pieces -----------------------------------------------------------------------

    def _pi_guide(self) -> Beta:
        # positive by construction; validation would read the parameters back every step
        return Beta(F.softplus(self.pi_raw_a) + 1e-3, F.softplus(self.pi_raw_b) + 1e-3,
                    validate_args=False)

    def _labels(self, dosage, host_dosage=None):
        """Label of each row (B,), the present labels (U,) and each row's position in them
        (B,) (-1 for control rows).

        With the dosage on the host (a CPU batch, or ``Batch.host_dosage`` of a batch moved to
        a GPU) they are found there with numpy and copied asynchronously: on the device the
        lookup would need ``torch.unique`` and per-row reads, each a synchronisation."""
        if host_dosage is None and dosage.device.type == "cpu":
            host_dosage = dosage
        if host_dosage is not None:
            lab = self.label_index.rows_to_labels_host(host_dosage)
            present = np.unique(lab[lab >= 0])
            pos = np.where(lab >= 0, np.searchsorted(present, np.maximum(lab, 0)), -1)
            return tuple(_to_device(a, dosage.device) for a in (lab, present, pos))
        lab = self.label_index.rows_to_labels(dosage)
        present = torch.unique(lab[lab >= 0])
        pos = torch.searchsorted(present, lab.clamp_min(0))
        pos = torch.where(lab >= 0, pos, torch.full_like(pos, -1))
        return lab, present, pos

    def _prior_loc(self, mask, present, pos) -> torch.Tensor:
        """(P, B, L) prior mean m_l * gamma_l of each cell's z (zero for control cells)."""
        shift = mask * self.shift[present]                                   # (P, U, L)
        padded = torch.cat([shift, shift.new_zeros(shift.shape[0], 1, shift.shape[2])], dim=1)
        idx = torch.where(pos >= 0, pos, torch.full_like(pos, shift.shape[1]))
        return padded[:, idx]

    # -- hooks -------------------------------------------------------------------------------

    def _sample_globals(self, dosage, particles, generator, host_dosage=None):
        """Training-time sample of the globals of the batch's labels.

        Returns ``(mask (P, U, L) straight-through, present (U,) label ids, pos (B,) position
        of each row's label in ``present`` (-1 control), label_term (P, U))`` with
        ``label_term = log p(m_l | pi) - log q(m_l) + (log p(pi) - log q(pi)) / n_labels``.
        """
        _, present, pos = self._labels(dosage, host_dosage)
        device, dtype = self.shift.device, self.shift.dtype
        q_pi = self._pi_guide()
        with rng_scope(generator, device):
            pi = q_pi.rsample((particles,)).clamp(_PI_EPS, 1 - _PI_EPS)       # (P, L)
        _, u = draw_noise(particles, present.numel(), self.n_latent, dtype=dtype, device=device,
                          generator=generator, masked=True)
        mask = relaxed_bernoulli_st(self.mask_logits[present], u, self.temperature)
        log_p_m = (mask * torch.log(pi)[:, None] + (1 - mask) * torch.log1p(-pi)[:, None]).sum(-1)
        log_q_m = bernoulli_log_prob(mask, self.mask_logits[present]).sum(-1)
        prior_pi = Beta(torch.ones_like(pi), torch.full_like(pi, self.beta2), validate_args=False)
        pi_term = (prior_pi.log_prob(pi) - q_pi.log_prob(pi)).sum(-1)          # (P,)
        return mask, present, pos, log_p_m - log_q_m + pi_term[:, None] / self.n_labels

    def _elbo_parts(self, batch, particles, generator, warming_up=False):
        n_l = self._require_label_counts()
        mask, present, pos, label_term = self._sample_globals(
            batch.dosage, particles, generator, getattr(batch, "host_dosage", None))
        per_label = label_term / n_l.to(label_term.dtype)[present].clamp_min(1.0)
        glob = torch.cat([per_label, per_label.new_zeros(particles, 1)], dim=1)[
            :, torch.where(pos >= 0, pos, torch.full_like(pos, present.numel()))]

        cov = getattr(batch, "batch_index", None)
        q = self.encoder.posterior(self.encoder.gene_part(batch.counts, cov))  # (B, L) each
        loc, scale = q.loc, q.scale
        prior_loc = self._prior_loc(mask, present, pos)                        # (P, B, L)
        eps = torch.randn((particles,) + tuple(loc.shape), dtype=loc.dtype, device=loc.device,
                          generator=generator)
        z = loc + scale * eps
        log_lik = self._log_lik(batch.counts, self.decoder.hidden(z, batch_index=cov),
                                self._log_library(batch))
        return {"log_lik": log_lik, "kl_local": kl_normal(loc, scale, prior_loc).sum(-1),
                "global": glob}

    def _iwelbo_setup(self, batch):
        lab, present, pos = self._labels(batch.dosage, getattr(batch, "host_dosage", None))
        q = self.encoder.posterior(self.encoder.gene_part(batch.counts,
                                                          getattr(batch, "batch_index", None)))
        loc, scale = q.loc, q.scale
        return {"loc": loc, "scale": scale, "present": present, "pos": pos,
                "log_library": self._log_library(batch),
                "cell_key": int(batch.index[0]) if getattr(batch, "index", None) is not None
                and batch.index.numel() else 0}

    def _log_weights(self, batch, state, start, n, seed):
        loc, scale, present = state["loc"], state["scale"], state["present"]
        _, u = global_noise(seed, start, n, present, self.n_latent, dtype=loc.dtype, masked=True)
        mask = relaxed_bernoulli_st(self.mask_logits[present], u, self.temperature)
        prior_loc = self._prior_loc(mask, present, state["pos"])
        eps = local_noise(seed, start, n, state["cell_key"], loc.shape[0], self.n_latent,
                          dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps
        log_lik = self._log_lik(batch.counts,
                                self.decoder.hidden(z, batch_index=getattr(batch, "batch_index",
                                                                           None)),
                                state["log_library"])
        return (log_lik + normal_log_prob(z, prior_loc, 1.0).sum(-1)
                - normal_log_prob(z, loc, scale).sum(-1))

    def _predictive_hidden(self, dosage, n_samples, *, seed, start, mean_effects=False,
                           batch_index=None):
        _, present, pos = self._labels(dosage)
        dtype, device = self.shift.dtype, self.shift.device
        z = torch.randn(n_samples, 1, self.n_latent, dtype=dtype, device=device)
        if mean_effects:
            mask = torch.sigmoid(self.mask_logits[present]).unsqueeze(0)        # (1, U, L)
        else:
            u = torch.rand(n_samples, present.numel(), self.n_latent, dtype=dtype,
                           device=device).clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
            mask = relaxed_bernoulli_st(self.mask_logits[present], u, self.temperature)
        return self.decoder.hidden(z + self._prior_loc(mask, present, pos),
                                   batch_index=batch_index)

    def _latent(self, batch, kind):
        loc = self.encoder.posterior(self.encoder.gene_part(
            batch.counts, getattr(batch, "batch_index", None))).loc
        if kind == "full":
            return loc
        _, present, pos = self._labels(batch.dosage)
        prob = torch.sigmoid(self.mask_logits[present]).unsqueeze(0)
        return loc - self._prior_loc(prob, present, pos)[0]

    def known_conditions(self, dosage) -> np.ndarray:
        """(n,) bool: dosage rows whose perturbation set is a label of the model (or control)."""
        indptr, indices, _ = _csr_parts(dosage)
        out = np.ones(len(indptr) - 1, dtype=bool)
        for r in range(len(out)):
            key = tuple(sorted(indices[indptr[r]:indptr[r + 1]].tolist()))
            out[r] = not key or key in self.label_index.lookup
        return out

    # -- exports -------------------------------------------------------------------------------

    def label_masks(self) -> torch.Tensor:
        """(n_labels, L) guide probabilities q(m_lk = 1), labels in ``config["labels"]`` order."""
        return torch.sigmoid(self.mask_logits.detach())

    def _per_column(self, values: torch.Tensor) -> torch.Tensor:
        out = values.new_full((self.n_perturbations, values.shape[1]), float("nan"))
        single = self.label_index.singleton.to(values.device)
        has = single >= 0
        out[has] = values[single[has]]
        return out

    def perturbation_parameters(self) -> list:
        """Each label's shift and mask logits."""
        return [self.shift, self.mask_logits]

    def perturbation_masks(self) -> torch.Tensor:
        """(T, L) q(m = 1) of each perturbation's single-perturbation label; NaN rows for
        perturbations seen only in combinations (see :meth:`label_masks`)."""
        return self._per_column(self.label_masks())

    def perturbation_embeddings(self) -> torch.Tensor:
        """(T, L) gamma (prior-mean shift before masking) of each single-perturbation label;
        NaN rows for perturbations seen only in combinations."""
        return self._per_column(self.shift.detach())
