"""Evaluation: test IWELBO, average treatment effects, mask recovery, figures.

* :func:`test_iwelbo`, :func:`cells_iwelbo`   per-cell importance-weighted ELBO (of a loader's
  cells; of screen rows, optionally spread over a process group)
* :func:`data_ate`, :func:`model_ate`, :func:`ate_pearson`, :func:`pearson`   treatment effects
  and their agreement
* :func:`mask_recovery`  learned vs true masks on simulated screens (Hungarian-matched F1)
* :func:`evaluate_model` all of the above for a set of cells, in one process or under torchrun
* :func:`baseline_ate`, :func:`baseline_anndata`   the baselines that need no model
  (control, train_mean, additive, linear), from training cells
* :func:`evaluate_predictions`, :func:`data_ate_anndata`, :func:`compare_with_baselines`   the
  evaluation harness: any tool's predicted ATE vs the data's, beside the baselines
* :mod:`samsvae.infer.by_batch` treatment effects within the batches of a covariate, pooled
* :func:`sample_counts_anndata`   simulated integer counts per cell (``samsvae predict``)
* :mod:`samsvae.infer.plots` the figures of ``samsvae evaluate --plots``
"""
from .ate import (ate_pearson, condition_dosage, data_ate, label_dosage, model_ate, pearson,
                  untrained_parts, warn_untrained_parts)
from .by_batch import compare_by_batch, data_ate_by_batch, model_ate_by_batch
from .counts import sample_counts_anndata
from .baselines import BASELINES, BaselineATE, baseline_anndata, baseline_ate, perturbed_shift
from .evaluate import evaluate_model
from .harness import (METRIC_LEGEND, METRICS, NOISE_CEILING, compare_with_baselines,
                      data_ate_anndata, evaluate_predictions, label_metrics, paired_difference,
                      paired_differences, split_half_ate)
from .iwelbo import cells_iwelbo, test_iwelbo
from .masks import mask_recovery, masks_untrained

__all__ = ["test_iwelbo", "cells_iwelbo", "data_ate", "model_ate", "ate_pearson", "pearson",
           "label_dosage", "condition_dosage", "untrained_parts", "warn_untrained_parts",
           "mask_recovery", "masks_untrained", "evaluate_model", "BASELINES", "BaselineATE",
           "baseline_ate", "baseline_anndata", "perturbed_shift", "METRICS", "METRIC_LEGEND",
           "NOISE_CEILING", "evaluate_predictions", "paired_difference", "paired_differences",
           "data_ate_anndata", "compare_with_baselines",
           "label_metrics", "split_half_ate", "compare_by_batch", "data_ate_by_batch",
           "model_ate_by_batch", "sample_counts_anndata"]
