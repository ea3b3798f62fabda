"""SAMS-VAE (sparse additive mechanism shift VAE) and CPA-VAE (its special case with all masks 1).

Generative model (Bereket & Karaletsos, NeurIPS 2023)::

    z_basal_i ~ N(0, I)                     e_t ~ N(0, s^2 I)        m_tk ~ Bernoulli(alpha)
    z_i = z_basal_i + sum_t d_it (e_t * m_t)
    x_ig ~ NB(mean = l_i softmax(f(z_i))_g, theta_g)

with s = ``embedding_prior_scale`` (1) and alpha = ``mask_prior_prob`` (0.01). CPA-VAE fixes
every m_tk = 1.

Guides:

* ``mean_field``: q(z_basal | x) q(e_t) q(m_t); q(z_basal | x) an amortised Gaussian encoder of
  the standardised log1p counts, q(e_t) = N(mu_t, sigma_t^2), q(m_t) = Bernoulli(sigmoid(l_t)).
* ``corr_basal``: q(z_basal | x, z_p): the encoder also reads the particle's sampled
  perturbation latent z_p = sum_t d_it e_t m_t; its mean is ``encoder([x, z_p])``
  (``corr_basal_form="direct"``, the default) or ``encoder([x, z_p]) - z_p`` ("residual", the
  form of runs saved before the option existed); see ``_basal_guide``.
* ``corr_embedding``: q(e_t | m_t). The widely used implementation feeds [m_t, one-hot(t)] to an
  MLP, i.e. a (particles, T, T) input: O(T^2) memory (~40 GB at T = 10,000). Here each
  perturbation has a learned code c_t (``embedding_code_dim``, default 16) and

      mu_t(m), log sigma_t(m) = (mu_t, log sigma_t) + MLP([m_t, c_t])

  an MLP with one hidden layer (``embedding_hidden``, default 64, LeakyReLU) evaluated only for
  the perturbations present in the batch, per particle. The per-perturbation base
  (mu_t, log sigma_t) keeps the family at least as rich as mean-field whatever the code size
  (a 16-dim code alone could not place 10,000 arbitrary 100-dim means); the MLP's last layer
  starts at zero, so training starts from the mean-field guide and learns how e_t depends on
  the sampled mask.
* ``corr_both``: both.

Masks are sampled as Gumbel-sigmoid at ``temperature`` rounded with a straight-through gradient;
log q(m) is the exact Bernoulli log-probability of the rounded sample. Global terms
(log p(e) + log p(m) - log q(e | .) - log q(m)) are computed only for the perturbations present
in the batch and spread over cells with weight 1/N_t (``spread_globals.per_cell_global_term``).

Options that matter for recovering the masks (all default to the paper's model; see
``benchmarks/sim_recovery.py`` for the measurements behind them):

* ``global_param_scale``: per-perturbation parameters see only their few cells per batch and
  must travel O(1) (mask logits across 0, means to +-2) while Adam moves any stored parameter
  by about ``lr`` per step; storing them divided by k lets them move k times faster.
* ``basal_covariance="full"``: a diagonal q(z_basal) prefers the latent basis in which each
  cell's posterior is closest to diagonal. On a simulated screen that preference was worth more
  ELBO than the true sparse masks (rotating the basis cut the mean-field gap from 0.78 to 0.29
  nats per cell), so training settles in a rotated basis with dense masks.
* ``mask_prior_weight``: the reference implementation's reweighting of the mask prior in
  proportion to the number of cells. Under the exact ELBO each extra mask entry costs a few
  nats per perturbation however many cells carry it, too little to orient the latent axes.
* ``sparse_rotation_every`` (with ``sparse_rotation_until``, ``sparse_rotation_reopen``): the
  likelihood and the N(0, I) basal prior are unchanged by a rotation of the latent space, so
  only the mask prior orients the axes, and gradient training turns them very slowly (every
  network and embedding must turn together, for a few nats per mask entry). Every N training
  steps the model finds the orthogonal R that minimises the L1 norm of the guide's mean
  effects (``rotation.sparse_rotation``) and re-expresses embeddings and masks in that basis
  (:meth:`SAMSVAE.rotate_to_sparse_basis`); the decoder and the basal guide keep their
  coordinates and read the perturbation latent as ``z_p @ Q`` (Q, the accumulated basis, is a
  buffer), so the model is still SAMS-VAE with its decoder's first layer reparametrised.
  ``sparse_rotation_reopen`` raises every mask probability to at least that value after a
  rotation: an entry switched off early has its embedding at the prior mean 0, where neither
  the embedding (its gradient is multiplied by the sampled 0) nor the mask (its
  straight-through gradient is multiplied by e = 0) can learn that it is needed; reopening
  lets small true effects be found and lets the prior switch unneeded entries off again.
  Rotations stop after ``sparse_rotation_until`` so that the masks settle before the end.
"""
from __future__ import annotations

import math

import numpy as np

import torch
from torch import nn

from .. import ops
from ..ops import (
    batch_perturbations,
    draw_noise,
    perturbation_sum,
    relaxed_bernoulli_st,
)
from .base import PerturbationModel
from .counter_noise import global_noise, local_noise
from .distributions import (
    GaussianPosterior,
    bernoulli_log_prob_const,
    std_normal_log_prob,
)
from .fused_autograd import global_log_ratio
from .networks import LEAKY_SLOPE, DecoderBody, GaussianEncoder
from .rotation import sparse_rotation
from .spread_globals import per_cell_global_term

SAMS_GUIDES = ("mean_field", "corr_embedding", "corr_basal", "corr_both")
CORR_BASAL_FORMS = ("direct", "residual")
CPA_GUIDES = ("mean_field", "corr_basal")


class SAMSVAE(PerturbationModel):
    """SAMS-VAE (``model="sams_vae"``) or CPA-VAE (``model="cpa_vae"``, masks fixed to 1).

    Args (beyond :class:`PerturbationModel`'s):
        guide: one of ``mean_field``, ``corr_embedding``, ``corr_basal``, ``corr_both``
            (CPA-VAE: ``mean_field``, ``corr_basal``).
        gene_log1p_mean, gene_log1p_std: (G,) training statistics of log1p(counts) for the
            encoder input.
        mask_prior_prob: alpha, prior probability of a mask entry (0.01).
        embedding_prior_scale: s, prior standard deviation of the embeddings (1).
        temperature: Gumbel-sigmoid temperature of the mask samples (1).
        mask_init_logit: initial guide logit of every mask entry.
        embedding_init_scale: initial guide standard deviation of the embeddings.
        embedding_init_loc_std: standard deviation of the random initial guide means (0, the
            default: every embedding starts at the prior mean, so a perturbation has no
            effect until its cells have taught it one; random starts give every perturbation
            a random effect on the latent dimensions its masks let through, which the decoder
            turns into large spurious treatment effects early in training).
        embedding_code_dim, embedding_hidden: code size and hidden width of the correlated
            embedding guide.
        global_param_scale: the per-perturbation guide parameters (mu_t, log sigma_t, mask
            logits, codes) are stored divided by this factor. Adam moves every stored parameter
            by about ``lr`` per step, so this lets them travel ``global_param_scale`` times
            faster than the network weights (see the module docstring).
        mask_prior_weight: w >= 0, extra weight of log p(m_t) carried by every cell that
            received t, so that over the training split the mask prior counts 1 + w N_t times
            instead of once (the reference implementation's reweighted loss, "prior weight
            proportional to n"). 0 (default) trains the exact ELBO; w > 0 trades the ELBO for
            sparser masks, whose pull otherwise does not grow with the number of cells.
        basal_covariance: ``"diagonal"`` (the paper's guide) or ``"full"``: q(z_basal | .)
            with a full covariance (Cholesky factor from the encoder, L(L-1)/2 more outputs).
            A diagonal guide favours the latent basis in which cells' posteriors are closest to
            diagonal, which competes with the sparse masks for the orientation of the latent
            axes; a full covariance leaves sparsity as the only thing that orients them.
        sparse_rotation_every: N >= 0; every N training steps rotate the latent axes to the
            sparsest orientation of the perturbation effects before the step
            (:meth:`rotate_to_sparse_basis`, called by the trainer's
            ``samsvae.train.callbacks.SparseRotation``: the model does not train itself).
            0 (default): never; the model then has no ``latent_basis`` buffer. sams_vae only.
        sparse_rotation_until: last training step at which a rotation may happen (0: no
            limit). Leave a few hundred steps after it for the masks to settle.
        sparse_rotation_reopen: after each rotation every q(m_tk = 1) is raised to at least
            this value (0: not at all; 0.5 reopens every switched-off entry).
        corr_basal_form: ``"direct"`` (default) or ``"residual"``: how the correlated basal
            guide's mean is written (``_basal_guide``); the same family, trained differently.
            Runs saved before the option existed load as ``"residual"``.
        gene_offset_prior_scale: S > 0 turns on the gene-offset variant (not the paper's
            model, which is S = 0, the default): each perturbation t also adds b_t (G,) to
            the decoder's logits, sum_t d_it b_t per cell, b_t a MAP estimate under
            N(0, S^2 I) (point estimates like the decoder's weights; the prior's log density
            without its constant joins the global term). For effects the latent space does
            not span, such as a CRISPRi target's own knockdown (schraivogel2020: STK3 -1.1
            log2 units in the data, -0.03 without offsets, -0.91 with).
    """

    def __init__(self, *, model: str = "sams_vae", guide: str = "mean_field", n_genes: int,
                 n_perturbations: int, n_latent: int = 100, n_hidden: int = 400,
                 gene_log1p_mean=None, gene_log1p_std=None,
                 perturbation_counts=None, mask_prior_prob: float = 0.01,
                 embedding_prior_scale: float = 1.0, temperature: float = 1.0,
                 mask_init_logit: float = 0.0, embedding_init_scale: float = 0.1,
                 embedding_init_loc_std: float = 0.0, embedding_code_dim: int = 16,
                 embedding_hidden: int = 64, global_param_scale: float = 1.0,
                 basal_covariance: str = "diagonal", mask_prior_weight: float = 0.0,
                 sparse_rotation_every: int = 0, sparse_rotation_until: int = 0,
                 sparse_rotation_reopen: float = 0.0, gene_offset_prior_scale: float = 0.0,
                 corr_basal_form: str = "direct", n_batches: int = 0):
        if model not in ("sams_vae", "cpa_vae"):
            raise ValueError(f"SAMSVAE implements 'sams_vae' and 'cpa_vae', not {model!r}")
        guides = SAMS_GUIDES if model == "sams_vae" else CPA_GUIDES
        if guide not in guides:
            raise ValueError(f"{model} supports the guides {guides}, got {guide!r}")
        if mask_prior_weight < 0 or (mask_prior_weight and model != "sams_vae"):
            raise ValueError(f"mask_prior_weight must be >= 0 and needs masks (sams_vae), "
                             f"got {mask_prior_weight} for {model}")
        if int(sparse_rotation_every) != sparse_rotation_every or sparse_rotation_every < 0:
            raise ValueError(f"sparse_rotation_every must be a non-negative integer (training "
                             f"steps between rotations; 0 = never), got {sparse_rotation_every!r}")
        if int(sparse_rotation_until) != sparse_rotation_until or sparse_rotation_until < 0:
            raise ValueError(f"sparse_rotation_until must be a non-negative integer (last "
                             f"training step with a rotation; 0 = no limit), got "
                             f"{sparse_rotation_until!r}")
        if not sparse_rotation_every and (sparse_rotation_until or sparse_rotation_reopen):
            raise ValueError("sparse_rotation_until and sparse_rotation_reopen shape the "
                             "rotations: they need sparse_rotation_every > 0")
        if not 0.0 <= sparse_rotation_reopen < 1.0:
            raise ValueError(f"sparse_rotation_reopen must be in [0, 1) (floor of q(m = 1) "
                             f"after a rotation), got {sparse_rotation_reopen!r}")
        if sparse_rotation_every and model != "sams_vae":
            raise ValueError("sparse_rotation_every orients the latent axes by the masks' "
                             f"sparsity and needs sams_vae (masks), not {model}")
        if corr_basal_form not in CORR_BASAL_FORMS:
            raise ValueError(f"corr_basal_form must be one of {CORR_BASAL_FORMS}, got "
                             f"{corr_basal_form!r}")
        if not gene_offset_prior_scale >= 0:
            raise ValueError(f"gene_offset_prior_scale must be >= 0 (0: no gene offsets, the "
                             f"paper's model), got {gene_offset_prior_scale!r}")
        if not 0.0 < mask_prior_prob < 1.0:
            raise ValueError(f"mask_prior_prob must be in (0, 1), got {mask_prior_prob}")
        for name, v in (("embedding_prior_scale", embedding_prior_scale),
                        ("temperature", temperature), ("global_param_scale", global_param_scale),
                        ("embedding_init_scale", embedding_init_scale)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        extra = dict(mask_prior_prob=mask_prior_prob, embedding_prior_scale=embedding_prior_scale,
                     temperature=temperature, mask_init_logit=mask_init_logit,
                     embedding_init_scale=embedding_init_scale,
                     embedding_init_loc_std=embedding_init_loc_std,
                     embedding_code_dim=embedding_code_dim, embedding_hidden=embedding_hidden,
                     global_param_scale=global_param_scale, basal_covariance=basal_covariance,
                     mask_prior_weight=mask_prior_weight,
                     sparse_rotation_every=int(sparse_rotation_every),
                     sparse_rotation_until=int(sparse_rotation_until),
                     sparse_rotation_reopen=float(sparse_rotation_reopen),
                     gene_offset_prior_scale=float(gene_offset_prior_scale),
                     corr_basal_form=str(corr_basal_form))
        super().__init__(model=model, guide=guide, n_genes=n_genes,
                         n_perturbations=n_perturbations, n_latent=n_latent, n_hidden=n_hidden,
                         perturbation_counts=perturbation_counts,
                         extra_config=extra, n_batches=n_batches)
        T, L = self.n_perturbations, self.n_latent
        self.masked = model == "sams_vae"
        self.has_masks = self.masked
        self.corr_basal = guide in ("corr_basal", "corr_both")
        self.corr_embedding = guide in ("corr_embedding", "corr_both")
        self.corr_basal_form = str(corr_basal_form)
        self.mask_prior_prob = float(mask_prior_prob)
        self.embedding_prior_scale = float(embedding_prior_scale)
        self.temperature = float(temperature)
        self.global_param_scale = float(global_param_scale)
        self.mask_prior_weight = float(mask_prior_weight)
        if sparse_rotation_every:
            # latent_basis Q (L, L): the decoder and the basal guide work in "internal"
            # coordinates, the embeddings and masks in the mask basis; z_p enters as z_p @ Q.
            self.register_buffer("latent_basis", torch.eye(L))
            # run directories of earlier versions counted the steps in the model
            self._register_load_state_dict_pre_hook(_drop_step_counter, with_module=True)
        else:
            self.latent_basis = None

        # (T, L) what the basal encoder absorbed of each perturbation's effect, fitted after
        # training (set_perturbation_basal_shift); predictions add it to the effects
        self.register_buffer("perturbation_basal_shift", torch.zeros(T, L))
        self._register_load_state_dict_pre_hook(_default_basal_shift, with_module=True)

        # (T, G) per-perturbation shifts of every gene's log rate (the gene-offset variant), or
        # None (the paper's model)
        self.gene_offset_prior_scale = float(gene_offset_prior_scale)
        self.gene_offsets = (nn.Parameter(torch.zeros(T, self.n_genes))
                             if self.gene_offset_prior_scale > 0 else None)

        self.encoder = GaussianEncoder(self.n_genes, self.n_hidden, L,
                                       gene_log1p_mean=gene_log1p_mean,
                                       gene_log1p_std=gene_log1p_std,
                                       n_conditioning=L if self.corr_basal else 0,
                                       covariance=basal_covariance, n_batches=self.n_batches)
        self.decoder = DecoderBody(L, self.n_hidden, self.n_genes, n_batches=self.n_batches)
        k = self.global_param_scale
        self.emb_loc_raw = nn.Parameter(torch.randn(T, L) * (float(embedding_init_loc_std) / k))
        self.emb_log_scale_raw = nn.Parameter(
            torch.full((T, L), math.log(embedding_init_scale) / k))
        self.mask_logits_raw = (nn.Parameter(torch.full((T, L), float(mask_init_logit) / k))
                                if self.masked else None)
        if self.corr_embedding:
            self.emb_code_raw = nn.Parameter(torch.randn(T, int(embedding_code_dim)) / k)
            self.embedding_net = nn.Sequential(
                nn.Linear(L + int(embedding_code_dim), int(embedding_hidden)),
                nn.LeakyReLU(LEAKY_SLOPE),
                nn.Linear(int(embedding_hidden), 2 * L))
            nn.init.zeros_(self.embedding_net[2].weight)
            nn.init.zeros_(self.embedding_net[2].bias)

    # -- global variables ----------------------------------------------------------------

    def _scaled(self, raw):
        if raw is None or self.global_param_scale == 1.0:
            return raw
        return raw * self.global_param_scale

    def _internal(self, z_p: torch.Tensor) -> torch.Tensor:
        """z_p (..., L) from the mask basis to the decoder's coordinates (``z_p @ Q``)."""
        return z_p if self.latent_basis is None else z_p @ self.latent_basis.to(z_p.dtype)

    @property
    def emb_loc(self) -> torch.Tensor:
        """(T, L) guide means mu_t (for corr_embedding: the per-perturbation base)."""
        return self._scaled(self.emb_loc_raw)

    @property
    def emb_log_scale(self) -> torch.Tensor:
        """(T, L) guide log standard deviations log sigma_t."""
        return self._scaled(self.emb_log_scale_raw)

    @property
    def mask_logits(self):
        """(T, L) guide mask logits l_t, or None (CPA-VAE)."""
        return self._scaled(self.mask_logits_raw)

    @property
    def emb_code(self) -> torch.Tensor:
        """(T, code) per-perturbation codes c_t of the correlated embedding guide."""
        return self._scaled(self.emb_code_raw)

    def _embedding_guide(self, index: torch.Tensor, mask):
        """Guide mean and log std of e_t for the perturbations ``index`` (U,):
        (U, L) each for mean-field, (P, U, L) given a (P, U, L) mask for corr_embedding."""
        loc = self._scaled(self.emb_loc_raw[index])
        log_scale = self._scaled(self.emb_log_scale_raw[index])
        if self.corr_embedding:
            code = self._scaled(self.emb_code_raw[index]).expand(mask.shape[0], -1, -1)
            delta = self.embedding_net(torch.cat([mask, code], dim=-1))
            dloc, dlog = delta.split(self.n_latent, dim=-1)
            loc, log_scale = loc + dloc, log_scale + dlog
        return loc, log_scale

    def _globals_from_noise(self, index, eps, u):
        """Sample e (P, U, L) and the straight-through mask (P, U, L) or None from noise."""
        mask = None
        if self.masked:
            mask = relaxed_bernoulli_st(self._scaled(self.mask_logits_raw[index]), u,
                                        self.temperature)
        loc, log_scale = self._embedding_guide(index, mask)
        emb = loc + log_scale.exp() * eps
        return emb, mask, loc, log_scale

    def _mask_log_prior(self, mask) -> torch.Tensor:
        """(P, U) log p(m_t), summed over latent."""
        return bernoulli_log_prob_const(mask, self.mask_prior_prob).sum(-1)

    def _global_log_ratio(self, index, emb, mask, loc, log_scale) -> torch.Tensor:
        """(P, U): log p(e_t) + log p(m_t) - log q(e_t | .) - log q(m_t), summed over latent
        (one fused autograd node, see samsvae.models.fused_autograd)."""
        logits = self._scaled(self.mask_logits_raw[index]) if mask is not None else None
        return global_log_ratio(emb, loc, log_scale, mask, logits, self.embedding_prior_scale,
                                self.mask_prior_prob)

    def _sample_globals(self, dosage, particles, generator, with_mask=False, index=None):
        """Training-time sample: z_p (P, B, L), index (U,), global log-ratio (P, U)
        [, the sampled straight-through masks (P, U, L) or None when ``with_mask``].
        ``index``: the batch's sorted perturbation ids when known (``Batch.perturbations``)."""
        if not self.corr_embedding:
            # The kernel runs on the batch's rows of the tables (dosage columns renumbered
            # 0..U-1, the same noise as on the whole tables): its gradients and the global
            # term's meet on (U, L) rows, and each table gets one scatter of their sum
            # instead of two zero-filled (T, L) gradients added together.
            index, local_col, _, _ = batch_perturbations(dosage, index)
            local = torch.sparse_csr_tensor(dosage.crow_indices(), local_col, dosage.values(),
                                            size=(dosage.shape[0], index.numel()),
                                            check_invariants=False)
            loc = self._scaled(self.emb_loc_raw[index])
            log_scale = self._scaled(self.emb_log_scale_raw[index])
            logits = (self._scaled(self.mask_logits_raw[index])
                      if self.mask_logits_raw is not None else None)
            s = ops.masked_embedding_sum(local, loc, log_scale, logits, particles=particles,
                                         temperature=self.temperature, generator=generator,
                                         index=torch.arange(index.numel(), device=index.device))
            ratio = global_log_ratio(s.embedding, loc, log_scale, s.mask, logits,
                                     self.embedding_prior_scale, self.mask_prior_prob)
            out = (s.z_p, index, ratio, s.mask)
        else:
            index = batch_perturbations(dosage, index)[0]
            eps, u = draw_noise(particles, index.numel(), self.n_latent,
                                dtype=self.emb_loc_raw.dtype, device=self.emb_loc_raw.device,
                                generator=generator, masked=True)
            emb, mask, loc, log_scale = self._globals_from_noise(index, eps, u)
            ratio = self._global_log_ratio(index, emb, mask, loc, log_scale)
            out = (perturbation_sum(dosage, index, emb * mask), index, ratio, mask)
        return out if with_mask else out[:3]

    def _shift_mean(self, index: torch.Tensor) -> torch.Tensor:
        """(U, L) guide mean of e_t * m_t. Exact for mean-field (mu_t * q(m=1)); for
        corr_embedding the mean of e given the most probable mask, times q(m=1)."""
        if not self.masked:
            return self.emb_loc[index]
        prob = torch.sigmoid(self.mask_logits[index])
        if self.corr_embedding:
            loc, _ = self._embedding_guide(index, (prob > 0.5).to(prob.dtype).unsqueeze(0))
            return loc[0] * prob
        return self.emb_loc[index] * prob

    def _basal_guide(self, pre: torch.Tensor, z_p: torch.Tensor,
                     reads_z_p: bool = True) -> GaussianPosterior:
        """q(z_basal | x[, z_p]) from the encoder's gene pre-activation (B, H). ``reads_z_p``
        False (the training loss during the global term's warm-up) weights the encoder's z_p
        input by 0, so the guide is the mean-field one and the z_p weights do not move.

        Correlated guide: the encoder reads [x, z_p]. Both forms span the same family
        (one's encoder is the other's minus z_p); they start training differently:

        * ``"direct"`` (default): the basal mean is the encoder's output. The decoder reads
          z_basal + z_p, so the likelihood reaches e_t directly (as in mean-field). The
          encoder's z_p weights start at zero and stay there through the warm-up
          (``reads_z_p``), so training starts from the mean-field guide and the encoder
          learns to read z_p (and to cancel part of it, where a perturbation's cells vary
          anyway) only once the embeddings have learnt the effects. With random z_p weights
          it did so from the first step and weak effects got no dimension of their own: on
          schraivogel2020 (seed 0) 7 of 26 perturbations kept a dimension with |e| > 1,
          against 15 now (mean-field: 17), and STK3's own knockdown was predicted at -0.04
          log2 units (now -1.01) against the data's -1.20. corr_basal went from 0.04 below
          the train_mean baseline to level with it (two splits), and corr_both on
          norman2019's held-out doubles from 0.35 / 0.55 to 0.52 / 0.69 (five seeds).
        * ``"residual"``: the encoder estimates the cell's full latent state and the basal mean
          is that estimate minus z_p (a skip connection), so the decoder reads the encoder's
          estimate and e_t learns only through the encoder's sensitivity to z_p and the basal
          KL. On norman2019's held-out doubles (seed 0) its effects stayed small (MAP2K3
          |effect| 0.6 against 4.3 in mean-field): corr_both 0.30 / 0.34, corr_basal
          0.27 / 0.33, against 0.39 / 0.53 and 0.35 / 0.50 with ``"direct"``.
        """
        if not self.corr_basal:
            return self.encoder.posterior(pre)
        # weighted by 0 rather than skipped: Adam's state for the z_p weights then advances as
        # it did in the runs measured (README)
        reads = 1.0 if reads_z_p else 0.0
        q = self.encoder.posterior(pre + reads * self.encoder.conditioning_part(z_p))
        return q.shifted(-z_p) if self.corr_basal_form == "residual" else q

    def _gene_offset_log_prior(self, index: torch.Tensor) -> torch.Tensor:
        """(U,) -|b_t|^2 / (2 s^2): log N(b_t; 0, s^2 I) of the gene offsets of the
        perturbations ``index`` without its normalising constant. The offsets are point
        estimates (MAP), like the decoder's weights: their density's constant, which a point
        estimate has no entropy to cancel, would only shift the reported ELBO."""
        b = self.gene_offsets[index]
        return -0.5 * (b * b).sum(-1) / self.gene_offset_prior_scale ** 2

    def _offset_log_lik(self, counts, hidden, log_library, dosage, index) -> torch.Tensor:
        """log p(x | z) (..., B); with gene offsets the logits also get sum_t d_it b_t, through
        the same fused last layer: the hidden layer is extended by the cells' dosage of the
        batch's U perturbations and the weight by their offsets (G, U)."""
        if self.gene_offsets is None:
            return self._log_lik(counts, hidden, log_library)
        u = index.numel()
        eye = torch.eye(u, dtype=hidden.dtype, device=hidden.device).unsqueeze(0)
        dose = perturbation_sum(dosage, index, eye)                         # (1, B, U)
        hidden = torch.cat([hidden, dose.expand(hidden.shape[:-1] + (u,))], dim=-1)
        out = self.decoder.out
        weight = torch.cat([out.weight, self.gene_offsets[index].T.to(out.weight.dtype)], dim=1)
        return self.likelihood.forward_linear(counts, hidden, weight, out.bias, log_library,
                                              recompute=None)

    def _condition_logit_offset(self, row):
        """(G,) sum_t d_t b_t of one condition's (1, T) dosage row, or 0 without offsets."""
        if self.gene_offsets is None:
            return 0.0
        cols, vals = row.col_indices(), row.values().to(self.gene_offsets.dtype)
        return (vals.unsqueeze(-1) * self.gene_offsets[cols]).sum(0)

    # -- hooks -------------------------------------------------------------------------------

    def _elbo_parts(self, batch, particles, generator, warming_up=False):
        counts_n = self._require_counts()
        z_p, index, ratio, mask = self._sample_globals(batch.dosage, particles, generator,
                                                       with_mask=True,
                                                       index=_batch_index(batch))
        z_p = self._internal(z_p)
        if self.gene_offsets is not None:
            ratio = ratio + self._gene_offset_log_prior(index)
        extra = self._mask_log_prior(mask) if self.mask_prior_weight and mask is not None else None
        glob = per_cell_global_term(batch.dosage, index, ratio, counts_n, extra,
                                    self.mask_prior_weight)
        cov = _covariate(batch)
        pre = self.encoder.gene_part(batch.counts, cov)                 # (B, H), once per cell
        q = self._basal_guide(pre, z_p, reads_z_p=not warming_up)      # (B, L) or (P, B, L)
        eps = torch.randn((particles,) + tuple(q.loc.shape[-2:]), dtype=q.loc.dtype,
                          device=q.loc.device, generator=generator)
        z_basal, kl_local = q.sample_and_kl(eps)                        # one fused node
        hidden = self.decoder.hidden(z_basal + z_p, batch_index=cov)
        log_lik = self._offset_log_lik(batch.counts, hidden, self._log_library(batch),
                                       batch.dosage, index)
        return {"log_lik": log_lik, "kl_local": kl_local, "global": glob}

    def _iwelbo_setup(self, batch):
        return {"pre": self.encoder.gene_part(batch.counts, _covariate(batch)),
                "index": batch_perturbations(batch.dosage, _batch_index(batch))[0],
                "log_library": self._log_library(batch),
                "cell_key": int(batch.index[0]) if getattr(batch, "index", None) is not None
                and batch.index.numel() else 0}

    def _log_weights(self, batch, state, start, n, seed):
        index, pre = state["index"], state["pre"]
        eps, u = global_noise(seed, start, n, index, self.n_latent, dtype=pre.dtype,
                              masked=self.masked)
        emb, mask, _, _ = self._globals_from_noise(index, eps, u)
        z_p = self._internal(perturbation_sum(batch.dosage, index,
                                              emb if mask is None else emb * mask))
        q = self._basal_guide(pre, z_p)
        eps_b = local_noise(seed, start, n, state["cell_key"], pre.shape[-2], self.n_latent,
                            dtype=pre.dtype, device=pre.device)
        z_basal = q.sample(eps_b)
        log_lik = self._offset_log_lik(
            batch.counts, self.decoder.hidden(z_basal + z_p, batch_index=_covariate(batch)),
            state["log_library"], batch.dosage, index)
        return log_lik + std_normal_log_prob(z_basal).sum(-1) - q.log_prob_of_sample(eps_b)

    def _predictive_hidden(self, dosage, n_samples, *, seed, start, mean_effects=False,
                           batch_index=None):
        index = batch_perturbations(dosage)[0]
        dtype, device = self.emb_loc_raw.dtype, self.emb_loc_raw.device
        z_basal = torch.randn(n_samples, 1, self.n_latent, dtype=dtype, device=device)
        if mean_effects:
            effect = self._shift_mean(index).unsqueeze(0)                        # (1, U, L)
        else:
            eps, u = global_noise(seed, start, n_samples, index, self.n_latent, dtype=dtype,
                                  masked=self.masked)
            emb, mask, _, _ = self._globals_from_noise(index, eps, u)
            effect = emb if mask is None else emb * mask
        effect = effect + self.perturbation_basal_shift[index].to(effect.dtype)
        z_p = self._internal(perturbation_sum(dosage, index, effect))
        return self.decoder.hidden(z_basal + z_p, batch_index=batch_index)

    def _latent(self, batch, kind):
        index = batch_perturbations(batch.dosage, _batch_index(batch))[0]
        z_p = perturbation_sum(batch.dosage, index, self._shift_mean(index).unsqueeze(0))[0]
        loc = self._basal_guide(self.encoder.gene_part(batch.counts, _covariate(batch)),
                                self._internal(z_p)).loc
        if self.latent_basis is not None:  # report in the mask basis (Q orthogonal)
            loc = loc @ self.latent_basis.to(loc.dtype).T
        return loc if kind == "basal" else loc + z_p

    # -- sparse orientation of the latent axes ----------------------------------------------

    @torch.no_grad()
    def rotate_to_sparse_basis(self, reopen: float = 0.0) -> torch.Tensor:
        """Re-express the perturbation embeddings and masks in the sparsest latent basis.

        With R = ``rotation.sparse_rotation(S)`` for the (T, L) guide means S of e_t * m_t,
        the new effects are S R and the basis Q becomes R^T Q, so the decoder's input
        ``z_basal + z_p Q`` (and the correlated basal guide) see unchanged perturbation
        effects in expectation. The factorised guide cannot be rotated exactly; it is mapped
        as follows (one rotation of a (T, L) guide):

        * q(m'_tk = 1) = 1 - prod_j (1 - q(m_tj = 1)) ** (R_jk^2): an axis made of off axes is
          off, one taking a share of an on axis is on in proportion to that share; then
          raised to at least ``reopen``;
        * mean of e'_tk = (S R)_tk / max(q(m'_tk = 1), 1/2), so the mean effect is kept for
          the entries likely on; variance of e'_tk = sum_j sigma_tj^2 R_jk^2;
        * the correlated embedding guide's network restarts from its mean-field start (its
          last layer set to zero).

        Returns the (L, L) rotation R applied (float64). Requires ``sparse_rotation_every``
        (the model then holds the basis buffer).
        """
        if self.latent_basis is None:
            raise RuntimeError("this model has no latent basis to rotate: build it with "
                               "sparse_rotation_every > 0")
        index = torch.arange(self.n_perturbations, device=self.emb_loc_raw.device)
        effects = self._shift_mean(index)                                   # (T, L)
        rot = sparse_rotation(effects)                                      # (L, L) f64 cpu
        dev, dtype = self.emb_loc_raw.device, self.emb_loc_raw.dtype
        r = rot.to(dev)
        w = r * r                                                           # mixing weights
        prob = torch.sigmoid(self.mask_logits.double()).clamp(1e-6, 1 - 1e-6)
        prob_new = (1.0 - torch.exp(torch.log1p(-prob) @ w)).clamp(1e-6, 1 - 1e-6)
        prob_new = prob_new.clamp_min(float(reopen))
        if self.corr_embedding:
            mode = (prob > 0.5).to(dtype).unsqueeze(0)
            log_scale = self._embedding_guide(index, mode)[1][0]
        else:
            log_scale = self.emb_log_scale
        var_new = torch.exp(2.0 * log_scale.double()) @ w
        loc_new = (effects.double() @ r) / prob_new.clamp_min(0.5)
        k = self.global_param_scale
        self.emb_loc_raw.copy_((loc_new / k).to(dtype))
        self.emb_log_scale_raw.copy_((0.5 * torch.log(var_new) / k).to(dtype))
        self.mask_logits_raw.copy_((torch.logit(prob_new) / k).to(dtype))
        if self.corr_embedding:
            self.embedding_net[2].weight.zero_()
            self.embedding_net[2].bias.zero_()
        self.latent_basis.copy_((r.T @ self.latent_basis.double()).to(self.latent_basis.dtype))
        return rot

    def set_perturbation_basal_shift(self, shift) -> None:
        """Set each perturbation's additive shift of its cells' basal posterior means over the
        control cells' ((T, L) in the mask basis; ``samsvae.train.basal_shift`` fits it on the
        training cells after training; zeros: predict from the guide's effects alone).

        Under the model z_basal ~ N(0, I) whatever the perturbation, but the amortised basal
        guide reads the counts and encodes whatever it can see of a perturbation's effect
        into its cells' basal states (cheaply, where the effect lies along directions cells
        vary in anyway); the guide's e_t * m_t then carries only the rest, and predictions
        that draw z_basal from the prior lose what was absorbed. Adding the shift back makes
        the predicted effect the full latent shift of the perturbation's cells. On the
        simulated mask-recovery screen (mean_field) it took the held-out ATE-Pearson from 0.08
        to 0.61 (the train_mean baseline: 0.60); on norman2019's held-out doubles from 0.60 to
        0.64, corr_both 0.22 to 0.38."""
        t = torch.as_tensor(np.asarray(shift, dtype=np.float64))
        if tuple(t.shape) != tuple(self.perturbation_basal_shift.shape) or \
                not bool(torch.isfinite(t).all()):
            raise ValueError(f"the basal shift must be {tuple(self.perturbation_basal_shift.shape)}"
                             f" finite values (perturbations x latent), got {tuple(t.shape)}")
        self.perturbation_basal_shift.copy_(t.to(self.perturbation_basal_shift.dtype))

    def perturbation_parameters(self) -> list:
        """Embedding means and scales, mask logits, the correlated guide's codes and the gene
        offsets."""
        return [p for p in (self.emb_loc_raw, self.emb_log_scale_raw, self.mask_logits_raw,
                            getattr(self, "emb_code_raw", None), self.gene_offsets)
                if p is not None]

    # -- exports -----------------------------------------------------------------------------

    def perturbation_masks(self):
        """(T, L) guide probabilities q(m_tk = 1); None for CPA-VAE (masks fixed to 1)."""
        if not self.masked:
            return None
        return torch.sigmoid(self.mask_logits.detach())

    @torch.no_grad()
    def perturbation_embeddings(self) -> torch.Tensor:
        """(T, L) guide means of e_t (corr_embedding: given the most probable mask)."""
        if not self.corr_embedding:
            return self.emb_loc.detach().clone()
        index = torch.arange(self.n_perturbations, device=self.emb_loc_raw.device)
        mode = (self.mask_logits > 0).to(self.emb_loc_raw.dtype).unsqueeze(0)
        return self._embedding_guide(index, mode)[0][0]


def _batch_index(batch):
    """The batch's sorted perturbation ids when its loader computed them on the host
    (``samsvae.data.Batch.perturbations``), else None (found with ``torch.unique``)."""
    return getattr(batch, "perturbations", None)


def _covariate(batch):
    """(B,) int64 batch covariate of the cells (``Batch.batch_index``), or None."""
    return getattr(batch, "batch_index", None)


def _default_basal_shift(module, state_dict, prefix, *args) -> None:
    """Load hook: runs saved before the basal shift existed predict from the guide alone."""
    key = prefix + "perturbation_basal_shift"
    if key not in state_dict:
        state_dict[key] = torch.zeros_like(module.perturbation_basal_shift)


def _drop_step_counter(module, state_dict, prefix, *args) -> None:
    """Load hook: earlier versions kept a ``train_steps`` buffer (the trainer counts now)."""
    state_dict.pop(prefix + "train_steps", None)
