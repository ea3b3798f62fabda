"""MaskedPerturbationEmbedding: the module over masked_embedding_sum."""
import pytest
import torch

from samsvae.nn import MaskedPerturbationEmbedding
from samsvae.ops.embedding import masked_embedding_sum_reference


def _dosage(cells=7, T=12):
    rows = [[0], [3, 5], [], [11], [0, 11], [5], [2]][:cells]
    crow = torch.tensor([0] + list(torch.cumsum(torch.tensor([len(r) for r in rows]), 0)))
    col = torch.tensor([c for r in rows for c in r])
    return torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), size=(cells, T),
                                   check_invariants=True)


@pytest.mark.parametrize("masked, stochastic", [(True, True), (False, True), (True, False)])
def test_forward_matches_the_op_with_its_parameters(masked, stochastic):
    emb = MaskedPerturbationEmbedding(12, 4, masked=masked, stochastic=stochastic,
                                      temperature=0.5)
    d = _dosage()
    got = emb(d, particles=3, generator=torch.Generator().manual_seed(3), backend="reference")
    want = masked_embedding_sum_reference(d, emb.loc, emb.log_scale, emb.mask_logits,
                                          particles=3, temperature=0.5,
                                          generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.z_p, want.z_p)
    assert got.z_p.shape == (3, 7, 4)
    assert (got.mask is None) == (not masked)
    assert torch.equal(got.index, torch.tensor([0, 2, 3, 5, 11]))
    assert (got.z_p[:, 2] == 0).all()           # the control cell


def test_gradients_reach_every_parameter():
    emb = MaskedPerturbationEmbedding(12, 4)
    emb(_dosage(), particles=2).z_p.pow(2).sum().backward()
    for name, p in emb.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # only the rows of perturbations present in the batch get gradient
    assert (emb.loc.grad[[1, 4, 6, 7, 8, 9, 10]] == 0).all()


def test_initial_mask_probability_and_bad_arguments():
    emb = MaskedPerturbationEmbedding(5, 3, init_mask_prob=0.2)
    torch.testing.assert_close(emb.mask_probs(), torch.full((5, 3), 0.2))
    assert MaskedPerturbationEmbedding(5, 3, masked=False).mask_probs() is None
    with pytest.raises(ValueError, match="dosage must be"):
        emb(_dosage(), particles=1)
    with pytest.raises(ValueError, match="n_latent"):
        MaskedPerturbationEmbedding(5, 0)
    with pytest.raises(ValueError, match="init_mask_prob"):
        MaskedPerturbationEmbedding(5, 3, init_mask_prob=1.0)
