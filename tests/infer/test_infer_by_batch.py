"""Treatment effects within batches (issue 15, 10): the data ATE of a label in a batch is
against that batch's controls; the pooled ATE is the cell-weighted mean of the batches'."""
import numpy as np

import helpers
from samsvae.data import load_screen
from samsvae.infer.by_batch import data_ate_by_batch, label_batch_counts, pool


def _norm(screen, rows):
    x = screen.rows(rows).toarray().astype(np.float64)
    lib = np.maximum(screen.library[rows], 1.0)[:, None]
    return np.log2(1.0 + 1e4 * x / lib)


def test_per_batch_data_ate_by_hand():
    screen = load_screen(helpers.two_batch_screen(), batch_key="line")
    rows = np.arange(screen.n_cells)
    labels = sorted(set(screen.labels[~screen.is_control]))
    per_batch, w = data_ate_by_batch(screen, rows, labels)
    codes = screen.batch_codes
    for b in (0, 1):
        ctrl = np.flatnonzero(screen.is_control & (codes == b))
        for i, lab in enumerate(labels):
            cells = np.flatnonzero((screen.labels == lab) & (codes == b))
            assert w[i, b] == cells.size
            expected = _norm(screen, cells).mean(0) - _norm(screen, ctrl).mean(0)
            np.testing.assert_allclose(per_batch[b, i], expected, atol=1e-9)
    pooled = pool(per_batch, w)
    for i in range(len(labels)):
        expected = (w[i, 0] * per_batch[0, i] + w[i, 1] * per_batch[1, i]) / w[i].sum()
        np.testing.assert_allclose(pooled[i], expected, atol=1e-12)
    # a batch without the label's cells is left out of its pooled ATE
    w2 = w.copy()
    w2[0, 1] = 0
    np.testing.assert_allclose(pool(per_batch, w2)[0], per_batch[0, 0], atol=1e-12)
    assert label_batch_counts(screen, rows, labels).sum() == (~screen.is_control).sum()
