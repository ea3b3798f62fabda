"""Evaluation: test IWELBO, average treatment effects, mask recovery (``samsvae evaluate``).

* :func:`test_iwelbo`    per-cell importance-weighted ELBO of a loader's cells
* :func:`data_ate`, :func:`model_ate`, :func:`ate_pearson`   treatment effects and their agreement
* :func:`mask_recovery`  learned vs true masks on simulated screens (Hungarian-matched F1)
* :func:`evaluate_model` all of the above for a set of cells
"""
from .ate import ate_pearson, data_ate, label_dosage, model_ate
from .evaluate import evaluate_model
from .iwelbo import test_iwelbo
from .masks import mask_recovery

__all__ = ["test_iwelbo", "data_ate", "model_ate", "ate_pearson", "label_dosage",
           "mask_recovery", "evaluate_model"]
