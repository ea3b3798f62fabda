"""Perturbation labels for SVAE+: each distinct dosage pattern (set of perturbations) is a label.

SVAE+ gives every cell exactly one intervention, so a combination such as "P3+P7" is its own
label with its own latent shift, not the sum of the singles. Labels are identified by the sorted
column ids of a dosage row (dosage values are ignored); the empty row is the control.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch


def _csr_parts(dosage):
    """indptr, indices (numpy int64) of a scipy or torch CSR matrix."""
    if torch.is_tensor(dosage):
        if dosage.layout != torch.sparse_csr:
            dosage = dosage.to_sparse_csr()
        return (dosage.crow_indices().cpu().numpy().astype(np.int64),
                dosage.col_indices().cpu().numpy().astype(np.int64), dosage.shape)
    m = dosage.tocsr()
    m.sort_indices()
    return m.indptr.astype(np.int64), m.indices.astype(np.int64), m.shape


def svae_plus_labels(dosage) -> dict:
    """Label vocabulary and per-label cell counts of a (training) dosage matrix.

    Args:
        dosage: (cells, T) scipy or torch CSR dosage of the TRAINING cells.

    Returns:
        ``{"labels": [[col, ...], ...], "label_counts": [n, ...]}`` to pass to
        ``build_model("svae_plus", ..., **svae_plus_labels(train_dosage))``. Singletons come
        first in column order, then combinations sorted by their column ids. Control rows
        (no perturbation) form no label.
    """
    indptr, indices, _ = _csr_parts(dosage)
    nnz = np.diff(indptr)
    counter: Counter = Counter()
    single = np.nonzero(nnz == 1)[0]
    cols, n = np.unique(indices[indptr[single]], return_counts=True)
    for c, k in zip(cols.tolist(), n.tolist()):
        counter[(c,)] += k
    for r in np.nonzero(nnz > 1)[0].tolist():
        counter[tuple(sorted(indices[indptr[r]:indptr[r + 1]].tolist()))] += 1
    keys = sorted(counter, key=lambda k: (len(k) > 1, k))
    return {"labels": [list(k) for k in keys], "label_counts": [int(counter[k]) for k in keys]}


class LabelIndex:
    """Maps CSR dosage rows to label ids (-1 for control rows).

    Args:
        labels: list of label patterns (lists of column ids).
        n_perturbations: T, number of dosage columns.
    """

    def __init__(self, labels: Sequence[Sequence[int]], n_perturbations: int):
        self.labels: List[Tuple[int, ...]] = [tuple(sorted(int(c) for c in l)) for l in labels]
        self.lookup: Dict[Tuple[int, ...], int] = {}
        for i, key in enumerate(self.labels):
            if not key:
                raise ValueError("an SVAE+ label must hold at least one perturbation "
                                 "(control cells have no label)")
            if any(c < 0 or c >= n_perturbations for c in key):
                raise ValueError(f"label {list(key)} refers to columns outside "
                                 f"0..{n_perturbations - 1}")
            if key in self.lookup:
                raise ValueError(f"label {list(key)} is listed twice")
            self.lookup[key] = i
        self.singleton = torch.full((n_perturbations,), -1, dtype=torch.int64)
        for key, i in self.lookup.items():
            if len(key) == 1:
                self.singleton[key[0]] = i
        self.only_singletons = all(len(k) == 1 for k in self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def rows_to_labels_host(self, dosage) -> np.ndarray:
        """(B,) int64 label id of each row of a CPU (torch or scipy) CSR dosage, computed on the
        host with numpy (no device work, so no synchronisation in a GPU training step); -1 for
        control rows. Raises ValueError for a row whose set is not a label."""
        indptr, indices, shape = _csr_parts(dosage)
        nnz = np.diff(indptr)
        out = np.full(shape[0], -1, dtype=np.int64)
        single = np.flatnonzero(nnz == 1)
        if single.size:
            out[single] = self.singleton.numpy()[indices[indptr[single]]]
        for r in np.flatnonzero(nnz > 1):
            out[r] = self.lookup.get(tuple(sorted(indices[indptr[r]:indptr[r + 1]].tolist())), -1)
        unknown = np.flatnonzero((out < 0) & (nnz > 0))
        if unknown.size:
            r = int(unknown[0])
            self._raise_unknown(r, sorted(indices[indptr[r]:indptr[r + 1]].tolist()))
        return out

    @staticmethod
    def _raise_unknown(r: int, key) -> None:
        raise ValueError(
            f"dosage row {r} holds the perturbation set {key}, which is not an SVAE+ label "
            "of this model. SVAE+ treats each distinct combination as its own label and "
            "cannot predict unseen ones: build the model with "
            "**samsvae.models.svae_plus_labels(training dosage) covering every label to "
            "evaluate, or use sams_vae / cpa_vae for combinatorial generalisation")

    def rows_to_labels(self, dosage: torch.Tensor) -> torch.Tensor:
        """(B,) int64 label id of each row of a (B, T) torch CSR dosage; -1 for control rows.

        Raises ValueError for a row whose perturbation set is not a known label."""
        crow, col = dosage.crow_indices(), dosage.col_indices()
        nnz = crow[1:] - crow[:-1]
        out = torch.full((dosage.shape[0],), -1, dtype=torch.int64, device=crow.device)
        single = torch.nonzero(nnz == 1, as_tuple=True)[0]
        if single.numel():
            out[single] = self.singleton.to(crow.device)[col[crow[single]]]
        multi = torch.nonzero(nnz > 1, as_tuple=True)[0].tolist()
        if multi:
            crow_l, col_l = crow.tolist(), col.tolist()
            for r in multi:
                key = tuple(sorted(col_l[crow_l[r]:crow_l[r + 1]]))
                out[r] = self.lookup.get(key, -1)
        unknown = (out < 0) & (nnz > 0)
        if bool(unknown.any()):
            r = int(torch.nonzero(unknown)[0])
            self._raise_unknown(r, sorted(col[crow[r]:crow[r + 1]].tolist()))
        return out
