"""Data parallelism on CPU (gloo, 2 processes, file rendezvous): one DDP step's gradient equals
the single-process gradient over the union of the shards; distributed IWELBO / model ATE equal
the single-process ones, in input order."""
import multiprocessing as mp

import numpy as np
import pytest
import torch

from samsvae.data import MinibatchLoader, load_screen, make_batch, make_split, simulate_screen
from samsvae.infer import model_ate, test_iwelbo
from samsvae.train import TrainConfig
from samsvae.train.prepare import build_model_for_screen, split_indices

WORLD = 2
SEED = 3
ATE_VALUES = 100  # shrinks model_ate's label groups so that 8 labels make 3 groups


def _screen(path):
    screen = load_screen(path)
    train = split_indices(make_split(screen, seed=0), "train")
    return screen, train


def _model(screen, train):
    # float64 (the reference ops support it): the comparisons then test the reduction and
    # the scaling, not float32 rounding of sums with cancellation
    torch.manual_seed(0)
    return build_model_for_screen(screen, train, model="sams_vae", n_latent=4,
                                  n_hidden=16).double()


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    """The float64 reference ops, here and in the spawned ranks (which inherit the
    environment): a backend is chosen per call, not stored in the model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAMSVAE_BACKEND", "reference")
        yield


def _shards(train):
    return [train[:40], train[40:70]]  # unequal local batches: the loss scaling must handle it


def _eval_rows(screen):
    return np.random.default_rng(0).permutation(screen.n_cells)[:90]


def _worker(rank, tmp, data_path):
    torch.set_num_threads(1)
    import samsvae.infer.ate as ate
    from samsvae.infer.iwelbo import cells_iwelbo
    from samsvae.train.distributed import DistributedTrainer, init_from_env, shutdown
    ate._MODEL_ATE_VALUES = ATE_VALUES
    comm = init_from_env("cpu", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=WORLD,
                         timeout_s=60)
    screen, train = _screen(data_path)
    model = _model(screen, train)
    batch = make_batch(screen, _shards(train)[rank])
    trainer = DistributedTrainer(model, [batch], None,
                                 TrainConfig(max_steps=1, seed=SEED, progress=False),
                                 comm=comm, n_train_cells=train.size, log=None)
    loss = trainer._train_step(batch)
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
             for n, p in model.named_parameters()}
    iw = cells_iwelbo(model, screen, _eval_rows(screen), batch_size=16, particles=6, chunk=4,
                      global_seed=1, comm=comm)
    labels = sorted(set(screen.labels[~screen.is_control].tolist()))
    m_ate = ate.model_ate(model, screen, labels, n_samples=20, seed=2, comm=comm)
    trainer.close()
    try:
        trainer._train_step(batch)
        closed_refuses = False
    except RuntimeError:
        closed_refuses = True
    torch.save({"loss": loss, "grads": grads, "state": model.state_dict(), "iwelbo": iw,
                "ate": m_ate, "labels": labels, "closed_refuses": closed_refuses},
               f"{tmp}/rank{rank}.pt")
    shutdown(comm, completed=True)


def run_workers(target, tmp, *args, timeout=120):
    """Start WORLD spawned processes ``target(rank, tmp, *args)``; fail on a non-zero exit."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, str(tmp), *args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    adata = simulate_screen(400, 25, 6, n_combinations=2, seed=4)
    path = tmp / "sim.h5ad"
    adata.write_h5ad(path)
    run_workers(_worker, tmp, str(path))
    return path, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_gradient_equals_single_process_gradient_over_the_union(results):
    from samsvae.train.trainer import rank_seed
    path, ranks = results
    screen, train = _screen(path)
    model = _model(screen, train)
    shards = _shards(train)
    total, cells = 0.0, 0
    for rank, rows in enumerate(shards):
        gen = torch.Generator()
        gen.manual_seed(rank_seed(SEED, rank))  # the noise each rank's trainer draws
        out = model.loss(make_batch(screen, rows), particles=5, generator=gen)
        total = total + out["loss"] * rows.size
        cells += rows.size
    union_loss = total / cells  # mean negative ELBO over the 70 cells of the union
    union_loss.backward()
    assert torch.allclose(ranks[0]["loss"].double(), union_loss.detach(), rtol=1e-6)
    for name, p in model.named_parameters():
        ref = torch.zeros_like(p) if p.grad is None else p.grad
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["grads"][name], ref, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name} on rank {r}: {m}")
    # every parameter got a gradient (the global terms, weighted by the GLOBAL N_t, reach the
    # perturbation parameters), and the ranks hold the same weights after the step
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=0, atol=0, msg=name)


def test_distributed_iwelbo_equals_single_process_in_input_order(results):
    path, ranks = results
    screen, train = _screen(path)
    model = _model(screen, train)
    model.load_state_dict(ranks[0]["state"])
    rows = _eval_rows(screen)
    ref = test_iwelbo(model, MinibatchLoader(screen, rows, 16, shuffle=False), particles=6,
                      chunk=4, global_seed=1)
    assert ranks[0]["iwelbo"].shape == (rows.size,)
    np.testing.assert_allclose(ranks[0]["iwelbo"], ref, rtol=1e-12)
    np.testing.assert_array_equal(ranks[0]["iwelbo"], ranks[1]["iwelbo"])


def test_distributed_model_ate_equals_single_process(results, monkeypatch):
    import samsvae.infer.ate as ate
    path, ranks = results
    monkeypatch.setattr(ate, "_MODEL_ATE_VALUES", ATE_VALUES)
    screen, train = _screen(path)
    model = _model(screen, train)
    model.load_state_dict(ranks[0]["state"])
    labels = ranks[0]["labels"]
    assert len(labels) > 2 * (ATE_VALUES // screen.n_genes - 1)  # several groups, both ranks
    ref = model_ate(model, screen, labels, n_samples=20, seed=2)
    np.testing.assert_allclose(ranks[0]["ate"], ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ranks[0]["ate"], ranks[1]["ate"])


def test_a_closed_trainer_refuses_to_train(results):
    _, ranks = results
    assert all(r["closed_refuses"] for r in ranks)
