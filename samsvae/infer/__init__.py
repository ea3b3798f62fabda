"""Evaluation: test IWELBO, average treatment effects, mask recovery, figures.

* :func:`test_iwelbo`, :func:`cells_iwelbo`   per-cell importance-weighted ELBO (of a loader's
  cells; of screen rows, optionally spread over a process group)
* :func:`data_ate`, :func:`model_ate`, :func:`ate_pearson`, :func:`pearson`   treatment effects
  and their agreement
* :func:`mask_recovery`  learned vs true masks on simulated screens (Hungarian-matched F1)
* :func:`evaluate_model` all of the above for a set of cells, in one process or under torchrun
* :mod:`samsvae.infer.plots` the figures of ``samsvae evaluate --plots``
"""
from .ate import ate_pearson, data_ate, label_dosage, model_ate, pearson
from .evaluate import evaluate_model
from .iwelbo import cells_iwelbo, test_iwelbo
from .masks import mask_recovery

__all__ = ["test_iwelbo", "cells_iwelbo", "data_ate", "model_ate", "ate_pearson", "pearson",
           "label_dosage", "mask_recovery", "evaluate_model"]
