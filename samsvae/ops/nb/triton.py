"""The ``triton`` tier of :func:`samsvae.ops.nb_log_prob`: kernels, launchers, autograd.

Imported on the first call (it imports triton): :mod:`samsvae.ops.nb` registers
:func:`nb_log_prob_triton` by name.

Per row r (a (particle, cell) pair), gene g, with ``a = log mu = log_library + logit - lse``,
``y = a - log_theta``, ``s = softplus(y)``, ``q = sigmoid(y)``::

    term   = -theta s + [x > 0] N(x)
    N(x)   = E(x, theta) + x (a - s)          theta >= 10
           = F(x, theta) - x softplus(-y)     theta <  10
             E = lgamma(x + theta) - lgamma(theta) - x log(theta) - lgamma(x + 1),  F = E + x log(theta)
    dterm/da        = h = -theta q + x (1 - q)
    dterm/dlogtheta =     theta (q - s) + [x > 0] dN/dlogtheta

The two forms of N are equal; each gene uses the one without large cancelling terms (F avoids
the two ~x log(theta) terms that E + x (a - s) cancels when theta is small).

Forward: pass 1 over gene blocks computes each row's logsumexp online (rescaled and finished in
float64), pass 2 sums the terms. Backward: d logits = g (h - softmax H) with H = sum_g h,
recomputed from the saved per-row lse (only O(rows) statistics are saved); d log_library = g H;
d log_theta is reduced over the rows of each program into a (programs, genes) partial buffer,
then summed (deterministic, no cross-program atomics). Block sums are float32 trees,
accumulated across blocks in float64.

E/F and dN/dlogtheta for integer counts below ``X_TAB`` come from per-gene tables built by
:func:`nb_tables` (sums accumulated in float64, stored float32); larger counts use Stirling
series without shifting, non-integer small counts the shifted series, each evaluated only in
tiles that hold such a count.

Counts are dense (cells, genes) or CSR (crow, col, values); with CSR the dense passes only
compute the x = 0 part and a per-row loop over the row's nonzeros adds the rest. Logits are
(rows, genes) with rows = particles * cells; counts row = rows % cells, never copied.

Math is float32 whatever the logits dtype (float32/bfloat16/float16), except per-row
statistics (lse, log_library - lse) in float64; log mu and y are carried as float32 (hi, lo)
pairs and exp is ``exp_acc``, not the approximate ``tl.exp``, so that the kernel's error stays
below twice that of float32 PyTorch (tests/ops/test_nb.py).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import triton_math as tm
from ..triton_support import (interpreting, multiprocessor_count, next_power_of_2, triton_op,
                              wrap_triton)
from .reference import nb_log_prob_reference

X_TAB = 64  # integer counts below this use the per-gene tables
STIRLING_THETA = tl.constexpr(10.0)  # theta from which N uses the E form (and Stirling in theta)


# ----------------------------------------------------------------------------- count terms

@triton.jit
def _count_terms(x, theta, lg_theta):
    """E(x, theta) where theta >= 10, F(x, theta) where theta < 10, for any x > 0 (shifted
    series; used for non-integer counts below the table size). ``lg_theta`` = lgamma(theta)."""
    lg_x1 = tm.lgamma_pos(x + 1.0)
    big = theta >= STIRLING_THETA
    th = tl.where(big, theta, STIRLING_THETA)
    e_big = ((th + x - 0.5) * tm.log1p(x / th) - x
             + tm.stirling_correction(th + x) - tm.stirling_correction(th)) - lg_x1
    th_s = tl.where(big, 1.0, theta)
    return tl.where(big, e_big, tm.lgamma_pos(x + th_s) - lg_x1 - lg_theta)


@triton.jit
def _large_count_term(x, theta, lg_theta, a, a_lo, s, s_neg):
    """N(x) for counts x >= 8 (Stirling series without shifting), written so that no two
    ~x log x terms are subtracted:

    theta >= 10:  x B + theta L - L/2 - log(x + 1)/2 + 1 - log(2 pi)/2 + c(theta + x) - c(theta)
                  - c(x + 1),  L = log1p(x/theta),  B = log((theta + x)/(theta + mu))
                  + log(mu/(x + 1)), each log taken as log1p of a small ratio when mu ~ x;
    theta <  10:  F - x softplus(-y) with lgamma(x + theta) - lgamma(x + 1) as one Stirling
                  difference in x + 1 and theta - 1.
    a + a_lo = log mu; s, s_neg = softplus(+-(log mu - log theta)); lg_theta = lgamma(theta)."""
    big = theta >= STIRLING_THETA
    th = tl.where(big, theta, STIRLING_THETA)
    x1 = x + 1.0
    log_x1 = tl.log(x1)
    mu = tm.exp_acc(a) * (1.0 + a_lo)
    r1 = (mu - x1) / x1
    b1 = tl.where(tl.abs(r1) < 0.5, tm.log1p(r1), (a - log_x1) + a_lo)
    lx = tm.log1p(x / th)
    r2 = (x - mu) / (th + mu)
    b2 = tl.where(r2 > -0.5, tm.log1p(r2), lx - s)
    n_big = (x * (b1 + b2) + (th - 0.5) * lx - 0.5 * log_x1 + (1.0 - tm.HALF_LOG_2PI)
             + tm.stirling_correction(th + x) - tm.stirling_correction(th)
             - tm.stirling_correction(x1))
    bs = tl.where(big, 0.0, theta - 1.0)
    diff = ((x1 + bs - 0.5) * tm.log1p(bs / x1) + bs * log_x1 - bs
            + tm.stirling_correction(x1 + bs) - tm.stirling_correction(x1))
    return tl.where(big, n_big, diff - lg_theta - x * s_neg)


@triton.jit
def _count_dlogtheta(x, theta, q, qc, dg_theta, LARGE: tl.constexpr):
    """dN/dlog(theta) at x > 0 (``dg_theta`` = digamma(theta), per gene; LARGE: x >= 8 is
    known, so digamma(x + theta) needs no shifting).

    theta (digamma(x + theta) - digamma(theta)) - x (1 - q) in both forms; for theta >= 10 the
    digamma difference is theta log1p(x/theta) + dc (Stirling), written as
    theta (log1p(r) - r) + dc + x q when r = x/theta < 1 so that no ~x terms cancel."""
    big = theta >= STIRLING_THETA
    th = tl.where(big, theta, STIRLING_THETA)
    r = x / th
    dc = 0.5 * x / (th + x) + th * (tm.stirling_correction_deriv(th + x)
                                    - tm.stirling_correction_deriv(th))
    d_big = tl.where(r < 1.0, th * tm.log1p_minus_x(r) + dc + x * q,
                     th * tm.log1p(r) + dc - x * qc)
    th_s = tl.where(big, 1.0, theta)
    if LARGE:
        dg_x = tm.digamma_stirling(x + th_s)
    else:
        dg_x = tm.digamma_pos(x + th_s)
    return tl.where(big, d_big, th_s * (dg_x - dg_theta) - x * qc)


@triton.jit
def _table_index(x, nz, X_TAB: tl.constexpr):
    """(index into the tables, in-table mask, large-count mask, non-integer small mask)."""
    small = nz & (x < X_TAB)
    xi = tl.where(small, x, 0.0).to(tl.int32)
    in_tab = small & (xi.to(tl.float32) == x)
    return xi.to(tl.int64), in_tab, nz & (x >= X_TAB), small & (in_tab == 0)


@triton.jit
def _nonzero_term(x, nz, gene, theta, a, a_lo, s, a_minus_s, s_neg, tab_ptr, n_genes,
                  X_TAB: tl.constexpr):
    """N(x) at the non-zero counts ``nz``, 0 elsewhere; ``gene`` indexes the tables."""
    xi, in_tab, large, frac = _table_index(x, nz, X_TAB)
    c = tl.load(tab_ptr + xi * n_genes + gene, mask=in_tab, other=0.0)
    # tiles without large or non-integer counts skip the series
    if tl.sum(frac.to(tl.int32)) > 0:
        lg_theta = tl.load(tab_ptr + X_TAB * n_genes + gene, mask=frac, other=0.0)
        c = tl.where(frac, _count_terms(x, theta, lg_theta), c)
    n = c + tl.where(theta >= STIRLING_THETA, x * a_minus_s, -x * s_neg)
    if tl.sum(large.to(tl.int32)) > 0:
        lg_theta = tl.load(tab_ptr + X_TAB * n_genes + gene, mask=large, other=0.0)
        n = tl.where(large, _large_count_term(x, theta, lg_theta, a, a_lo, s, s_neg), n)
    return tl.where(nz, n, 0.0)


@triton.jit
def _nonzero_dlogtheta(x, nz, gene, theta, q, qc, dtab_ptr, n_genes, X_TAB: tl.constexpr):
    """dN/dlog(theta) at the non-zero counts ``nz``, 0 elsewhere."""
    xi, in_tab, large, frac = _table_index(x, nz, X_TAB)
    d = tl.load(dtab_ptr + xi * n_genes + gene, mask=in_tab, other=0.0)
    d += tl.where(theta >= STIRLING_THETA, x * q, -x * qc)
    if tl.sum(large.to(tl.int32)) > 0:
        dg_theta = tl.load(dtab_ptr + X_TAB * n_genes + gene, mask=large, other=0.0)
        d = tl.where(large, _count_dlogtheta(x, theta, q, qc, dg_theta, True), d)
    if tl.sum(frac.to(tl.int32)) > 0:
        dg_theta = tl.load(dtab_ptr + X_TAB * n_genes + gene, mask=frac, other=0.0)
        d = tl.where(frac, _count_dlogtheta(x, theta, q, qc, dg_theta, False), d)
    return tl.where(nz, d, 0.0)


# ----------------------------------------------------------------------------- row helpers

@triton.jit
def _pick(vec, idx, r):
    """Element r of a small vector (Triton has no scalar indexing of tensors)."""
    return tl.sum(tl.where(idx == r, vec, 0.0))


@triton.jit
def _row_lse(logits_ptr, row_off, n_genes, ROWS: tl.constexpr, BLOCK_G: tl.constexpr):
    """float64 logsumexp over genes of ROWS rows starting at offsets ``row_off``: online
    float32 max/exp-sums per block, rescaled and accumulated in float64."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    ssum = tl.zeros([ROWS], tl.float64)
    for g0 in range(0, n_genes, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        gm = g < n_genes
        z = tl.load(logits_ptr + row_off[:, None] + g[None, :], mask=gm[None, :],
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tm.exp_f64(m.to(tl.float64) - m_new.to(tl.float64))
        # plain tl.exp suffices here: its per-term errors average out in the float64 sum
        ssum = ssum * scale + tl.sum(tl.exp(z - m_new[:, None]), axis=1).to(tl.float64)
        m = m_new
    return m.to(tl.float64) + tm.log_f64(ssum)


@triton.jit
def _split(v):
    """A float64 vector as a float32 pair (hi, lo) with hi + lo = v to ~1e-15."""
    hi = v.to(tl.float32)
    return hi, (v - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _log_mu(base, base_lo, z, lt):
    """a = log mu = base + base_lo + logit and y = a - log theta as float32 pairs (hi, lo)
    summing to the exact values: rounding these sums would shift each sigmoid/softplus by
    ~1e-7 |y| (more than their own error); the lo parts enter as first-order corrections."""
    a, a_err = tm.two_sum(base, z)
    a_lo = a_err + base_lo
    y, y_err = tm.two_sum(a, -lt)
    return a, a_lo, y, y_err + a_lo


@triton.jit
def _softplus_terms(a, a_lo, y, y_lo):
    """(softplus(y), a - softplus(y), softplus(-y)) corrected to first order in the lo parts."""
    s, s_neg, q, qc = tm.softplus_sigmoid(y)
    return s + q * y_lo, (a - s) + (a_lo - q * y_lo), s_neg - qc * y_lo


@triton.jit
def _sigmoids(y, y_lo):
    """(sigmoid(y), sigmoid(-y)) corrected to first order in y_lo."""
    q, qc = tm.sigmoid_pair(y)
    d = q * qc * y_lo
    return q + d, qc - d


@triton.jit
def _sigmoids_sms(y, y_lo):
    """(sigmoid(y), sigmoid(-y), sigmoid(y) - softplus(y)) corrected to first order in y_lo."""
    q, qc, sms = tm.sigmoid_pair_sms(y)
    d = q * qc * y_lo
    return q + d, qc - d, sms - q * q * y_lo


@triton.jit
def _gene_block(logits_ptr, lt_ptr, theta_ptr, row_off, g0, n_genes, BLOCK_G: tl.constexpr):
    """Genes g0 .. g0 + BLOCK_G of a row tile: (genes, mask, logits (ROWS, BLOCK_G) float32,
    log_theta and theta (1, BLOCK_G); masked genes read logit 0, log_theta 0, theta 1)."""
    g = g0 + tl.arange(0, BLOCK_G)
    gm = g < n_genes
    z = tl.load(logits_ptr + row_off[:, None] + g[None, :], mask=gm[None, :],
                other=0.0).to(tl.float32)
    lt = tl.load(lt_ptr + g, mask=gm, other=0.0)[None, :]
    theta = tl.load(theta_ptr + g, mask=gm, other=1.0)[None, :]
    return g, gm, z, lt, theta


@triton.jit
def _tile_rows(pid, n_rows, n_cells, n_genes, ROWS: tl.constexpr):
    """Row indices of a program's tile; tail rows repeat the last row and are never stored."""
    ridx = tl.arange(0, ROWS)
    rows_raw = pid * ROWS + ridx
    row_ok = rows_raw < n_rows
    rows = tl.minimum(rows_raw, n_rows - 1)
    cells = rows % n_cells
    return ridx, row_ok, rows, cells, rows.to(tl.int64) * n_genes, cells.to(tl.int64) * n_genes


@triton.jit
def _csr_row(crow_ptr, pid, r, n_rows, n_cells, base, base_lo, ridx, ROWS: tl.constexpr):
    """(row, start, end, base_r, base_lo_r) of tile row r: its range in the CSR arrays (empty
    for tail rows) and its entries of the per-row (hi, lo) statistics ``base``."""
    row = tl.minimum(pid * ROWS + r, n_rows - 1)
    cell = row % n_cells
    start = tl.load(crow_ptr + cell).to(tl.int64)
    end = tl.load(crow_ptr + cell + 1).to(tl.int64)
    end = tl.where(pid * ROWS + r < n_rows, end, start)
    return row.to(tl.int64), start, end, _pick(base, ridx, r), _pick(base_lo, ridx, r)


@triton.jit
def _csr_entries(col_ptr, x_ptr, logits_ptr, lt_ptr, theta_ptr, row, k0, end, n_genes,
                 BLOCK_NNZ: tl.constexpr):
    """One block of a CSR row's stored entries k0 .. k0 + BLOCK_NNZ (masked at ``end``):
    (mask, gene, count, logit, log_theta, theta)."""
    k = k0 + tl.arange(0, BLOCK_NNZ)
    km = k < end
    c = tl.load(col_ptr + k, mask=km, other=0).to(tl.int64)
    x = tl.load(x_ptr + k, mask=km, other=0).to(tl.float32)
    z = tl.load(logits_ptr + row * n_genes + c, mask=km, other=0.0).to(tl.float32)
    lt = tl.load(lt_ptr + c, mask=km, other=0.0)
    theta = tl.load(theta_ptr + c, mask=km, other=1.0)
    return km, c, x, z, lt, theta


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _nb_tables_kernel(theta_ptr, tab_ptr, dtab_ptr, n_genes,
                      X_TAB: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows x < X_TAB: cumulative float64 sums over j < x of
    theta >= 10: tab = E = sum log1p(j/theta) - log(j + 1),  dtab = dE = -sum j / (theta + j);
    theta <  10: tab = F = sum log((theta + j) / (j + 1)),    dtab = dF =  sum theta / (theta + j).
    Row X_TAB: tab = lgamma(theta), dtab = digamma(theta) (for the series of other counts)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gm = g < n_genes
    theta = tl.load(theta_ptr + g, mask=gm, other=1.0)[None, :]
    big = theta >= STIRLING_THETA
    x = tl.arange(0, X_TAB)[:, None]
    j = tl.maximum(x - 1, 0).to(tl.float32)  # row x adds the step of j = x - 1 (row 0: none)
    e_step = tm.log1p(j / theta).to(tl.float64) - tl.log(j + 1.0).to(tl.float64)
    # log((theta + j) / (j + 1)); log1p only where theta - 1 keeps theta's digits
    r = (theta - 1.0) / (j + 1.0)
    f_step = tl.where(r > -0.5, tm.log1p(r), tl.log((theta + j) / (j + 1.0))).to(tl.float64)
    step = tl.where(x > 0, tl.where(big, e_step, f_step), 0.0)
    dstep = tl.where(x > 0, tl.where(big, -j, theta).to(tl.float64)
                     / (theta.to(tl.float64) + j.to(tl.float64)), 0.0)
    offs = x * n_genes + g[None, :]
    tl.store(tab_ptr + offs, tl.cumsum(step, axis=0).to(tl.float32), mask=gm[None, :])
    tl.store(dtab_ptr + offs, tl.cumsum(dstep, axis=0).to(tl.float32), mask=gm[None, :])
    theta64 = tl.load(theta_ptr + g, mask=gm, other=1.0).to(tl.float64)
    tl.store(tab_ptr + X_TAB * n_genes + g, tm.lgamma_pos_f64(theta64).to(tl.float32), mask=gm)
    tl.store(dtab_ptr + X_TAB * n_genes + g, tm.digamma_pos_f64(theta64).to(tl.float32),
             mask=gm)


@triton.jit
def _nb_fwd_kernel(logits_ptr, ll_ptr, lt_ptr, theta_ptr, tab_ptr,
                   x_ptr, crow_ptr, col_ptr,
                   out_ptr, lse_ptr,
                   n_rows, n_cells, n_genes,
                   IS_CSR: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_NNZ: tl.constexpr, X_TAB: tl.constexpr):
    pid = tl.program_id(0)
    ridx, row_ok, rows, cells, row_off, cell_off = _tile_rows(pid, n_rows, n_cells, n_genes,
                                                              ROWS)
    ll = tl.load(ll_ptr + cells).to(tl.float64)
    lse = _row_lse(logits_ptr, row_off, n_genes, ROWS, BLOCK_G)
    base, base_lo = _split(ll - lse)  # log mu = base + base_lo + logit

    acc = tl.zeros([ROWS], tl.float64)
    for g0 in range(0, n_genes, BLOCK_G):
        g, gm, z, lt, theta = _gene_block(logits_ptr, lt_ptr, theta_ptr, row_off, g0, n_genes,
                                          BLOCK_G)
        a, a_lo, y, y_lo = _log_mu(base[:, None], base_lo[:, None], z, lt)
        s, a_minus_s, s_neg = _softplus_terms(a, a_lo, y, y_lo)
        term = -theta * s
        if not IS_CSR:
            x = tl.load(x_ptr + cell_off[:, None] + g[None, :], mask=gm[None, :],
                        other=0).to(tl.float32)
            term += _nonzero_term(x, x > 0.0, g[None, :], theta, a, a_lo, s, a_minus_s, s_neg,
                                  tab_ptr, n_genes, X_TAB)
        acc += tl.sum(tl.where(gm[None, :], term, 0.0), axis=1).to(tl.float64)

    if IS_CSR:
        for r in range(ROWS):
            row, start, end, base_r, lo_r = _csr_row(crow_ptr, pid, r, n_rows, n_cells, base,
                                                     base_lo, ridx, ROWS)
            part = tl.zeros([ROWS], tl.float64)
            for k0 in range(start, end, BLOCK_NNZ):
                km, c, x, z, lt, theta = _csr_entries(col_ptr, x_ptr, logits_ptr, lt_ptr,
                                                      theta_ptr, row, k0, end, n_genes,
                                                      BLOCK_NNZ)
                a, a_lo, y, y_lo = _log_mu(base_r, lo_r, z, lt)
                s, a_minus_s, s_neg = _softplus_terms(a, a_lo, y, y_lo)
                n = _nonzero_term(x, km & (x > 0.0), c, theta, a, a_lo, s, a_minus_s, s_neg,
                                  tab_ptr, n_genes, X_TAB)
                part += tl.sum(n).to(tl.float64)
            acc += tl.where(ridx == r, part, 0.0)

    tl.store(out_ptr + rows, acc.to(tl.float32), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _nb_bwd_kernel(grad_ptr, logits_ptr, ll_ptr, lt_ptr, theta_ptr, dtab_ptr,
                   x_ptr, crow_ptr, col_ptr, lse_ptr,
                   dlogits_ptr, dll_ptr, dlt_part_ptr,
                   n_rows, n_cells, n_genes,
                   IS_CSR: tl.constexpr, NEED_DLT: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_NNZ: tl.constexpr, X_TAB: tl.constexpr):
    pid = tl.program_id(0)
    ridx, row_ok, rows, cells, row_off, cell_off = _tile_rows(pid, n_rows, n_cells, n_genes,
                                                              ROWS)
    ll = tl.load(ll_ptr + cells).to(tl.float64)
    lse = tl.load(lse_ptr + rows)  # float64
    go = tl.where(row_ok, tl.load(grad_ptr + rows).to(tl.float32), 0.0)  # tail rows weigh 0
    base, base_lo = _split(ll - lse)
    lse_hi, lse_lo = _split(lse)
    part_off = pid.to(tl.int64) * n_genes

    # pass 1: H = sum_g h per row; d log_theta of this program's rows
    H = tl.zeros([ROWS], tl.float64)
    for g0 in range(0, n_genes, BLOCK_G):
        g, gm, z, lt, theta = _gene_block(logits_ptr, lt_ptr, theta_ptr, row_off, g0, n_genes,
                                          BLOCK_G)
        _, _, y, y_lo = _log_mu(base[:, None], base_lo[:, None], z, lt)
        q, qc, sms = _sigmoids_sms(y, y_lo)
        h = -theta * q
        if NEED_DLT:
            dl = theta * sms
        if not IS_CSR:
            x = tl.load(x_ptr + cell_off[:, None] + g[None, :], mask=gm[None, :],
                        other=0).to(tl.float32)
            h += x * qc
            if NEED_DLT:
                dl += _nonzero_dlogtheta(x, x > 0.0, g[None, :], theta, q, qc, dtab_ptr,
                                         n_genes, X_TAB)
        H += tl.sum(tl.where(gm[None, :], h, 0.0), axis=1).to(tl.float64)
        if NEED_DLT:
            tl.store(dlt_part_ptr + part_off + g, tl.sum(dl * go[:, None], axis=0), mask=gm)

    if IS_CSR:
        if NEED_DLT:
            tl.debug_barrier()  # the partial row stored above is added to below
        for r in range(ROWS):
            row, start, end, base_r, lo_r = _csr_row(crow_ptr, pid, r, n_rows, n_cells, base,
                                                     base_lo, ridx, ROWS)
            go_r = _pick(go, ridx, r)
            hpart = tl.zeros([ROWS], tl.float64)
            for k0 in range(start, end, BLOCK_NNZ):
                km, c, x, z, lt, theta = _csr_entries(col_ptr, x_ptr, logits_ptr, lt_ptr,
                                                      theta_ptr, row, k0, end, n_genes,
                                                      BLOCK_NNZ)
                nz = km & (x > 0.0)
                _, _, y, y_lo = _log_mu(base_r, lo_r, z, lt)
                q, qc = _sigmoids(y, y_lo)
                hpart += tl.sum(tl.where(nz, x * qc, 0.0)).to(tl.float64)
                if NEED_DLT:
                    dn = _nonzero_dlogtheta(x, nz, c, theta, q, qc, dtab_ptr, n_genes, X_TAB)
                    tl.atomic_add(dlt_part_ptr + part_off + c, go_r * dn, mask=nz,
                                  sem="relaxed")
            H += tl.where(ridx == r, hpart, 0.0)

    H32 = H.to(tl.float32)
    tl.store(dll_ptr + rows, go * H32, mask=row_ok)

    # pass 2: d logits = g (h - softmax H)
    for g0 in range(0, n_genes, BLOCK_G):
        g, gm, z, lt, theta = _gene_block(logits_ptr, lt_ptr, theta_ptr, row_off, g0, n_genes,
                                          BLOCK_G)
        _, _, y, y_lo = _log_mu(base[:, None], base_lo[:, None], z, lt)
        q, qc = _sigmoids(y, y_lo)
        h = -theta * q
        if not IS_CSR:
            x = tl.load(x_ptr + cell_off[:, None] + g[None, :], mask=gm[None, :],
                        other=0).to(tl.float32)
            h += x * qc
        w, w_err = tm.two_sum(z, -lse_hi[:, None])
        p = tm.exp_acc(w) * (1.0 + (w_err - lse_lo[:, None]))  # softmax
        d = go[:, None] * (h - p * H32[:, None])
        tl.store(dlogits_ptr + row_off[:, None] + g[None, :], d,
                 mask=row_ok[:, None] & gm[None, :])

    if IS_CSR:
        tl.debug_barrier()  # the dense d logits above must land before the sparse additions
        for r in range(ROWS):
            row, start, end, base_r, lo_r = _csr_row(crow_ptr, pid, r, n_rows, n_cells, base,
                                                     base_lo, ridx, ROWS)
            go_r = _pick(go, ridx, r)
            for k0 in range(start, end, BLOCK_NNZ):
                # theta is not used here (its load is dead code to the compiler)
                km, c, x, z, lt, _ = _csr_entries(col_ptr, x_ptr, logits_ptr, lt_ptr,
                                                  theta_ptr, row, k0, end, n_genes, BLOCK_NNZ)
                _, _, y, y_lo = _log_mu(base_r, lo_r, z, lt)
                _, qc = _sigmoids(y, y_lo)
                # relaxed: the barrier above orders the dense stores; the adds only sum
                tl.atomic_add(dlogits_ptr + row * n_genes + c, go_r * x * qc,
                              mask=km & (x > 0.0), sem="relaxed")


# ----------------------------------------------------------------------------- launch config

@dataclass(frozen=True)
class NBConfig:
    """Tiling of the NB kernels: ``rows`` rows per program, genes in blocks of ``block_g``,
    CSR non-zeros in blocks of ``block_nnz``; ``num_warps`` per program."""
    rows: int
    block_g: int
    block_nnz: int
    num_warps: int


_CONFIG_OVERRIDE: Optional[NBConfig] = None


@contextlib.contextmanager
def override_config(config: Optional[NBConfig]):
    """Force the tiling inside the block (tests use tiny blocks; benchmarks sweep tilings)."""
    global _CONFIG_OVERRIDE
    old, _CONFIG_OVERRIDE = _CONFIG_OVERRIDE, config
    try:
        yield
    finally:
        _CONFIG_OVERRIDE = old


# elements per program (rows * block_g) and warps: the dense-counts kernels keep more values
# live (~126 registers/thread at 2048/16 warps when compiled for sm_90, ~77-80 for CSR at
# 1024/8 warps); both give 16-24 resident warps per SM. Retune with
# benchmarks/bench_triton_gpu.py --sweep.
TILES = {False: (2048, 16), True: (1024, 8)}  # is_csr -> (elements, num_warps)


def choose_config(n_rows: int, n_genes: int, device: torch.device,
                  is_csr: bool = False) -> NBConfig:
    """As many rows per program (up to 8) as keeps >= 2 programs per SM (more rows: fewer
    d log_theta partial rows to sum; fewer rows: more parallelism), genes filling the tile."""
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    if interpreting():  # the CPU interpreter pays per program and per loop iteration
        return NBConfig(rows=8, block_g=min(128, next_power_of_2(n_genes)), block_nnz=64,
                        num_warps=4)
    elements, warps = TILES[is_csr]
    target = 2 * multiprocessor_count(device)
    rows = 1
    while rows < 8 and n_rows // (2 * rows) >= target:
        rows *= 2
    block_g = max(64, min(elements // rows, next_power_of_2(n_genes)))
    return NBConfig(rows=rows, block_g=block_g, block_nnz=256,
                    num_warps=warps if rows * block_g >= elements else 4)


# ----------------------------------------------------------------------------- launchers


def nb_tables(theta: torch.Tensor):
    """Per-gene tables ``(tab, dtab)``, each (X_TAB + 1, G) float32 for theta (G,) float32.

    Rows x < X_TAB: the count term (E where theta >= 10, F below) and its log-theta
    derivative at integer x (row 0 is zero); row X_TAB: lgamma(theta) and digamma(theta)."""
    n_genes = theta.shape[0]
    tab = torch.empty(X_TAB + 1, n_genes, dtype=torch.float32, device=theta.device)
    dtab = torch.empty_like(tab)
    if n_genes > 0:
        block = 64 if interpreting() else 32  # (X_TAB, block) float64 tiles
        wrap_triton(_nb_tables_kernel)[(triton.cdiv(n_genes, block),)](
            theta, tab, dtab, n_genes, X_TAB=X_TAB, BLOCK_G=block)
    return tab, dtab


def _dummy(device):
    return torch.empty(1, dtype=torch.float32, device=device)


def _count_args(counts, crow, col, values, device):
    """(is_csr, x_ptr tensor, crow, col) for the kernels."""
    if crow is not None:
        return True, values, crow, col
    return False, counts, _dummy(device), _dummy(device)


def _kernel_inputs(logits: torch.Tensor, log_theta: torch.Tensor):
    """(logits as (rows, G), log_theta (G,) float32, theta (G,) float32) for the kernels."""
    logits2 = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])
    lt = log_theta.to(torch.float32).contiguous()
    return logits2, lt, lt.exp()


def _forward_impl(logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor,
                  counts: Optional[torch.Tensor], crow: Optional[torch.Tensor],
                  col: Optional[torch.Tensor], values: Optional[torch.Tensor],
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loglik logits.shape[:-1] in logits dtype, lse (rows,) float64,
    dtab (X_TAB + 1, G) float32); lse and dtab are saved for the backward."""
    logits2, lt, theta = _kernel_inputs(logits, log_theta)
    n_rows, n_genes = logits2.shape
    n_cells = log_library.shape[0]
    device = logits.device
    tab, dtab = nb_tables(theta)
    out = torch.zeros(n_rows, dtype=torch.float32, device=device)  # zeros if no genes
    lse = torch.full((n_rows,), float("-inf"), dtype=torch.float64, device=device)
    if n_rows > 0 and n_genes > 0:
        is_csr, xs, crow_, col_ = _count_args(counts, crow, col, values, device)
        cfg = choose_config(n_rows, n_genes, device, is_csr)
        grid = (triton.cdiv(n_rows, cfg.rows),)
        wrap_triton(_nb_fwd_kernel)[grid](
            logits2, log_library, lt, theta, tab, xs, crow_, col_, out, lse,
            n_rows, n_cells, n_genes,
            IS_CSR=is_csr, ROWS=cfg.rows, BLOCK_G=cfg.block_g, BLOCK_NNZ=cfg.block_nnz,
            X_TAB=X_TAB, num_warps=cfg.num_warps)
    return out.reshape(logits.shape[:-1]).to(logits.dtype), lse, dtab


def _backward_impl(grad: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor,
                   log_theta: torch.Tensor, counts: Optional[torch.Tensor],
                   crow: Optional[torch.Tensor], col: Optional[torch.Tensor],
                   values: Optional[torch.Tensor], lse: torch.Tensor, dtab: torch.Tensor,
                   need_dlt: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (d logits, d log_library, d log_theta) in the dtypes of those inputs
    (d log_theta is zeros when ``need_dlt`` is False)."""
    logits2, lt, theta = _kernel_inputs(logits, log_theta)
    n_rows, n_genes = logits2.shape
    n_cells = log_library.shape[0]
    device = logits.device
    grad = grad.reshape(-1).to(torch.float32).contiguous()
    dlogits = torch.empty(n_rows, n_genes, dtype=torch.float32, device=device)
    dll_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0 or n_genes == 0:
        return (dlogits.reshape(logits.shape).to(logits.dtype),
                torch.zeros_like(log_library), torch.zeros_like(log_theta))
    is_csr, xs, crow_, col_ = _count_args(counts, crow, col, values, device)
    cfg = choose_config(n_rows, n_genes, device, is_csr)
    n_prog = triton.cdiv(n_rows, cfg.rows)
    dlt_part = (torch.empty(n_prog, n_genes, dtype=torch.float32, device=device) if need_dlt
                else _dummy(device))
    wrap_triton(_nb_bwd_kernel)[(n_prog,)](
        grad, logits2, log_library, lt, theta, dtab, xs, crow_, col_, lse,
        dlogits, dll_rows, dlt_part, n_rows, n_cells, n_genes,
        IS_CSR=is_csr, NEED_DLT=need_dlt, ROWS=cfg.rows, BLOCK_G=cfg.block_g,
        BLOCK_NNZ=cfg.block_nnz, X_TAB=X_TAB, num_warps=cfg.num_warps)
    dll = dll_rows.reshape(-1, n_cells).sum(0).to(log_library.dtype)
    dlt = (dlt_part.sum(0, dtype=torch.float64) if need_dlt else torch.zeros_like(lt))
    dlt = dlt.to(log_theta.dtype)
    return dlogits.reshape(logits.shape).to(logits.dtype), dll, dlt


if triton_op is not None:
    _nb_fwd_op = triton_op("samsvae::triton_nb_log_prob", mutates_args=())(_forward_impl)
    _nb_bwd_op = triton_op("samsvae::triton_nb_log_prob_backward",
                            mutates_args=())(_backward_impl)

    def _setup_context(ctx, inputs, output):
        logits, log_library, log_theta, counts, crow, col, values = inputs
        _, lse, dtab = output
        ctx.save_for_backward(logits, log_library, log_theta, counts, crow, col, values,
                              lse, dtab)

    def _backward(ctx, grad, _grad_lse, _grad_dtab):
        saved = ctx.saved_tensors
        need_dlt = bool(ctx.needs_input_grad[2])
        dlogits, dll, dlt = _nb_bwd_op(grad.contiguous(), *saved, need_dlt)
        return dlogits, dll, (dlt if need_dlt else None), None, None, None, None

    _nb_fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _nb_apply(*args):
        return _nb_fwd_op(*args)[0]
else:  # pragma: no cover
    class _NBFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, log_library, log_theta, counts, crow, col, values):
            out, lse, dtab = _forward_impl(logits, log_library, log_theta, counts, crow, col,
                                           values)
            ctx.save_for_backward(logits, log_library, log_theta, counts, crow, col, values,
                                  lse, dtab)
            return out

        @staticmethod
        def backward(ctx, grad):
            need_dlt = bool(ctx.needs_input_grad[2])
            dlogits, dll, dlt = _backward_impl(grad.contiguous(), *ctx.saved_tensors, need_dlt)
            return dlogits, dll, (dlt if need_dlt else None), None, None, None, None

    def _nb_apply(*args):
        return _NBFunction.apply(*args)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def nb_log_prob_triton(counts, logits, log_library, log_theta, logit_bias=None):
    """Triton NB log-likelihood; same contract as :func:`samsvae.ops.nb_log_prob`.

    Args:
        counts: (C, G) dense or ``torch.sparse_csr`` non-negative counts (any real dtype).
        logits: (C, G) or (P, C, G) float32/bfloat16/float16 (float32 math inside).
        log_library: (C,); log_theta: (G,).
        logit_bias: optional (G,), added to the logits before the kernel (not fused here).

    Returns:
        ``logits.shape[:-1]`` log-likelihoods (nats), differentiable in logits, log_library
        and log_theta. float64 logits are not run in float32: they go to the reference.
    """
    if logit_bias is not None:
        logits = logits + logit_bias.to(logits.dtype)
    if logits.dtype not in _KERNEL_DTYPES:
        return nb_log_prob_reference(counts, logits, log_library, log_theta)
    tensors = {"logits": logits, "log_library": log_library, "log_theta": log_theta}
    devices = {t.device for t in tensors.values()} | {counts.device}
    if len(devices) != 1:
        raise ValueError("nb_log_prob: counts, logits, log_library and log_theta must be on "
                         f"one device, got {sorted(map(str, devices))}; move them with .to()")
    logits = logits.contiguous()
    log_library = log_library.contiguous()
    if counts.layout == torch.sparse_csr:
        return _nb_apply(logits, log_library, log_theta, None, counts.crow_indices(),
                         counts.col_indices(), counts.values())
    if counts.layout != torch.strided:
        raise ValueError(f"counts must be dense or torch.sparse_csr, got layout {counts.layout}")
    return _nb_apply(logits, log_library, log_theta, counts.contiguous(), None, None, None)
