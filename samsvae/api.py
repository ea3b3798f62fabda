"""The user-facing class, in the shape of scvi-tools models.

    import samsvae
    samsvae.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = samsvae.SAMSVAE(adata, model="sams_vae", guide="mean_field", n_latent=100)
    model.train(max_epochs=200)
    z = model.get_latent_representation(store=True)          # also adata.obsm["X_samsvae_basal"]
    pred = model.predict(["KLF1", "KLF1+MAP2K6"])            # AnnData: conditions x genes
    counts = model.sample_counts(["KLF1", "control"], n_cells=500)   # AnnData: cells x genes
    ate = model.average_treatment_effects()                  # AnnData with the data ATE layer
    masks = model.get_perturbation_masks()                   # DataFrame: perturbations x latent
    model.save("run/"); model = samsvae.SAMSVAE.load("run/", adata)

A saved model is a run directory (see ``samsvae.train.run_dir``), so ``samsvae evaluate`` reads
it as well as the runs of ``samsvae train``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import ops
from .data import MinibatchLoader, check_indices, load_screen, make_split, parse_labels
from .data.perturbations import noncell_labels, read_label_column, refuse_noncell_labels
from .data.screen import check_not_empty
from .infer import baseline_anndata, data_ate, model_ate, pearson, test_iwelbo
from .infer.ate import condition_dosage, control_library, warn_untrained_parts
from .train import TrainConfig, fit
from .train.prepare import build_model_for_screen, split_indices
from .train.run_dir import align_screen, load_run, read_config, run_config, save_run

UNS_KEY = "_samsvae"
_SETUP_FIELDS = ("perturbation_key", "layer", "control_label", "separator", "drop_labels",
                 "dosage_key", "keep_labels", "batch_key")


class SAMSVAE:
    """SAMS-VAE (and the other models of the paper) on an AnnData of raw counts.

    Args:
        adata: AnnData registered with :meth:`setup_anndata`.
        model: ``"sams_vae"`` | ``"cpa_vae"`` | ``"svae_plus"`` | ``"cvae"``.
        guide: inference variant (``"mean_field"``, ``"corr_embedding"``, ``"corr_basal"``,
            ``"corr_both"``; see ``samsvae.models.MODEL_GUIDES``).
        n_latent: latent dimensions L.
        n_hidden: hidden units of the encoder/decoder MLPs.
        split: ``"random"`` | ``"ood_combinations"`` | an obs column holding train/val/test.
        seed: seeds the split, the initial weights and the training noise.
        **model_kwargs: further ``build_model`` options.

    Attributes:
        module: the underlying ``PerturbationModel`` (a torch ``nn.Module``).
        screen: the ``ScreenData`` built from ``adata``.
        split: (n_cells,) "train" / "val" / "test" per screen cell.
        history: training curves (``{"train": {...}, "val": {...}}``).
    """

    def __init__(self, adata, model: str = "sams_vae", guide: str = "mean_field",
                 n_latent: int = 100, n_hidden: int = 400, split: str = "random", seed: int = 0,
                 **model_kwargs):
        import torch

        setup = _registered(adata)
        self.adata = adata
        self.screen = load_screen(adata, **_load_options(setup))
        self.split = np.asarray(make_split(self.screen, split, seed=seed)).astype(str)
        torch.manual_seed(seed)
        self.module = build_model_for_screen(self.screen, split_indices(self.split, "train"),
                                             model=model, guide=guide, n_latent=n_latent,
                                             n_hidden=n_hidden, **model_kwargs)
        self.init_params = dict(model=model, guide=guide, n_latent=n_latent, n_hidden=n_hidden,
                                split=split, seed=seed, **model_kwargs)
        self.setup = setup
        self.history: dict = {}
        self.is_trained = False

    # -- registration -----------------------------------------------------------------------

    @staticmethod
    def setup_anndata(adata, perturbation_key: str = "perturbation", layer: Optional[str] = None,
                      control_label: Optional[str] = None, separator: str = "+",
                      drop_labels: Sequence[str] = (), dosage_key: Optional[str] = None,
                      keep_labels: Sequence[str] = (), batch_key: Optional[str] = None) -> None:
        """Register where the counts and perturbations of ``adata`` live.

        Checks the fields exist and the labels parse (finding the control label), then stores
        the options in ``adata.uns["_samsvae"]`` (written along with the .h5ad).

        Args:
            perturbation_key: obs column of labels; combinations joined by ``separator``.
            layer: layer holding raw integer counts (None: ``X``).
            control_label: label of unperturbed cells (None: detect control/ctrl/non-targeting).
            drop_labels: labels whose cells are left out (e.g. unassigned guides).
            keep_labels: labels that look like non-cells (unassigned, multiplet, NA, nan,
                None, empty, ...: refused otherwise) but are real perturbations to model.
            dosage_key: obsm key of a precomputed cells x perturbations dosage matrix, used
                instead of labels.
            batch_key: obs column of a batch covariate (cell line, donor, lane; None: none).
                The encoder and decoder read its one-hot (scvi-tools style); predictions,
                simulated counts and treatment effects are made per batch, each against that
                batch's control cells.
        """
        import anndata
        if not isinstance(adata, anndata.AnnData):
            raise TypeError(f"setup_anndata needs an AnnData, got {type(adata).__name__}")
        if isinstance(drop_labels, str):
            drop_labels = [drop_labels]
        if isinstance(keep_labels, str):
            keep_labels = [keep_labels]
        check_not_empty(adata)
        if layer is not None and layer not in adata.layers:
            raise ValueError(f"layer {layer!r} not found; available layers: "
                             f"{list(adata.layers.keys()) or 'none'}. Pass layer=None to use X.")
        if dosage_key is not None:
            if dosage_key not in adata.obsm:
                raise ValueError(f"obsm has no dosage matrix {dosage_key!r}; available obsm "
                                 f"keys: {list(adata.obsm.keys()) or 'none'}")
        else:
            labels = read_label_column(adata.obs, perturbation_key).to_numpy()
            keep = ~np.isin(labels, np.asarray(list(drop_labels), dtype=object))
            refuse_noncell_labels(noncell_labels(labels[keep], keep=keep_labels,
                                                 control_label=control_label), perturbation_key)
            parse_labels(labels[keep], separator=separator, control_label=control_label)
        if batch_key is not None:
            if batch_key not in adata.obs.columns:
                raise ValueError(f"batch_key {batch_key!r} is not a column of adata.obs "
                                 f"(columns: {', '.join(map(repr, list(adata.obs.columns)[:12]))})"
                                 "; pass the obs column holding each cell's batch")
        options = {"perturbation_key": perturbation_key, "layer": layer,
                   "control_label": control_label, "separator": separator,
                   "drop_labels": [str(x) for x in drop_labels], "dosage_key": dosage_key,
                   "keep_labels": [str(x) for x in keep_labels], "batch_key": batch_key}
        # h5ad cannot store None: absent keys mean None
        adata.uns[UNS_KEY] = {k: v for k, v in options.items() if v is not None}

    # -- training ---------------------------------------------------------------------------

    def train(self, max_epochs: Optional[int] = None, max_steps: Optional[int] = None,
              batch_size: int = 512, particles: int = 5, lr: float = TrainConfig.lr,
              perturbation_lr_scale: float = TrainConfig.perturbation_lr_scale,
              global_kl_warmup: float = TrainConfig.global_kl_warmup,
              early_stopping_patience: Optional[int] = TrainConfig.early_stopping_patience,
              weight_decay: float = 1e-6, grad_clip: Optional[float] = None,
              val_every: Optional[int] = None, val_particles: int = 1, device: str = "cpu",
              backend: str = "auto", progress: bool = True, checkpoint_dir=None,
              checkpoint_every: int = 1000, resume: bool = False, restore_best: bool = True,
              log=print) -> "SAMSVAE":
        """Fit the model with Adam on the training cells, validating on the ``val`` cells.

        Args:
            max_epochs / max_steps: length of training (at most one; default:
                ``min(400, round(8e6 / n_train_cells))`` epochs).
            batch_size, particles, lr, perturbation_lr_scale, global_kl_warmup,
                early_stopping_patience, weight_decay, grad_clip: see ``TrainConfig``.
            val_every: steps between validations (default: each epoch).
            device: ``"cpu"`` or ``"cuda"``; the model stays there afterwards.
            backend: kernel backend of the fused ops for this training (``"auto"``,
                ``"reference"``, ``"cpp"``, ``"triton"``); not saved with the model (other
                calls take ``samsvae.ops.use_backend``).
            restore_best: end with the weights of the best validation ELBO.
            checkpoint_dir: write a run directory with ``checkpoints/`` there (enables
                ``resume=True`` after an interruption).
            log: called with progress lines when no bar is shown (None: silent).
        """
        config = TrainConfig(max_steps=max_steps, max_epochs=max_epochs, batch_size=batch_size,
                             particles=particles, lr=lr,
                             perturbation_lr_scale=perturbation_lr_scale,
                             global_kl_warmup=global_kl_warmup,
                             early_stopping_patience=early_stopping_patience,
                             weight_decay=weight_decay,
                             grad_clip=grad_clip, val_every=val_every,
                             val_particles=val_particles, checkpoint_every=checkpoint_every,
                             seed=self.init_params["seed"], device=device, progress=progress)
        with ops.use_backend(backend):
            trainer = fit(self.module, self.screen, self.split, config, run_dir=checkpoint_dir,
                          run_config=self._run_config(config.to_dict()), resume=resume,
                          restore_best=restore_best, log=log)
        self.history = trainer.history
        self.train_config = config.to_dict()
        self.is_trained = True
        self.module.eval()
        return self

    # -- inference --------------------------------------------------------------------------

    @property
    def perturbations(self) -> list:
        """The perturbation vocabulary (order of the mask/embedding rows)."""
        return list(self.screen.perturbations)

    @property
    def device(self):
        return next(self.module.parameters()).device

    def get_latent_representation(self, adata=None, kind: str = "basal", indices=None,
                                  batch_size: int = 1024, store: bool = False) -> np.ndarray:
        """Guide means of the latent state of cells, (n_cells, L) float32.

        Args:
            adata: cells to embed (default: the training AnnData); must have the model's genes.
            kind: ``"basal"`` (the cell without its perturbation) or ``"full"`` (basal + the
                perturbation latent).
            indices: rows of the (kept cells of the) data; default all.
            store: also write ``adata.obsm["X_samsvae_<kind>"]`` ((adata.n_obs, L); NaN for
                cells left out, e.g. dropped labels).
        """
        if kind not in ("basal", "full"):
            raise ValueError(f"kind must be 'basal' or 'full', got {kind!r}")
        import torch
        target = self.adata if adata is None else adata
        screen = self._screen_for(adata)
        idx = self._rows(screen, indices)
        self.module.eval()
        out = []
        with torch.no_grad():
            for batch in self._loader(screen, idx, batch_size):
                out.append(self.module.latent_representation(batch.to(self.device), kind=kind)
                           .float().cpu().numpy())
        z = np.concatenate(out) if out else np.zeros((0, self.module.n_latent), np.float32)
        if store:
            full = np.full((target.n_obs, z.shape[1]), np.nan, dtype=np.float32)
            full[screen.cell_index[idx]] = z
            target.obsm[f"X_samsvae_{kind}"] = full
        return z

    def get_marginal_ll(self, adata=None, indices=None, n_particles: int = 100,
                        return_mean: bool = True, batch_size: int = 512, chunk: int = 10,
                        seed: int = 0):
        """Importance-weighted lower bound of log p(x) (nats): the mean over cells, or
        (n_cells,) per cell with ``return_mean=False``. Deterministic for a given ``seed``."""
        screen = self._screen_for(adata)
        idx = self._rows(screen, indices)
        self.module.eval()
        values = np.asarray(test_iwelbo(self.module, self._loader(screen, idx, batch_size),
                                        particles=n_particles, chunk=chunk, global_seed=seed))
        return float(values.mean()) if return_mean else values

    def predict(self, perturbations: Sequence[str], n_samples: int = 1000,
                library="control", effects: str = "mean", seed: int = 0, batch=None):
        """Predicted mean normalised expression of conditions, as an AnnData.

        Args:
            perturbations: labels of seen perturbations or compositions of seen ones
                (``"A"``, ``"A+B"``; the control label or ``"control"`` for the control).
            n_samples: simulated cells per condition.
            library: ``"control"`` (default): the simulated cells are sequenced as deeply as
                the data's control cells, each condition scaled by the depth its
                perturbations give their cells (learnt from the training cells); a number:
                every cell at that library size (1e4: "perturbseq" counts per 10,000).
            effects: ``"mean"`` (default) or ``"sample"``, see
                ``PerturbationModel.predict_normalized_expression``.
            batch: a model set up with ``batch_key``: the batch (a name, or a list) to predict
                in, at that batch's control depth; None: every batch (one row per condition
                and batch, ``obs["batch"]``).

        Returns:
            AnnData (conditions x genes), ``X`` = mean of log2(1 + 1e4 x / library) over the
            simulated cells (the normalisation of the ATEs), ``obs["label"]`` the canonical
            label. Each condition depends on the seed and on that condition only.
        """
        from .infer.counts import batch_codes_for
        import anndata
        import pandas as pd
        import torch
        self._require_trained("predict")
        labels = _as_label_list(perturbations)
        dosage, canonical = self._dosage_rows(labels)
        warn_untrained_parts(self.module, self.screen, dosage, canonical)
        self.module.eval()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        if isinstance(library, str) and library != "control":
            raise ValueError(f"library must be 'control' or a number, got {library!r}")
        codes = batch_codes_for(self.module, self.screen, batch)
        preds, rows = [], []
        for code in codes:
            scale, lib = None, library
            if isinstance(library, str):
                lib = control_library(self.screen, seed, batch=code)
                scale = self.module.library_scale(dosage)
            gen.manual_seed(int(seed))
            kw = {} if code is None else {"batch": code}
            preds.append(self.module.predict_normalized_expression(
                dosage, n_samples=n_samples, library=lib, library_scale=scale,
                effects=effects, generator=gen, **kw).cpu().numpy().astype(np.float32))
            rows.append(code)
        obs = pd.DataFrame({"label": canonical * len(codes)},
                           index=pd.Index(labels * len(codes), dtype=str))
        if codes != [None]:
            cats = list(self.screen.batch_categories)
            obs["batch"] = [cats[c] for c in codes for _ in labels]
            obs.index = pd.Index([f"{l}|{b}" for l, b in zip(obs.index, obs["batch"])],
                                 dtype=str)
        var = pd.DataFrame(index=pd.Index(self.screen.gene_names, dtype=str))
        out = anndata.AnnData(X=np.concatenate(preds), obs=obs, var=var)
        out.uns["samsvae_predict"] = {
            "n_samples": int(n_samples), "seed": int(seed), "effects": effects,
            "library": "control" if scale is not None else float(library)}
        return out

    def sample_counts(self, perturbations: Sequence[str], n_cells: int = 100,
                      library="control", batch=None, seed: int = 0, effects: str = "mean"):
        """Simulated raw counts of ``n_cells`` cells per condition (and batch), as an AnnData.

        Args:
            perturbations: conditions (seen perturbations, compositions ``"A+B"``, or the
                control label, e.g. to test each condition against control).
            n_cells: cells per condition (per batch with a batch covariate).
            library: ``"control"`` (default): each cell's library size drawn (seeded) from
                the data's control cells (of its batch), scaled by the condition's learnt depth
                shift; a number: every cell at that size.
            batch: a model set up with ``batch_key``: a batch name or a list; None: all.
            seed: a condition's cells depend on the seed and that condition only.

        Returns:
            AnnData (simulated cells x genes): ``X`` int32 CSR counts, ``obs["condition"]``,
            ``obs["library"]`` (and ``obs["batch"]``): ready for ``scanpy.pp.normalize_total``,
            ``log1p``, ``rank_genes_groups``, pertpy or PyDESeq2.
        """
        from .infer.counts import sample_counts_anndata
        self._require_trained("sample_counts")
        return sample_counts_anndata(self.module, self.screen, _as_label_list(perturbations),
                                     n_cells=n_cells, library=library, batch=batch, seed=seed,
                                     effects=effects)

    def average_treatment_effects(self, perturbations: Optional[Sequence[str]] = None,
                                  n_samples: int = 2500, split: str = "test", seed: int = 0):
        """Model average treatment effects (vs control), with the data's where available.

        Args:
            perturbations: labels (seen perturbations or compositions); default every label
                with cells in ``split``.
            n_samples: simulated cells per condition.
            split: cells whose empirical ATE goes into ``layers["data_ate"]`` (``"all"``: all).

        Returns:
            AnnData (perturbations x genes): ``X`` model ATE (log2 normalised expression),
            ``layers["data_ate"]`` (NaN rows for labels without cells), ``obs["n_cells"]``,
            ``obs["pearson"]`` (model vs data, per label).
        """
        import anndata
        import pandas as pd

        self._require_trained("average_treatment_effects")
        idx = (np.arange(self.screen.n_cells) if split == "all"
               else np.flatnonzero(self.split == split))
        if idx.size:
            d_labels, d_ate = data_ate(self.screen, idx)
        else:
            d_labels, d_ate = [], np.zeros((0, self.screen.n_genes))
        d_labels = [str(x) for x in d_labels]
        if perturbations is None:
            if not d_labels:
                raise ValueError(f"no perturbed cell in split {split!r}; pass perturbations=[...] "
                                 "or another split ('all')")
            labels = d_labels
        else:
            labels = [c for c in self._dosage_rows(_as_label_list(perturbations))[1]]
            control = self._control_label()
            if control in labels:
                raise ValueError("the control has no treatment effect against itself; leave it "
                                 "out of perturbations")
        if getattr(self.screen, "batch_codes", None) is not None:
            # within each batch against its controls, pooled by the cells of each label
            from .infer.by_batch import model_ate_by_batch, pool
            from .infer.by_batch import label_batch_counts
            weights = label_batch_counts(self.screen, idx, labels) if idx.size else \
                np.zeros((len(labels), self.screen.n_batches), np.int64)
            weights[weights.sum(axis=1) == 0] = 1  # no evaluated cell: every batch alike
            m_ate = pool(model_ate_by_batch(self.module, self.screen, labels, weights,
                                            n_samples=n_samples, seed=seed),
                         weights).astype(np.float32)
            if idx.size and d_labels:
                from .infer.by_batch import data_ate_by_batch
                d_pb, w_d = data_ate_by_batch(self.screen, idx, d_labels)
                d_ate = pool(d_pb, w_d)
        else:
            m_ate = np.asarray(model_ate(self.module, self.screen, labels, n_samples=n_samples,
                                         seed=seed), dtype=np.float32)
        row = {lab: i for i, lab in enumerate(d_labels)}
        data = np.full_like(m_ate, np.nan)
        for i, lab in enumerate(labels):
            if lab in row:
                data[i] = d_ate[row[lab]]
        counts = pd.Series(np.asarray(self.screen.labels)[idx]).value_counts()
        obs = pd.DataFrame({"n_cells": [int(counts.get(lab, 0)) for lab in labels],
                            "pearson": [pearson(m_ate[i], data[i]) for i in range(len(labels))]},
                           index=pd.Index(labels, dtype=str))
        var = pd.DataFrame(index=pd.Index(self.screen.gene_names, dtype=str))
        out = anndata.AnnData(X=m_ate, obs=obs, var=var)
        out.layers["data_ate"] = data
        out.uns["samsvae_ate"] = {"n_samples": int(n_samples), "split": split, "seed": int(seed)}
        return out

    def baseline_effects(self, baseline: str = "additive",
                         perturbations: Optional[Sequence[str]] = None, split: str = "test"):
        """A baseline's predicted ATE (``control``, ``train_mean``, ``additive``, ``linear``;
        see ``samsvae.infer.baselines``), from the training cells alone, shaped like
        :meth:`average_treatment_effects` (obs = labels, var = genes, ``X`` = ATE, NaN rows where
        undefined, ``layers["data_ate"]`` of ``split``): score either with
        ``samsvae.evaluate_predictions(adata)``."""
        idx = np.flatnonzero(self.split == split) if split != "all" else \
            np.arange(self.screen.n_cells)
        d_labels, d_ate = data_ate(self.screen, idx) if idx.size else ([], None)
        labels = (list(d_labels) if perturbations is None
                  else self._dosage_rows(_as_label_list(perturbations))[1])
        out = baseline_anndata(self.screen, np.flatnonzero(self.split == "train"), labels,
                               baseline)
        row = {lab: i for i, lab in enumerate(d_labels)}
        data = np.full(out.shape, np.nan, dtype=np.float32)
        for i, lab in enumerate(labels):
            if lab in row:
                data[i] = d_ate[row[lab]]
        out.layers["data_ate"] = data
        return out

    def get_perturbation_masks(self):
        """DataFrame (perturbations x latent dims) of the guide's q(mask = 1) (SVAE+: NaN rows
        for perturbations seen only in combinations)."""
        import pandas as pd
        masks = self.module.perturbation_masks()
        if masks is None:
            raise ValueError(f"model {self.init_params['model']!r} has no perturbation masks "
                             "(sams_vae and svae_plus learn them; cpa_vae fixes them to 1)")
        return pd.DataFrame(masks.detach().cpu().numpy(), index=self.perturbations,
                            columns=[f"z{k}" for k in range(masks.shape[1])])

    def get_perturbation_embeddings(self):
        """DataFrame (perturbations x latent dims) of the guide means of the embeddings (SVAE+:
        the shift of each single-perturbation label; NaN rows for perturbations seen only in
        combinations)."""
        import pandas as pd
        emb = self.module.perturbation_embeddings()
        return pd.DataFrame(emb.detach().cpu().numpy(), index=self.perturbations,
                            columns=[f"z{k}" for k in range(emb.shape[1])])

    # -- persistence ------------------------------------------------------------------------

    def save(self, dir_path, overwrite: bool = False) -> Path:
        """Write the model as a run directory (config.json, split.csv, model.pt, history)."""
        dir_path = Path(dir_path)
        if dir_path.exists() and any(dir_path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{dir_path} exists and is not empty; pass overwrite=True "
                                      "or choose another directory")
            if (dir_path / "config.json").is_file():
                shutil.rmtree(dir_path / "checkpoints", ignore_errors=True)
        config = self._run_config(getattr(self, "train_config", None))
        return save_run(dir_path, config=config, screen=self.screen, split=self.split,
                        model=self.module, history=self.history)

    @classmethod
    def load(cls, dir_path, adata, map_location=None) -> "SAMSVAE":
        """Rebuild a saved model for ``adata`` (which must have the model's genes, in order)."""
        config = read_config(dir_path)
        setup = {k: config["data"].get(k) for k in _SETUP_FIELDS}
        setup["drop_labels"] = list(setup.get("drop_labels") or [])
        setup["keep_labels"] = list(setup.get("keep_labels") or [])
        setup["separator"] = setup.get("separator") or "+"
        setup["perturbation_key"] = setup.get("perturbation_key") or "perturbation"
        if UNS_KEY not in adata.uns:
            cls.setup_anndata(adata, **setup)
        loaded = load_run(dir_path, data=_registered_screen(adata), map_location=map_location)
        self = cls.__new__(cls)
        self.adata = adata
        self.screen = loaded.screen
        self.split = loaded.split
        self.module = loaded.model
        self.init_params = dict(config.get("api") or {"model": config["model"]["name"],
                                                      "guide": config["model"]["guide"]})
        self.init_params.pop("backend", None)  # stored by earlier versions; chosen per call now
        self.setup = _registered(adata)
        self.history = loaded.history
        if config.get("train"):
            self.train_config = config["train"]
        self.is_trained = True
        return self

    def __repr__(self) -> str:
        p = self.init_params
        return (f"SAMSVAE(model={p.get('model')!r}, guide={p.get('guide')!r}, "
                f"{self.screen!r}, trained={self.is_trained})")

    # -- helpers ----------------------------------------------------------------------------

    def _run_config(self, train_config) -> dict:
        counts = {k: int((self.split == k).sum()) for k in ("train", "val", "test")}
        config = run_config(model_name=self.init_params["model"],
                            guide=self.init_params["guide"], model_config=self.module.config,
                            screen=self.screen, data_options=_load_options(self.setup),
                            split_options={"kind": self.init_params.get("split"),
                                           "seed": self.init_params.get("seed"),
                                           "counts": counts},
                            train_config=train_config)
        config["api"] = self.init_params
        return config

    def _screen_for(self, adata):
        if adata is None or adata is self.adata:
            return self.screen
        return align_screen(_registered_screen(adata, self.setup), self.screen.gene_names,
                            self.screen.perturbations,
                            batches=getattr(self.screen, "batch_categories", None),
                            batch_key=getattr(self.screen, "batch_key", None))

    @staticmethod
    def _rows(screen, indices) -> np.ndarray:
        return (np.arange(screen.n_cells, dtype=np.int64) if indices is None
                else check_indices(screen, indices))

    @staticmethod
    def _loader(screen, idx, batch_size):
        return MinibatchLoader(screen, idx, batch_size, shuffle=False)

    def _require_trained(self, what: str) -> None:
        if not getattr(self, "is_trained", False):
            raise RuntimeError(f"{what}() needs a trained model: this SAMSVAE was neither "
                               "trained nor loaded, so its predictions would be random. Call "
                               "model.train(...) first, or SAMSVAE.load(dir_path, adata)")

    def _control_label(self) -> str:
        return self.screen.control_label or "control"

    def _dosage_rows(self, labels):
        """(n, T) scipy CSR dosage of condition labels and their canonical spellings."""
        return condition_dosage(self.screen, labels)


def _registered(adata) -> dict:
    setup = adata.uns.get(UNS_KEY) if hasattr(adata, "uns") else None
    if setup is None:
        raise ValueError("this AnnData is not registered: call "
                         "samsvae.SAMSVAE.setup_anndata(adata, perturbation_key=...) first")
    return {k: (list(v) if k in ("drop_labels", "keep_labels") else v)
            for k, v in dict(setup).items()}


def _load_options(setup: dict) -> dict:
    opts = {k: setup.get(k) for k in _SETUP_FIELDS}
    opts["drop_labels"] = tuple(opts.get("drop_labels") or ())
    opts["keep_labels"] = tuple(opts.get("keep_labels") or ())
    opts["separator"] = opts.get("separator") or "+"
    opts["perturbation_key"] = opts.get("perturbation_key") or "perturbation"
    return opts


def _registered_screen(adata, setup: Optional[dict] = None):
    import warnings

    if setup is None or UNS_KEY in adata.uns:
        setup = _registered(adata)
    with warnings.catch_warnings():
        # other data (e.g. a subset) need not hold the labels dropped at training
        warnings.filterwarnings("ignore", message="drop labels .* do not occur")
        return load_screen(adata, **_load_options(setup))


def _as_label_list(perturbations) -> list:
    if isinstance(perturbations, str):
        return [perturbations]
    labels = [str(p) for p in perturbations]
    if not labels:
        raise ValueError("give at least one perturbation label")
    return labels
