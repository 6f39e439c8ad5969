"""Tests for the running normaliser, the residual low-rank hypernetwork and the rank schedule.

Spec §12.2 items 3, 4 and 8 (§6.3, §6.4, §7.5.1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emsedit.registry import editor_class
from emsedit.hparams import load_editor_hparams
from emsedit.config import REPO_ROOT
from emsedit.hypernet import HyperBlock, HyperNet, RunningNorm, step_ranks
from emsedit.models import resolve_modules
from emsedit.tiny import make_tiny_llama, make_tokenizer

torch.set_num_threads(1)

EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------- RunningNorm
@pytest.mark.parametrize("sizes", [[5, 3, 7], [1, 1, 9, 2], [40]])
def test_running_norm_merge_matches_numpy(sizes):
    """After merging several batches: mean/var = numpy's (population) over the concatenation,
    std = sqrt(M2 / (n − 1)) with M2 = n·var, n = total rows (spec §6.4)."""
    rng = np.random.default_rng(sum(sizes))
    dim = 6
    # different offsets and scales per batch so that the merge term δ²·n·m/n' matters
    batches = [rng.normal(loc=3.0 * i - 2.0, scale=0.5 + i, size=(m, dim)) for i, m in enumerate(sizes)]
    norm = RunningNorm(dim)
    for b in batches:
        norm.update(torch.tensor(b, dtype=torch.float32))
    allx = np.concatenate(batches)
    n = allx.shape[0]
    mean = allx.mean(0)
    var = allx.var(0)  # population (ddof=0)
    std = np.sqrt(var * n / (n - 1))
    assert float(norm.n) == n
    np.testing.assert_allclose(norm.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.var.numpy(), var, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), allx.std(0, ddof=1), rtol=1e-5, atol=1e-5)
    # forward normalises with (x − mean) / (std + eps_fp32)
    x = torch.tensor(rng.normal(size=(3, dim)), dtype=torch.float32)
    expected = (x.numpy() - mean) / (std + EPS32)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_running_norm_initial_state_and_empty_update():
    norm = RunningNorm(4)
    assert float(norm.n) == 0
    assert torch.equal(norm.std, torch.ones(4))  # std starts at 1 (EMSEdit version)
    assert torch.equal(norm.mean, torch.zeros(4))
    norm.update(torch.zeros(0, 4))
    assert float(norm.n) == 0 and torch.equal(norm.std, torch.ones(4))
    # the statistics are buffers, so they travel with state_dict
    assert {"n", "mean", "var", "std"} <= set(norm.state_dict())


def test_running_norm_single_row_is_finite():
    norm = RunningNorm(3)
    norm.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert float(norm.n) == 1
    assert torch.allclose(norm.mean, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.isfinite(norm.std).all() and torch.isfinite(norm.var).all()


# ---------------------------------------------------------------------------------------- HyperNet
def _hypernet(key_dim=5, value_dim=3, n_modules=2, rank=4, n_blocks=3, seed=0) -> HyperNet:
    return HyperNet(key_dim, value_dim, n_modules, rank=rank, n_blocks=n_blocks, init_lr=1e-6,
                    generator=torch.Generator().manual_seed(seed))


def test_hypernet_is_identity_on_normalised_input_at_init():
    torch.manual_seed(0)
    net = _hypernet()
    keys, grads = torch.randn(12, 5) * 3 + 1, torch.randn(12, 3) * 0.1 - 2
    net.norm.update(torch.cat([keys, grads], -1))
    normalised = net.norm(torch.cat([keys, grads], -1))
    for m in range(2):
        pk, pg = net(keys, grads, m)
        assert pk.shape == (12, 5) and pg.shape == (12, 3)
        assert torch.equal(torch.cat([pk, pg], -1), normalised)
    # and the input really was changed by the normaliser (not a vacuous identity)
    assert not torch.allclose(normalised, torch.cat([keys, grads], -1))


def test_hypernet_init_values():
    net = _hypernet(n_modules=3)
    assert torch.equal(net.lr.weight, torch.full((3, 1), 1e-6))
    assert torch.equal(net.lamda.weight, torch.zeros(3, 1))
    assert float(net.module_lr(2).detach()) == pytest.approx(1e-6)
    assert float(net.module_lamda(1).detach()) == 0.0
    for block in net.blocks:
        assert torch.equal(block.B, torch.zeros_like(block.B))
        assert torch.equal(block.c, torch.zeros_like(block.c))
        assert block.A.abs().sum() > 0  # A ~ N(0, 1)
        assert torch.equal(block.scale.weight, torch.ones_like(block.scale.weight))
        assert torch.equal(block.shift.weight, torch.zeros_like(block.shift.weight))


def test_hypernet_gradients_at_init_reach_B_and_c_but_not_A():
    """clamp(min=0) passes gradient at the zero pre-activation; with B = 0, A's gradient is 0."""
    torch.manual_seed(1)
    net = _hypernet(n_blocks=2)
    keys, grads = torch.randn(7, 5), torch.randn(7, 3)
    net.norm.update(torch.cat([keys, grads], -1))
    pk, pg = net(keys, grads, 1)
    weights = torch.randn(7, 8)
    (torch.cat([pk, pg], -1) * weights).sum().backward()
    for block in net.blocks:
        assert block.A.grad is not None and torch.count_nonzero(block.A.grad) == 0
        assert block.B.grad is not None and block.B.grad.abs().sum() > 0
        assert block.c.grad is not None and block.c.grad.abs().sum() > 0
        assert block.shift.weight.grad[1].abs().sum() > 0  # the selected module's row
        assert torch.count_nonzero(block.shift.weight.grad[0]) == 0  # other modules untouched
        assert torch.count_nonzero(block.scale.weight.grad) == 0  # z = 0 at init


def test_hyperblock_passes_gradient_through_the_zero_pre_activation():
    """Guards the clamp-vs-relu pitfall (spec §11.7) in HyperBlock itself: at init (B = 0, c = 0) every
    pre-activation h A B + c is exactly 0, and the block's clamp(min=0) passes the upstream gradient
    there as if it were the identity (relu would pass 0). So with upstream gradient w:
    dL/dc = Σ_rows scale[m]·w = Σ_rows w and dL/dB = (h A)ᵀ w, exactly."""
    block = HyperBlock(6, 3, 2, torch.Generator().manual_seed(4))
    h = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    idx = torch.tensor([0, 1, 1, 0, 1])
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.count_nonzero(h @ block.A @ block.B + block.c) == 0  # the kink, on every entry
    (block(h, idx) * w).sum().backward()
    torch.testing.assert_close(block.c.grad, w.sum(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(block.B.grad, (h @ block.A).detach().T @ w, rtol=1e-5, atol=1e-5)
    assert block.c.grad.abs().min() > 0


# ---------------------------------------------------------------------------------------- ranks
def test_step_ranks_floor_div_and_none():
    assert step_ranks(1024, 4, "floor_div") == [1024, 512, 341, 256]
    assert step_ranks(1024, 1, "floor_div") == [1024]
    assert step_ranks(16, 4, "none") == [16, 16, 16, 16]
    assert step_ranks(2, 4, "floor_div") == [2, 1, 1, 1]  # never below 1
    with pytest.raises(ValueError, match="rank_decay"):
        step_ranks(16, 2, "halve")


@pytest.fixture(scope="module")
def tiny_llama():
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=0)
    modules = resolve_modules(model, ["model.layers.{0..1}.mlp.down_proj"])
    return model, modules


def _editor(tiny_llama, name, protocol, **overrides):
    model, modules = tiny_llama
    hp = load_editor_hparams(REPO_ROOT / "config" / "editors" / f"{name}.yaml").with_overrides(overrides)
    return editor_class(name)(model, modules, hp, protocol=protocol, seed=0)


def _ranks(step_nets) -> set[int]:
    out = set()
    for net in step_nets.values():
        out.add(net.rank)
        out.update(block.A.shape[1] for block in net.blocks)
        out.update(block.B.shape[0] for block in net.blocks)
    return out


def test_emsedit_sequential_builds_distinct_networks_with_decaying_ranks(tiny_llama):
    ed = _editor(tiny_llama, "emsedit", "sequential", steps=4)
    assert ed.hypernetworks == "per_step" and ed.schedule == "rollout"
    assert len(ed.nets) == 4
    assert len({id(n) for n in ed.nets}) == 4
    assert len(ed.distinct_nets()) == 4
    assert [_ranks(n) for n in ed.nets] == [{1024}, {512}, {341}, {256}]
    # no parameter is shared between steps, and the optimiser sees each parameter once
    ids = [{id(p) for p in n.parameters()} for n in ed.nets]
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
    assert len(ed.params) == sum(len(s) for s in ids)
    # one normaliser per step
    norms = {id(net.norm) for n in ed.nets for net in n.values()}
    assert len(norms) == 4


def test_emsedit_batch_shares_one_network_object(tiny_llama):
    ed = _editor(tiny_llama, "emsedit", "batch", steps=4)
    assert ed.hypernetworks == "shared" and ed.schedule == "batch"
    assert all(n is ed.nets[0] for n in ed.nets)
    assert len(ed.distinct_nets()) == 1
    assert _ranks(ed.nets[0]) == {1024}
    assert len(ed.params) == len(list(ed.nets[0].parameters()))


def test_rledit_per_step_rank_even_with_one_step(tiny_llama):
    ed = _editor(tiny_llama, "rledit", "sequential", steps=2, rank=32)
    assert [_ranks(n) for n in ed.nets] == [{32}, {16}]
    ed = _editor(tiny_llama, "malmen", "sequential", steps=3, rank=32)
    assert all(n is ed.nets[0] for n in ed.nets) and _ranks(ed.nets[0]) == {32}


def test_one_network_per_shape_group(tiny_llama):
    """Both down_proj layers have the same (d_in, d_out): one HyperNet with two module indices."""
    ed = _editor(tiny_llama, "emsedit", "batch", rank=8)
    assert list(ed.groups) == ["64x32"]
    assert sorted(ed.index_of.values()) == [0, 1]
    net = ed.nets[0]["64x32"]
    assert (net.key_dim, net.value_dim) == (64, 32)
    assert net.lr.weight.shape == (2, 1)
