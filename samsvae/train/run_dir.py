"""Run directories: what a trained run leaves on disk, and how to get it back.

Layout (``docs/internal_api.md``)::

    RUN_DIR/config.json          model name/guide/config, data + split options, genes, vocabulary
    RUN_DIR/split.csv            cell name -> train / val / test
    RUN_DIR/checkpoints/         last.pt, best.pt (training state, see Trainer)
    RUN_DIR/model.pt             best weights {"format", "config", "state_dict", "step"}
    RUN_DIR/history.json         loss curves {"train": {step, epoch, loss}, "val": {step, epoch, elbo}}
    RUN_DIR/metrics.json         written by ``samsvae evaluate``
    RUN_DIR/plots/*.png          written by ``samsvae evaluate --plots``

:func:`load_run` rebuilds the model, the screen and the split, checking the data against the
run: same genes in the same order, and no perturbation the model has no embedding for.
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import ScreenData, load_screen
from ..data.stream_stats import CACHE_NAME, cached_library
from ..models import build_model
from ..version import __version__
from .checkpoint import UnreadableRunFile, atomic_torch_save, atomic_write_text, load_checkpoint

RUN_FORMAT = "samsvae-run-v1"
MODEL_FORMAT = "samsvae-model-v1"
NO_SPLIT = "none"  # split value of cells absent from split.csv (data other than the training data)

# load_screen keyword arguments recorded in config.json["data"]
DATA_OPTIONS = ("layer", "perturbation_key", "separator", "control_label", "drop_labels",
                "dosage_key", "keep_labels", "batch_key")


@dataclass
class LoadedRun:
    """A run brought back by :func:`load_run`.

    model: the PerturbationModel with the best weights, in eval mode.
    screen: ScreenData aligned to the run (its genes; dosage columns = the run's vocabulary).
    split: (n_cells,) str array, "train" / "val" / "test" (``"none"`` for cells not in the run).
    config: the parsed config.json.
    history: the parsed history.json (empty dict if absent).
    run_dir: the directory.
    """
    model: object
    screen: object
    split: np.ndarray
    config: dict
    history: dict
    run_dir: Path

    def indices(self, part: str) -> np.ndarray:
        """Row indices of the cells in split ``part`` (``"all"``: every cell)."""
        if part == "all":
            return np.arange(len(self.split))
        idx = np.flatnonzero(self.split == part)
        if idx.size == 0:
            counts = {k: int(v) for k, v in zip(*np.unique(self.split, return_counts=True))}
            raise ValueError(f"no cell of the data is in split {part!r} (cells per split: "
                             f"{counts}); choose another split or 'all'")
        return idx


# -- writing --------------------------------------------------------------------------------

def run_config(*, model_name: str, guide: str, model_config: dict, screen, data_options: dict,
               split_options: dict, train_config: Optional[dict] = None,
               data_path: Optional[str] = None) -> dict:
    """The JSON description of a run (``config.json``)."""
    return {
        "format": RUN_FORMAT,
        "samsvae_version": __version__,
        "model": {"name": model_name, "guide": guide, "config": plain_json(model_config)},
        "data": {"path": None if data_path is None else str(Path(data_path).resolve()),
                 **{k: plain_json(data_options.get(k)) for k in DATA_OPTIONS},
                 "backed": bool(data_options.get("backed", False)),
                 # cells left out, by reason ({"drop_labels: unassigned": 662, ...})
                 "dropped_cells": plain_json(dict(getattr(screen, "dropped", {}) or {}))},
        "split": plain_json(split_options),
        "train": plain_json(train_config or {}),
        "control_label": screen.control_label,
        "n_cells": int(screen.n_cells),
        "genes": [str(g) for g in screen.gene_names],
        "perturbations": [str(p) for p in screen.perturbations],
        # the batch covariate's categories in the order of the model's one-hot (None: no key)
        "batches": (None if getattr(screen, "batch_categories", None) is None
                    else [str(b) for b in screen.batch_categories]),
    }


def save_run(run_dir, *, config: dict, screen, split: np.ndarray, model=None,
             history: Optional[dict] = None, model_step: Optional[int] = None) -> Path:
    """Write ``config.json`` and ``split.csv`` (and ``model.pt`` / ``history.json`` if given).

    Args:
        run_dir: directory (created if needed).
        config: from :func:`run_config`.
        screen: the ScreenData trained on (its ``cell_names`` key ``split.csv``).
        split: (n_cells,) "train" / "val" / "test" per screen row.
        model: PerturbationModel whose current weights go to ``model.pt``.
        history: training curves for ``history.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = np.asarray(split).astype(str)
    if split.shape != (screen.n_cells,):
        raise ValueError(f"split must have one entry per cell ({screen.n_cells}), "
                         f"got shape {split.shape}")
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=1) + "\n")
    atomic_write_text(run_dir / "split.csv", _split_csv(screen.cell_names, split))
    if model is not None:
        write_model(run_dir, model, step=model_step)
    if history is not None:
        write_history(run_dir, history)
    return run_dir


def write_model(run_dir, model, *, state_dict: Optional[dict] = None,
                step: Optional[int] = None) -> Path:
    """Write ``model.pt`` from ``state_dict`` (default: the model's current weights)."""
    state = model.state_dict() if state_dict is None else state_dict
    return atomic_torch_save({"format": MODEL_FORMAT, "config": plain_json(model.config),
                              "state_dict": {k: v.detach().cpu() for k, v in state.items()},
                              "step": step}, Path(run_dir) / "model.pt")


def write_history(run_dir, history: dict) -> Path:
    return atomic_write_text(Path(run_dir) / "history.json", json.dumps(history) + "\n")


def _split_csv(cell_names, split) -> str:
    buf = io.StringIO()
    buf.write("cell,split\n")
    for name, part in zip(cell_names, split):
        name = str(name)
        if any(c in name for c in ',"\n'):
            name = '"' + name.replace('"', '""') + '"'
        buf.write(f"{name},{part}\n")
    return buf.getvalue()


# -- reading --------------------------------------------------------------------------------

def read_config(run_dir) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        if not run_dir.exists():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        raise FileNotFoundError(f"{run_dir} is not a samsvae run directory (no config.json); "
                                "create one with `samsvae train DATA.h5ad --out RUN_DIR`")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UnreadableRunFile(
            f"cannot read {path}: not valid JSON ({exc}). The run's configuration is damaged; "
            "restore it from a copy or train the run again into a new --out directory") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        config = config if isinstance(config, dict) else {}
        raise UnreadableRunFile(f"{path} has format {config.get('format')!r}, expected "
                                f"{RUN_FORMAT!r}: not a samsvae run's configuration; pass the "
                                "directory written by samsvae train")
    return config


def read_history(run_dir) -> dict:
    path = Path(run_dir) / "history.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnreadableRunFile(f"cannot read {path}: not valid JSON ({exc}); delete it (only "
                                "the loss curves are lost) or train the run again") from None


def read_split(run_dir, cell_names) -> np.ndarray:
    """Split of each cell in ``cell_names`` from ``split.csv`` (``"none"`` when absent)."""
    import pandas as pd
    path = Path(run_dir) / "split.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the run directory is incomplete")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if list(table.columns[:2]) != ["cell", "split"]:
            raise ValueError(f"its header is {list(table.columns)}, expected ['cell', 'split']")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise UnreadableRunFile(
            f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}. The "
            "run's split is damaged; restore it from a copy or train the run again into a new "
            "--out directory") from None
    mapping = dict(zip(table["cell"], table["split"]))
    return np.array([mapping.get(str(c), NO_SPLIT) for c in cell_names], dtype=object).astype(str)


def load_model(run_dir, config: Optional[dict] = None, map_location=None):
    """Rebuild the model of a run with its best weights (``model.pt``, else ``best.pt``)."""
    run_dir = Path(run_dir)
    config = config or read_config(run_dir)
    candidates = [run_dir / "model.pt", run_dir / "checkpoints" / "best.pt",
                  run_dir / "checkpoints" / "last.pt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{run_dir} holds no weights (model.pt or checkpoints/*.pt); "
                                "train it first (samsvae train ... --out RUN_DIR)")
    saved = load_checkpoint(path, map_location=map_location or "cpu",
                            what=f"The run's weights ({path.name})")
    if "state_dict" not in saved and "model_state" not in saved:
        raise UnreadableRunFile(f"cannot read {path}: it holds no model weights (not written by "
                                "samsvae); delete it and train again")
    state = saved["state_dict"] if "state_dict" in saved else saved["model_state"]
    kwargs = dict(saved.get("config") or saved.get("model_config") or config["model"]["config"])
    # runs of earlier versions saved the kernel backend with the model: an execution setting,
    # chosen per call now, so the stored value is ignored
    kwargs.pop("backend", None)
    kwargs.setdefault("model", config["model"]["name"])
    kwargs.setdefault("guide", config["model"]["guide"])
    if kwargs["model"] in ("sams_vae", "cpa_vae"):
        # runs saved before the option existed trained the residual correlated basal guide
        kwargs.setdefault("corr_basal_form", "residual")
    model = build_model(**kwargs)
    model.load_state_dict(state)
    if map_location is not None:
        model.to(map_location)
    model.eval()
    return model


def load_run(run_dir, data=None, map_location=None) -> LoadedRun:
    """Rebuild model, screen and split of a run directory.

    Args:
        run_dir: directory written by ``samsvae train`` / ``SAMSVAE.save``.
        data: an .h5ad path, an AnnData or a ScreenData; None: the file recorded at training.
        map_location: device for the model (``"cpu"``, ``"cuda"``); default CPU.

    Raises:
        ValueError: the data's genes differ from the run's, or it holds perturbations the model
            never saw.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    screen = screen_for_run(config, data, run_dir=run_dir)
    split = read_split(run_dir, screen.cell_names)
    model = load_model(run_dir, config, map_location=map_location)
    return LoadedRun(model=model, screen=screen, split=split, config=config,
                     history=read_history(run_dir), run_dir=run_dir)


def screen_for_run(config: dict, data=None, run_dir=None):
    """Load ``data`` with the run's data options and align it to the run (see :func:`align_screen`).

    A backed run's file is opened with the library sizes cached in ``run_dir/data_stats.npz``
    when they belong to it (no pass over the counts)."""
    if data is None:
        path = config["data"].get("path")
        if path is None:
            raise ValueError("this run does not record its data file (it was trained from an "
                             "in-memory AnnData); pass the data (--data DATA.h5ad)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"the run's data file {path} is not there any more; pass "
                                    "the data explicitly (--data DATA.h5ad)")
        data = path
    if not isinstance(data, ScreenData):
        if isinstance(data, (str, Path)) and not Path(data).is_file():
            raise FileNotFoundError(f"data file {data} does not exist")
        options = {k: config["data"].get(k) for k in DATA_OPTIONS}
        options["drop_labels"] = tuple(options.get("drop_labels") or ())
        options["keep_labels"] = tuple(options.get("keep_labels") or ())
        if options.get("separator") is None:
            options.pop("separator")
        if options.get("perturbation_key") is None:
            options.pop("perturbation_key")
        if options.get("batch_key") is not None:  # the run's batches, in its one-hot order
            options["batch_categories"] = config.get("batches")
        if isinstance(data, (str, Path)):  # read the file as training did (backed or not)
            options["backed"] = bool(config["data"].get("backed", False))
            if options["backed"] and run_dir is not None:
                layer = options.get("layer")
                options["library"] = cached_library(Path(run_dir) / CACHE_NAME, data,
                                                    f"layers/{layer}" if layer else "X")
        data = load_screen(data, **options)
    return align_screen(data, config["genes"], config["perturbations"],
                        batches=config.get("batches"), batch_key=config["data"].get("batch_key"))


def align_screen(screen, genes, perturbations, *, batches=None, batch_key=None):
    """Return ``screen`` with its dosage columns in the order of ``perturbations`` (and, for a
    run with a batch covariate, its batch codes in the order of ``batches``).

    Raises a ValueError naming the first differing gene when the genes differ, and naming the
    perturbations the run does not know when the data holds some.
    """
    check_genes(screen.gene_names, genes)
    if batches is not None and list(getattr(screen, "batch_categories", None) or []) != \
            [str(b) for b in batches]:
        from ..data import with_batches
        key = batch_key or getattr(screen, "batch_key", None)
        if key is None:
            raise ValueError("the run was trained with a batch covariate; load the data with "
                             "its batch key")
        screen = with_batches(screen, key, [str(b) for b in batches])
    run_vocab = [str(p) for p in perturbations]
    data_vocab = [str(p) for p in screen.perturbations]
    if data_vocab == run_vocab:
        return screen
    position = {p: i for i, p in enumerate(run_vocab)}
    unknown = [p for p, n in zip(data_vocab, screen.perturbation_counts) if p not in position
               and n > 0]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10
                                           else "")
        raise ValueError(f"the data holds {len(unknown)} perturbation(s) the model was not "
                         f"trained on: {shown}; the model has no embedding for them. Drop those "
                         "cells (drop_labels / --drop-labels) or train on data that includes them")
    import scipy.sparse as sp
    dosage = screen.dosage.tocsr()
    col_map = np.array([position.get(p, -1) for p in data_vocab], dtype=np.int64)
    coo = dosage.tocoo()
    keep = coo.data != 0
    new = sp.csr_matrix((coo.data[keep], (coo.row[keep], col_map[coo.col[keep]])),
                        shape=(dosage.shape[0], len(run_vocab)), dtype=dosage.dtype)
    new.sort_indices()
    counts = np.diff(new.tocsc().indptr).astype(np.int64)
    sep = _separator(screen)
    labels = np.asarray(screen.labels).astype(object).copy()
    for i in np.flatnonzero(~np.asarray(screen.is_control)):
        cols = new.indices[new.indptr[i]:new.indptr[i + 1]]
        labels[i] = sep.join(run_vocab[c] for c in np.sort(cols))
    truth = _align_ground_truth(screen.ground_truth, run_vocab)
    return dataclasses.replace(screen, dosage=new, perturbations=run_vocab,
                               perturbation_counts=counts, labels=labels.astype(str),
                               ground_truth=truth)


def check_genes(data_genes, run_genes) -> None:
    data_genes = [str(g) for g in data_genes]
    run_genes = [str(g) for g in run_genes]
    if data_genes == run_genes:
        return
    first = next((i for i, (a, b) in enumerate(zip(run_genes, data_genes)) if a != b),
                 min(len(run_genes), len(data_genes)))
    run_at = repr(run_genes[first]) if first < len(run_genes) else "(end)"
    data_at = repr(data_genes[first]) if first < len(data_genes) else "(end)"
    raise ValueError(
        f"checkpoint trained on {len(run_genes)} genes but the data has {len(data_genes)} "
        f"[first differing name at position {first}: run {run_at}, data {data_at}]; pass the "
        "same gene set in the same order (e.g. adata[:, run_genes] with run_genes from "
        "config.json['genes'])")


def _separator(screen) -> str:
    return str(getattr(screen, "separator", "+") or "+")


def _align_ground_truth(truth, run_vocab):
    if not truth or "perturbations" not in truth:
        return truth
    names = [str(p) for p in truth["perturbations"]]
    if names == run_vocab:
        return truth
    where = {p: i for i, p in enumerate(names)}
    if not all(p in where for p in run_vocab):
        return None  # cannot score masks for perturbations the simulation did not make
    order = np.array([where[p] for p in run_vocab])
    out = dict(truth)
    for key in ("masks", "embeddings"):
        if key in out:
            out[key] = np.asarray(out[key])[order]
    out["perturbations"] = np.array(run_vocab)
    return out


def plain_json(x):
    """``x`` with numpy arrays/scalars, tensors and paths turned into plain JSON values
    (dict keys as strings; NaN and inf are kept: ``json.dumps`` writes them)."""
    if isinstance(x, dict):
        return {str(k): plain_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_json(v) for v in x]
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x
