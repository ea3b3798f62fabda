"""A plain PyTorch VAE on single-cell counts, with samsvae's NB likelihood as its output head.

    python examples/plain_vae_nb_head.py            # ~300 steps on a simulated matrix, < 30 s

Nothing here is specific to SAMS-VAE: the encoder, decoder and training loop are ordinary
PyTorch. The only samsvae piece is :class:`samsvae.nn.NBLikelihood`, which turns the decoder's
last hidden layer (or its logits) into per-cell negative binomial log-likelihoods with the fused
kernels (``forward_linear`` never stores the cells x genes logits). Counts are passed to it as
a ``torch.sparse_csr`` batch, as a data loader of a sparse matrix would give them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from samsvae.nn import NBLikelihood  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def simulate_counts(n_cells: int, n_genes: int, n_latent: int = 5, seed: int = 0):
    """Counts from a low-rank NB model: ``x ~ NB(l * softmax(z W + b), theta)``.

    Returns ``(counts (n_cells, n_genes) float32, log_theta (n_genes,) true values)``.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n_cells, n_latent))
    w = rng.normal(size=(n_latent, n_genes)) / math.sqrt(n_latent)
    b = rng.normal(-1.0, 1.0, size=n_genes)
    logits = z @ w + b
    prop = np.exp(logits - logits.max(1, keepdims=True))
    prop /= prop.sum(1, keepdims=True)
    library = rng.lognormal(mean=math.log(3000.0), sigma=0.4, size=n_cells)
    mu = library[:, None] * prop
    log_theta = rng.normal(1.0, 0.7, size=n_genes)
    theta = np.exp(log_theta)
    counts = rng.poisson(rng.gamma(shape=theta, scale=mu / theta))   # Gamma-Poisson = NB
    return counts.astype(np.float32), log_theta


class CountVAE(nn.Module):
    """Gaussian latent, MLP encoder on log1p counts, MLP decoder -> NB head."""

    def __init__(self, n_genes: int, n_latent: int = 8, n_hidden: int = 128, fused: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_genes, n_hidden), nn.ReLU(),
                                     nn.Linear(n_hidden, 2 * n_latent))
        self.decoder = nn.Sequential(nn.Linear(n_latent, n_hidden), nn.ReLU())
        self.to_logits = nn.Linear(n_hidden, n_genes)
        self.likelihood = NBLikelihood(n_genes)
        self.fused = fused

    def elbo(self, counts_dense, counts_csr, particles: int = 1):
        """(cells,) ELBO in nats: E_q[log p(x|z)] - KL(q(z|x) || N(0, I))."""
        log_library = torch.log(counts_dense.sum(1).clamp_min(1.0))
        loc, log_var = self.encoder(torch.log1p(counts_dense)).chunk(2, dim=-1)
        std = torch.exp(0.5 * log_var)
        z = loc + std * torch.randn(particles, *loc.shape)          # (P, cells, L)
        hidden = self.decoder(z)
        if self.fused:
            log_px = self.likelihood.forward_linear(counts_csr, hidden, self.to_logits.weight,
                                                    self.to_logits.bias, log_library)
        else:
            log_px = self.likelihood(counts_csr, self.to_logits(hidden), log_library)
        kl = 0.5 * (loc ** 2 + std ** 2 - 1.0 - log_var).sum(-1)
        return log_px.mean(0) - kl


def train(n_cells=3000, n_genes=500, steps=300, batch_size=256, lr=3e-3, seed=0, fused=True,
          log_every=50, verbose=True):
    """Train on simulated counts; returns the per-step losses (nats per cell)."""
    torch.manual_seed(seed)
    counts, _ = simulate_counts(n_cells, n_genes, seed=seed)
    counts = torch.from_numpy(counts)
    model = CountVAE(n_genes, fused=fused)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n_cells, (min(batch_size, n_cells),), generator=gen)
        batch = counts[idx]
        loss = -model.elbo(batch, batch.to_sparse_csr()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:10.2f} nats/cell")
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--unfused", action="store_true", help="materialise logits, call forward()")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    losses = train(args.cells, args.genes, args.steps, args.batch_size, seed=args.seed,
                   fused=not args.unfused)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"mean loss of the first 10 steps {first:.2f}, of the last 10 {last:.2f} "
          f"({time.perf_counter() - t0:.1f} s)")
    return losses


if __name__ == "__main__":
    main()
