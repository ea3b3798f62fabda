"""The common shell of every model: configuration, batch checks, the ELBO/IWELBO/prediction
drivers; subclasses supply the model-specific sampling (see the ``_`` hooks at the bottom)."""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import ops
from ..nn import NBLikelihood
from .distributions import expected_log2_normalized, nb_poisson_rate

# Normalised expression is log2(1 + NORMALIZED_LIBRARY * counts / library) ("perturbseq").
NORMALIZED_LIBRARY = 1e4
# Element budget of one (samples, conditions, genes) block in predict_normalized_expression.
PREDICT_BLOCK_ELEMENTS = 2 ** 22


def as_torch_csr(matrix, n_cols: int, *, device, dtype=torch.float32, name: str = "dosage"):
    """A (rows, n_cols) scipy sparse / numpy / torch matrix as a ``torch.sparse_csr`` tensor."""
    if torch.is_tensor(matrix):
        t = matrix if matrix.layout == torch.sparse_csr else matrix.to_dense().to_sparse_csr()
    elif hasattr(matrix, "tocsr"):
        m = matrix.tocsr()
        t = torch.sparse_csr_tensor(torch.as_tensor(m.indptr, dtype=torch.int64),
                                    torch.as_tensor(m.indices, dtype=torch.int64),
                                    torch.as_tensor(m.data), size=m.shape,
                                    check_invariants=False)
    else:
        arr = np.asarray(matrix)
        if arr.ndim == 1:
            arr = arr[None, :]
        t = torch.as_tensor(arr).to_sparse_csr()
    if t.dim() != 2 or t.shape[1] != n_cols:
        raise ValueError(f"{name} must be (rows, {n_cols}) (one column per perturbation of the "
                         f"model), got shape {tuple(t.shape)}")
    if t.values().dtype != dtype:
        t = torch.sparse_csr_tensor(t.crow_indices(), t.col_indices(), t.values().to(dtype),
                                    size=t.shape, check_invariants=False)
    return t.to(device)


@contextlib.contextmanager
def rng_scope(generator: Optional[torch.Generator], device: torch.device):
    """Run the block on the global RNG seeded from ``generator`` (restored afterwards).

    Used where torch samplers take no generator argument (Gamma, Beta); with ``generator=None``
    the global RNG is used as is.
    """
    if generator is None:
        yield
        return
    with seeded_rng(seed_from(generator), device):
        yield


def seed_from(generator: torch.Generator) -> int:
    """An integer seed drawn from ``generator`` (which advances by one draw).

    The seed comes from the generator's state, read on the host (a CUDA generator keeps its
    seed and offset there): drawing it from the generator and reading it back with .item()
    would synchronise with the device on every step."""
    state = generator.get_state().numpy().tobytes()
    seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 2
    torch.empty(1, device=generator.device).uniform_(generator=generator)
    return seed


@contextlib.contextmanager
def seeded_rng(seed: int, device):
    """Run the block on the global RNG seeded with ``seed`` (restored afterwards)."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _default_log_depth(module, state_dict, prefix, *args) -> None:
    """Load hook: models saved before the depth shifts existed predict at control depth."""
    key = prefix + "perturbation_log_depth"
    if key not in state_dict:
        state_dict[key] = torch.zeros_like(module.perturbation_log_depth)


def _nb_sample(mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """x ~ NB(mean mu, inverse dispersion theta) as Poisson(Gamma(theta, theta / mu))."""
    return torch.poisson(nb_poisson_rate(mu, log_theta))


class _Terms(Mapping):
    """``loss()["terms"]``: names -> floats, read back from the device on first access only
    (a training step that does not look at them never synchronises for them)."""

    def __init__(self, names, values: torch.Tensor):
        self._names, self._values, self._floats = tuple(names), values, None

    def _load(self) -> dict:
        if self._floats is None:
            self._floats = dict(zip(self._names, self._values.tolist()))
        return self._floats

    def __getitem__(self, key):
        return self._load()[key]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return repr(self._load())


class PerturbationModel(nn.Module):
    """Base class of the generative models (``samsvae.models.build_model`` builds them).

    Every model has a decoder ``f`` (one hidden layer, LeakyReLU) whose output logits give
    expression proportions ``softmax(f(z))`` and an NB likelihood with a learned per-gene
    inverse dispersion: ``x_ig ~ NB(mean = library_i softmax(f(z_i))_g, theta_g)``.

    Attributes:
        config: JSON-serialisable keyword arguments; ``build_model(**model.config)`` rebuilds the
            model (gene statistics and perturbation counts live in buffers, i.e. the state_dict).
        n_batches: number of batches of a batch covariate (0: none): the encoder's and the
            decoder's first layers read the cell's batch one-hot (``Batch.batch_index``), and
            predictions are made for a given batch. Recorded in ``config`` only when > 0.
    """

    has_masks = False

    def __init__(self, *, model: str, guide: str, n_genes: int, n_perturbations: int,
                 n_latent: int, n_hidden: int,
                 perturbation_counts=None, extra_config: Optional[dict] = None,
                 n_batches: int = 0):
        super().__init__()
        for name, v in (("n_genes", n_genes), ("n_perturbations", n_perturbations),
                        ("n_latent", n_latent), ("n_hidden", n_hidden)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.n_genes, self.n_perturbations = int(n_genes), int(n_perturbations)
        self.n_latent, self.n_hidden = int(n_latent), int(n_hidden)
        if int(n_batches) != n_batches or n_batches < 0:
            raise ValueError(f"n_batches must be a non-negative integer (0: no batch "
                             f"covariate), got {n_batches!r}")
        self.n_batches = int(n_batches)
        self.config = dict(model=model, guide=guide, n_genes=self.n_genes,
                           n_perturbations=self.n_perturbations, n_latent=self.n_latent,
                           n_hidden=self.n_hidden, **(extra_config or {}))
        if self.n_batches:  # absent key = no covariate: configs of earlier runs load unchanged
            self.config["n_batches"] = self.n_batches
        self.likelihood = NBLikelihood(self.n_genes)
        self.register_buffer("perturbation_counts", torch.zeros(self.n_perturbations))
        self.register_buffer("perturbation_counts_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("perturbation_log_depth", torch.zeros(self.n_perturbations))
        self._register_load_state_dict_pre_hook(_default_log_depth, with_module=True)
        if perturbation_counts is not None:
            self.set_perturbation_counts(perturbation_counts)

    # -- public interface ------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.config["model"]

    @property
    def guide_name(self) -> str:
        return self.config["guide"]

    def set_perturbation_counts(self, counts) -> None:
        """Set N_t, the number of TRAINING cells with each perturbation ((T,), global under
        DDP). The global terms of perturbation t are weighted ``1 / N_t`` per cell."""
        t = torch.as_tensor(np.asarray(counts, dtype=np.float64)).reshape(-1)
        if t.numel() != self.n_perturbations:
            raise ValueError(f"perturbation counts must have one entry per perturbation "
                             f"({self.n_perturbations}), got {t.numel()}")
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError("perturbation counts must be finite and non-negative "
                             "(cells of the training split carrying each perturbation)")
        self.perturbation_counts.copy_(t.to(self.perturbation_counts.dtype))
        self.perturbation_counts_set.fill_(True)

    def set_perturbation_log_depth(self, shifts) -> None:
        """Set each perturbation's shift of log library size over control cells ((T,), from
        the training cells: ``samsvae.data.log_depth_shifts``). Predictions of measured cells
        (:meth:`library_scale`) sequence a condition's simulated cells that much deeper."""
        t = torch.as_tensor(np.asarray(shifts, dtype=np.float64)).reshape(-1)
        if t.numel() != self.n_perturbations or not bool(torch.isfinite(t).all()):
            raise ValueError(f"log depth shifts must be {self.n_perturbations} finite values "
                             "(one per perturbation)")
        self.perturbation_log_depth.copy_(t.to(self.perturbation_log_depth.dtype))

    def library_scale(self, dosage) -> np.ndarray:
        """(n,) factor by which each condition's cells are expected to be deeper than control
        cells: ``exp(dosage @ perturbation_log_depth)``."""
        d = dosage.tocsr() if hasattr(dosage, "tocsr") else dosage
        shifts = self.perturbation_log_depth.detach().cpu().double().numpy()
        return np.exp(np.asarray(d @ shifts, dtype=np.float64).reshape(-1))

    def loss(self, batch, *, particles: int = 5,
             generator: Optional[torch.Generator] = None, global_weight: float = 1.0) -> dict:
        """Negative ELBO of a minibatch.

        Args:
            batch: ``samsvae.data.Batch`` (counts (B, G) CSR, dosage (B, T) CSR, library (B,)).
            particles: P samples of the guide; the ELBO is averaged over them.
            generator: optional ``torch.Generator`` for all the sampling noise.
            global_weight: weight of the global term (log prior minus log guide of the
                per-perturbation variables) in ``"loss"`` only; the trainer raises it from 0 to
                1 during the warm-up (``TrainConfig.global_kl_warmup``). ``"elbo"`` is always
                the ELBO itself. Below 1 a model may also train a simpler guide (SAMS-VAE's
                correlated basal guide then does not read z_p).

        Returns:
            ``{"loss": scalar = -(mean over cells and particles of the per-cell ELBO, its
            global term times ``global_weight``),
            "elbo": (B,) detached per-cell ELBO (nats; global terms reweighted 1/N_t),
            "terms": {"log_lik", "kl_local", "global": batch means (floats, nats per cell)}}``
        """
        self._check_batch(batch)
        if particles < 1:
            raise ValueError(f"particles must be >= 1, got {particles}")
        parts = self._elbo_parts(batch, particles, generator, warming_up=global_weight < 1.0)
        log_lik, kl_local, glob = parts["log_lik"], parts["kl_local"], parts.get("global")
        elbo_pb = log_lik - kl_local
        objective_pb = elbo_pb
        if glob is not None:
            objective_pb = elbo_pb + global_weight * glob
            elbo_pb = elbo_pb + glob
        elbo = _mean_particles(elbo_pb)
        loss = -_mean_particles(objective_pb).mean()
        zero = log_lik.new_zeros(())
        summary = torch.stack([log_lik.detach().mean(), kl_local.detach().mean(),
                               zero if glob is None else glob.detach().mean()])
        return {"loss": loss, "elbo": elbo.detach(),
                "terms": _Terms(("log_lik", "kl_local", "global"), summary)}

    @torch.no_grad()
    def iwelbo(self, batch, *, particles: int = 100, chunk: int = 10,
               global_seed: int = 0) -> torch.Tensor:
        """Importance-weighted ELBO per cell (nats), (B,).

        ``log w_k = log p(x | z_k) + log p(z_local_k) - log q(z_local_k | x[, z_p_k])``: the
        predictive form, with the global variables drawn from the guide as K particles that
        depend only on ``global_seed`` (every batch and cell reuses particle k's globals) and
        are not part of the weight. Evaluated ``chunk`` particles at a time
        (``samsvae.ops.iwelbo``), so memory does not grow with ``particles``.
        """
        self._check_batch(batch)
        state = self._iwelbo_setup(batch)
        return ops.iwelbo(lambda start, n: self._log_weights(batch, state, start, n,
                                                             int(global_seed)),
                          particles, chunk)

    @torch.no_grad()
    def predict_normalized_expression(self, dosage, *, n_samples: int, library=1e4,
                                      library_scale=None, effects: str = "mean",
                                      generator: Optional[torch.Generator] = None,
                                      batch=None) -> torch.Tensor:
        """Posterior-predictive mean normalised expression of conditions.

        Args:
            dosage: (n, T) CSR (torch or scipy) rows, one per condition; an empty row is the
                control.
            n_samples: simulated cells per condition.
            library: the simulated cells' library sizes (total counts): a number (every cell),
                or a 1-D array of sizes that simulated cell ``s`` takes in turn
                (``library[s % len(library)]``), e.g. the observed sizes of control cells, so
                that the predicted cells are sequenced as deeply as the measured ones.
            library_scale: optional (n,) factor multiplying the library sizes of each
                condition (e.g. :meth:`library_scale`: the depth a perturbation gives its cells).
            effects: ``"mean"`` (default): the perturbations' effects at their guide means
                (e.g. SAMS-VAE's mu_t * q(m_t = 1)), every simulated cell differing only in its
                basal state; ``"sample"``: a fresh draw of the effects from the guide per
                simulated cell (the full posterior predictive). Where a guide is still wide
                (an effect few cells pinned down, CPA-VAE's every latent dimension), sampled
                effects broaden the basal distribution, which through the decoder reads as a
                spurious effect; the mean effect is what an average treatment effect asks for
                (on norman2019's held-out doubles, CPA-VAE's ATE-Pearson 0.15 sampled, 0.31 at
                the mean).
            generator: optional ``torch.Generator`` making the result reproducible.
            batch: for a model with a batch covariate (``n_batches`` > 0), the batch the cells
                are simulated in: an int (every condition) or (n,) ints, positions in the
                run's batch categories; None for a model without one.

        Returns:
            (n, G) float32: mean over the simulated cells of ``E[log2(1 + 1e4 x / l)]``,
            ``x ~ NB(l softmax(f(z)), theta)`` at the cell's library ``l``: the normalisation
            of the data's ATE. The count's Poisson part is integrated exactly
            (``distributions.expected_log2_normalized``) rather than drawn: a drawn count's
            noise made two 2,500-cell predictions of a weak schraivogel2020 effect correlate
            only 0.71 with each other (0.9997 now, at 500 cells). The local latent comes from its prior and the globals from the
            guide. All conditions share the same latent and global draws and library sizes
            (common random numbers), which lowers the variance of differences between
            conditions such as treatment effects. Each condition's result depends on the
            generator's seed and on that condition only, not on the other rows of the call.
        """
        device = self.likelihood.log_theta.device
        dosage = as_torch_csr(dosage, self.n_perturbations, device=device,
                              dtype=self.likelihood.log_theta.dtype)
        total = torch.zeros(dosage.shape[0], self.n_genes, dtype=torch.float64, device=device)
        for i, _, lib, mu in self._simulate(dosage, n_samples, library, library_scale, effects,
                                            generator, batch):
            value = expected_log2_normalized(mu, self.likelihood.log_theta,
                                             NORMALIZED_LIBRARY / lib)
            total[i] += value.sum((0, 1), dtype=torch.float64)
        return (total / n_samples).to(torch.float32)

    @torch.no_grad()
    def sample_counts(self, dosage, *, n_cells: int, library, library_scale=None,
                      effects: str = "mean", generator: Optional[torch.Generator] = None,
                      batch=None):
        """Simulated raw counts of ``n_cells`` cells per condition.

        Arguments as :meth:`predict_normalized_expression` (``library``: a number, or sizes
        that simulated cell ``s`` takes in turn); the same random stream, so a condition's
        cells depend on the generator's seed and that condition only.

        Yields ``(condition i, first cell s0, library (s,) float64, counts (s, G) int64 CPU
        tensor)`` blocks in order (condition by condition; memory of one block)."""
        device = self.likelihood.log_theta.device
        dosage = as_torch_csr(dosage, self.n_perturbations, device=device,
                              dtype=self.likelihood.log_theta.dtype)
        for i, s0, lib, mu in self._simulate(dosage, n_cells, library, library_scale, effects,
                                             generator, batch):
            x = _nb_sample(mu, self.likelihood.log_theta)
            yield (i, s0, lib.reshape(-1).to("cpu", torch.float64),
                   x[:, 0].to("cpu").round().to(torch.int64))

    def _simulate(self, dosage, n_samples, library, library_scale, effects, generator, batch):
        """The simulation loop shared by prediction and :meth:`sample_counts`: yields
        ``(condition i, first cell s0, library (s, 1, 1), NB means (s, 1, G))`` blocks, inside
        the condition's seeded random stream (what the caller draws from the global RNG
        between two blocks continues that stream)."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        device = self.likelihood.log_theta.device
        dtype = self.likelihood.log_theta.dtype
        n = dosage.shape[0]
        sizes = torch.as_tensor(np.asarray(library, dtype=np.float64).reshape(-1))
        if sizes.numel() == 0 or not bool(torch.isfinite(sizes).all()) or bool((sizes <= 0).any()):
            raise ValueError("library must be a positive number or a non-empty array of positive "
                             "library sizes (total counts per simulated cell)")
        sizes = sizes.to(device=device, dtype=dtype)
        batches = self._condition_batches(batch, n)
        seed = (seed_from(generator) if generator is not None
                else int(torch.randint(0, 2 ** 62, (1,))))
        crow, col, val = (t.cpu() for t in (dosage.crow_indices(), dosage.col_indices(),
                                             dosage.values()))
        step = max(1, PREDICT_BLOCK_ELEMENTS // self.n_genes)
        scale = (np.ones(n) if library_scale is None
                 else np.asarray(library_scale, dtype=np.float64).reshape(-1))
        if scale.shape != (n,) or not np.all(np.isfinite(scale) & (scale > 0)):
            raise ValueError(f"library_scale must be {n} positive factors, one per condition")
        if effects not in ("mean", "sample"):
            raise ValueError(f"effects must be 'mean' or 'sample', got {effects!r}")
        for i in range(n):
            # every condition restarts the same random stream: its draws depend on the seed and
            # the condition only, and conditions share their basal and library draws
            lo, hi = int(crow[i]), int(crow[i + 1])
            row = torch.sparse_csr_tensor(torch.tensor([0, hi - lo]), col[lo:hi], val[lo:hi],
                                          size=(1, self.n_perturbations),
                                          check_invariants=False).to(device)
            kw = {} if batches is None else {"batch_index": batches[i:i + 1].to(device)}
            with seeded_rng(seed, device):
                for s0 in range(0, n_samples, step):
                    s = min(step, n_samples - s0)
                    hidden = self._predictive_hidden(row, s, seed=seed, start=s0,
                                                     mean_effects=effects == "mean", **kw)
                    logits = self.decoder.logits(hidden) + self._condition_logit_offset(row)
                    lib = sizes[torch.arange(s0, s0 + s, device=device) % sizes.numel()]
                    lib = lib.view(s, 1, 1) * float(scale[i])
                    yield i, s0, lib, lib * torch.softmax(logits, dim=-1)

    def _condition_batches(self, batch, n: int) -> Optional[torch.Tensor]:
        """(n,) int64 batch of each condition (None for a model without a batch covariate)."""
        if not self.n_batches:
            if batch is not None:
                raise ValueError("this model has no batch covariate (trained without a batch "
                                 "key): predict without batch=")
            return None
        if batch is None:
            raise ValueError(f"this model is conditioned on a batch covariate ({self.n_batches} "
                             "batches): name the batch to simulate the cells in (batch=)")
        b = np.asarray(batch).reshape(-1)
        if b.size == 1:
            b = np.repeat(b, n)
        if b.shape != (n,) or not np.issubdtype(b.dtype, np.integer) or \
                (b.size and (b.min() < 0 or b.max() >= self.n_batches)):
            raise ValueError(f"batch must be one batch or {n} batches, each in "
                             f"[0, {self.n_batches}), got {batch!r}")
        return torch.as_tensor(b, dtype=torch.int64)

    def latent_representation(self, batch, kind: str = "basal") -> torch.Tensor:
        """(B, L) guide means: ``"basal"`` the cell's basal state, ``"full"`` basal + the guide
        mean of its perturbation latent."""
        if kind not in ("basal", "full"):
            raise ValueError(f"kind must be 'basal' or 'full', got {kind!r}")
        self._check_batch(batch, need_counts=True)
        with torch.no_grad():
            return self._latent(batch, kind)

    def perturbation_parameters(self) -> list:
        """The parameters that belong to single perturbations (or labels), which learn from
        the few cells of a batch carrying them: a trainer gives them a larger step size
        (``TrainConfig.perturbation_lr_scale``). The networks' weights are not in it."""
        return []

    def perturbation_masks(self) -> Optional[torch.Tensor]:
        """(T, L) guide probabilities q(m_tk = 1); None for models without masks."""
        return None

    def known_conditions(self, dosage) -> np.ndarray:
        """(n,) bool: which dosage rows the model can predict (all of them, except for models
        that treat each combination as its own label, such as SVAE+)."""
        return np.ones(dosage.shape[0], dtype=bool)

    def perturbation_embeddings(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared helpers --------------------------------------------------------------------

    def _check_batch(self, batch, need_counts: bool = True) -> None:
        for field in ("counts", "dosage", "library"):
            if not hasattr(batch, field):
                raise TypeError(f"batch must be a samsvae.data.Batch (counts, dosage, library, "
                                f"index); it has no {field!r}")
        counts, dosage, library = batch.counts, batch.dosage, batch.library
        if counts.dim() != 2 or counts.shape[1] != self.n_genes:
            raise ValueError(f"batch.counts must be (cells, {self.n_genes}) for this model, got "
                             f"{tuple(counts.shape)}: the screen's genes differ from the ones "
                             "the model was built with")
        if dosage.layout != torch.sparse_csr:
            raise ValueError("batch.dosage must be a torch.sparse_csr (cells x perturbations) "
                             "tensor; build batches with samsvae.data.MinibatchLoader")
        if tuple(dosage.shape) != (counts.shape[0], self.n_perturbations):
            raise ValueError(f"batch.dosage must be ({counts.shape[0]}, {self.n_perturbations}),"
                             f" got {tuple(dosage.shape)}: the perturbation vocabulary differs "
                             "from the model's")
        if tuple(library.shape) != (counts.shape[0],):
            raise ValueError(f"batch.library must be ({counts.shape[0]},), got "
                             f"{tuple(library.shape)}")
        if self.n_batches:
            codes = getattr(batch, "batch_index", None)
            if codes is None or tuple(codes.shape) != (counts.shape[0],):
                raise ValueError(f"this model is conditioned on a batch covariate "
                                 f"({self.n_batches} batches): batch.batch_index must be "
                                 f"({counts.shape[0]},); load the data with the run's batch "
                                 f"key (batch_key=...)")

    def _log_library(self, batch) -> torch.Tensor:
        dtype = self.likelihood.log_theta.dtype
        return torch.log(batch.library.to(dtype).clamp_min(1.0))

    def _log_lik(self, counts, hidden, log_library) -> torch.Tensor:
        """log p(x | z) from the decoder's hidden layer (..., B, H) -> (..., B).

        Through ``samsvae.ops.nb_log_prob_linear`` with ``recompute=None``, which decides: with
        gradients and logits that fit in ``samsvae.ops.nb.STORED_LOGITS_BYTES`` (a training
        step) one (P, B, G) tensor is kept for backward: 3 products of the last layer (forward,
        input and weight gradients); on the C++ backend the NB forward computes the gradient as
        well. Otherwise (evaluation, or logits too big) the last Linear is fused with the NB
        likelihood chunk by chunk, never storing the logits but recomputing them in backward
        (a 4th product)."""
        out = self.decoder.out
        return self.likelihood.forward_linear(counts, hidden, out.weight, out.bias, log_library,
                                              recompute=None)

    def _require_counts(self) -> torch.Tensor:
        return self._require_set(
            self.perturbation_counts, self.perturbation_counts_set,
            "perturbation counts N_t are not set: pass perturbation_counts= to build_model "
            "or call model.set_perturbation_counts(counts) with the number of training "
            "cells carrying each perturbation (samsvae.data.perturbation_cell_counts)")

    def _require_set(self, values: torch.Tensor, flag: torch.Tensor, message: str):
        """``values`` once its buffer ``flag`` says they were set, else RuntimeError(message).
        The flag lives in a buffer (state_dict): read once per module and buffer object (a
        host sync), not every step."""
        checked = self.__dict__.setdefault("_flags_checked", {})
        if checked.get(message) is flag:
            return values
        if not bool(flag):
            raise RuntimeError(message)
        checked[message] = flag
        return values

    # -- hooks for the subclasses ------------------------------------------------------------

    def _elbo_parts(self, batch, particles, generator,
                    warming_up: bool = False) -> dict:  # pragma: no cover - abstract
        """{"log_lik": (P, B), "kl_local": (P, B) or (B,), "global": (P, B) or None};
        ``warming_up``: the loss's global weight is below 1 (the trainer's warm-up)."""
        raise NotImplementedError

    def _iwelbo_setup(self, batch):  # pragma: no cover - abstract
        """Per-batch work shared by all particle chunks (e.g. the encoder's gene part)."""
        raise NotImplementedError

    def _log_weights(self, batch, state, start, n, seed) -> torch.Tensor:  # pragma: no cover
        """(n, B) log importance weights of particles start .. start+n-1."""
        raise NotImplementedError

    def _predictive_hidden(self, dosage, n_samples, *, seed: int, start: int,
                           mean_effects: bool = False,
                           batch_index=None) -> torch.Tensor:  # pragma: no cover
        """(n_samples, n, H) decoder hidden layer of simulated cells ``start .. start +
        n_samples - 1`` of each condition, on the global RNG: the basal draws first (shared by
        all conditions), then the condition's own; globals keyed by ``seed`` and perturbation
        id where the model has them (the same draws of A in "A" and in "A+B"), or at their
        guide means with ``mean_effects``. ``batch_index`` (1,): the batch covariate of the
        simulated cells (models with ``n_batches`` > 0)."""
        raise NotImplementedError

    def _condition_logit_offset(self, row):
        """What a condition's (1, T) dosage row adds to the decoder's logits besides its latent
        effect: 0 here; (G,) for a model with per-perturbation gene offsets."""
        return 0.0

    def _latent(self, batch, kind) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _mean_particles(per_particle: torch.Tensor) -> torch.Tensor:
    """(B,) per-cell mean over particles of a (P, B) term ((B,) passes through)."""
    return per_particle.mean(0) if per_particle.dim() == 2 else per_particle
