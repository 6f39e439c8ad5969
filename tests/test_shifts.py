"""Tests for the ridge shift, its analytic meta-gradient and the MEND outer-product shift.

Spec §12.2 items 5–7 (§6.5, §6.6, §7.1). Everything is float64 where gradients are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emsedit.config import REPO_ROOT
from emsedit.batching import make_turn
from emsedit.data import EditRequest
from emsedit.registry import editor_class
from emsedit.hparams import load_editor_hparams
from emsedit.models import resolve_modules
from emsedit.shifts import outer_shift, ridge_metagrad, ridge_shift
from emsedit.tiny import make_tiny_llama, make_tokenizer

torch.set_num_threads(1)

# (N, d_k, d_v): fewer rows than key dimensions (dual is the cheaper form) and more (primal)
SIZES = [(3, 6, 4), (9, 4, 3)]


def _data(n, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, dk, generator=g, dtype=torch.float64)
    values = torch.randn(n, dv, generator=g, dtype=torch.float64)
    c = torch.randn(dk, dv, generator=g, dtype=torch.float64)
    return keys, values, c


def _numpy_ridge(keys, values, lamda):
    k, v = keys.numpy(), values.numpy()
    return np.linalg.solve(k.T @ k + np.exp(lamda) * np.eye(k.shape[1]), k.T @ v)


# ---------------------------------------------------------------------------------------- ridge shift
@pytest.mark.parametrize("n,dk,dv", SIZES)
@pytest.mark.parametrize("solver", ["primal", "dual", "auto"])
@pytest.mark.parametrize("lamda", [0.0, -1.3, 0.7])
def test_ridge_shift_matches_numpy(n, dk, dv, solver, lamda):
    keys, values, _ = _data(n, dk, dv)
    expected = _numpy_ridge(keys, values, lamda)
    for lam in (lamda, torch.tensor(lamda, dtype=torch.float64)):
        got = ridge_shift(keys, values, lam, solver)
        assert got.shape == (dk, dv) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_ridge_shift_float32_forms_agree():
    keys, values, _ = _data(5, 8, 3, seed=3)
    keys, values = keys.float(), values.float()
    primal = ridge_shift(keys, values, 0.2, "primal")
    dual = ridge_shift(keys, values, 0.2, "dual")
    torch.testing.assert_close(primal, dual, rtol=1e-4, atol=1e-5)


def test_ridge_shift_unknown_solver():
    keys, values, _ = _data(3, 4, 2)
    with pytest.raises(ValueError, match="solver"):
        ridge_shift(keys, values, 0.0, "cholesky")
    with pytest.raises(ValueError, match="solver"):
        ridge_metagrad(keys, torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64),
                       0.0, "qr")


# ---------------------------------------------------------------------------------------- meta-gradient
def _loss(keys, values, lamda, c):
    """L = ⟨C, ΔW⟩ + ‖ΔW‖²_F with ΔW = (KᵀK + e^λ I)⁻¹ KᵀV via torch.linalg.solve."""
    eye = torch.eye(keys.shape[1], dtype=keys.dtype)
    shift = torch.linalg.solve(keys.T @ keys + torch.exp(lamda) * eye, keys.T @ values)
    return (c * shift).sum() + shift.square().sum(), shift


@pytest.mark.parametrize("n,dk,dv", SIZES)
@pytest.mark.parametrize("solver", ["primal", "dual", "auto"])
def test_ridge_metagrad_matches_autograd_and_finite_differences(n, dk, dv, solver):
    keys, values, c = _data(n, dk, dv, seed=n)
    lamda0 = 0.3
    # analytic (spec §6.6), given Γ = ∂L/∂ΔW = C + 2ΔW
    shift = ridge_shift(keys, values, lamda0, solver)
    gamma = c + 2.0 * shift
    dv_an, dlam_an = ridge_metagrad(keys, shift, gamma, lamda0, solver)
    assert dv_an.shape == (n, dv) and dlam_an.shape == ()

    # autograd through torch.linalg.solve
    v = values.clone().requires_grad_(True)
    lam = torch.tensor(lamda0, dtype=torch.float64, requires_grad=True)
    loss, _ = _loss(keys, v, lam, c)
    loss.backward()
    torch.testing.assert_close(dv_an, v.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dlam_an, lam.grad, rtol=1e-9, atol=1e-11)

    # autograd through the library's own ridge_shift (same form as the analytic one)
    v2 = values.clone().requires_grad_(True)
    lam2 = torch.tensor(lamda0, dtype=torch.float64, requires_grad=True)
    s2 = ridge_shift(keys, v2, lam2, solver)
    ((c * s2).sum() + s2.square().sum()).backward()
    torch.testing.assert_close(dv_an, v2.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dlam_an, lam2.grad, rtol=1e-9, atol=1e-11)

    # central finite differences
    h = 1e-6

    def f(vv, ll):
        with torch.no_grad():
            return float(_loss(keys, vv, torch.tensor(ll, dtype=torch.float64), c)[0])

    fd_v = torch.zeros_like(values)
    for i in range(n):
        for j in range(dv):
            plus, minus = values.clone(), values.clone()
            plus[i, j] += h
            minus[i, j] -= h
            fd_v[i, j] = (f(plus, lamda0) - f(minus, lamda0)) / (2 * h)
    fd_lam = (f(values, lamda0 + h) - f(values, lamda0 - h)) / (2 * h)
    torch.testing.assert_close(dv_an, fd_v, rtol=1e-6, atol=1e-7)
    assert float(dlam_an) == pytest.approx(fd_lam, rel=1e-6, abs=1e-7)


def test_ridge_metagrad_forms_agree():
    keys, values, c = _data(4, 7, 3, seed=11)
    shift = ridge_shift(keys, values, -0.5, "primal")
    a = ridge_metagrad(keys, shift, c, -0.5, "primal")
    b = ridge_metagrad(keys, shift, c, -0.5, "dual")
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------- MEND
def test_outer_shift_is_minus_lr_sum_of_outer_products():
    keys, grads, _ = _data(5, 4, 3, seed=2)
    lr = torch.tensor(0.37, dtype=torch.float64)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for i in range(5):
        expected -= lr * torch.outer(keys[i], grads[i])
    torch.testing.assert_close(outer_shift(keys, grads, lr), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- editors
def _requests(n):
    subjects = ["France", "Germany", "Italy", "Spain", "Japan", "England"]
    targets = ["Paris", "London", "Rome", "French", "German", "Japan"]
    return [
        EditRequest(index=i, prompt=f"The capital of {subjects[i]}", target=targets[i], old_target=None,
                    rephrases=(f"What is the capital of {subjects[i]}",),
                    loc_prompts=(f"The language spoken in {subjects[i]}?",), loc_answer="French",
                    loc_old_answer=None)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def llama_setup():
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=0)
    modules = resolve_modules(model, ["model.layers.{0..1}.mlp.down_proj"])
    turn = make_turn(_requests(6), tok, split="train", lm_batch_size=4)
    return model, modules, turn


def _editor(setup, name, **overrides):
    model, modules, _ = setup
    hp = load_editor_hparams(REPO_ROOT / "config" / "editors" / f"{name}.yaml").with_overrides(
        {"rank": 4, "chunk_size": 3, **overrides})
    return editor_class(name)(model, modules, hp, protocol="batch", seed=0)


def _perturb(editor, seed=0):
    """Make every hypernetwork parameter non-trivial so gradients reach A, scale, … too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_mend_predict_is_outer_shift_of_the_network_output(llama_setup):
    ed = _editor(llama_setup, "mend", lr=0.5)
    cache = ed.cache(llama_setup[2], 0)
    _perturb(ed)
    shifts = ed.predict(0, cache)
    for name, module_shift in shifts.items():
        net = ed.nets[0][ed.group_of[name]]
        idx = ed.index_of[name]
        with torch.no_grad():
            pk, pg = net(cache.keys[name], cache.grads[name], idx)
            expected = -net.module_lr(idx) * pk.T @ pg
        assert module_shift.shape == (64, 32)
        torch.testing.assert_close(module_shift, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["malmen", "mend"])
def test_editor_metagrad_matches_autograd_through_the_shift(llama_setup, name):
    """accumulate_metagrad (analytic ridge gradient / MEND surrogate, in chunks, all modules of a
    shape group in one pass) gives the same hypernetwork gradient as autograd of ⟨Γ, ΔW(θ)⟩ through
    each module's shift computed on its own."""
    ed = _editor(llama_setup, name, lr=0.5)
    cache = ed.cache(llama_setup[2], 0)
    _perturb(ed, seed=1)
    g = torch.Generator().manual_seed(5)
    shifts = ed.predict(0, cache)
    gammas = {n: torch.randn(s.shape, generator=g) for n, s in shifts.items()}

    ed.accumulate_metagrad(0, cache, shifts, gammas)
    analytic = [None if p.grad is None else p.grad.clone() for p in ed.params]
    for p in ed.params:
        p.grad = None

    total = 0.0
    for n in ed.modules:
        net = ed.nets[0][ed.group_of[n]]
        idx = ed.index_of[n]
        if name == "mend":
            pk, pg = net(cache.keys[n], cache.grads[n], idx)
            shift = outer_shift(pk, pg, net.module_lr(idx))
        else:
            rows = torch.full((cache.keys[n].shape[0],), idx, dtype=torch.long)  # one module alone
            v = ed.values(0, ed.group_of[n], cache.keys[n], cache.grads[n], rows)
            shift = ridge_shift(cache.keys[n], v, net.module_lamda(idx), "primal")
        total = total + (gammas[n] * shift).sum()
    total.backward()
    reference = [None if p.grad is None else p.grad.clone() for p in ed.params]
    checked = 0
    for a, r in zip(analytic, reference):
        if r is None or torch.count_nonzero(r) == 0:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        torch.testing.assert_close(a, r, rtol=2e-3, atol=1e-5 * float(r.abs().max()))
        checked += 1
    assert checked >= 5


# ------------------------------------------------------------------- RLEdit's memory in joined passes
def _memory_turns(tok):
    """Three turns of 2 requests (lm_batch_size 1: two 1-row mini-batches per kind and turn)."""
    reqs = _requests(6)
    return [make_turn(reqs[2 * i:2 * i + 2], tok, split="train", lm_batch_size=1) for i in range(3)]


def _per_batch_losses(ed, weighted, refs=None):
    """The reference: every mini-batch in its own forward pass, weight × loss, summed (no joining)."""
    from emsedit.losses import cross_entropy, kl_locality
    from emsedit.models import answer_rows_many

    total, i = 0.0, 0
    for turn, w in weighted:
        for b in (turn.unrel if refs is not None else turn.equiv):
            (answer,) = answer_rows_many(ed.model, [b])
            if refs is None:
                loss = w * cross_entropy(*answer)
            else:
                loss = w * ed.hp.loc_coef * kl_locality(refs[i], *answer)
                i += 1
            loss.backward()
            total += loss.item()
    return total


@pytest.mark.parametrize("kind", ["edit", "kl"])
def test_rledit_memory_passes_join_turns_and_equal_per_batch_passes(llama_setup, kind):
    """RLEdit's remembered turns (weights time_decay^j) share joined passes; the loss and the weight
    gradients equal those of one pass per mini-batch up to float rounding."""
    model, modules, _ = llama_setup
    tok = make_tokenizer("llama")
    ed = _editor(llama_setup, "rledit")
    turns = _memory_turns(tok)
    weighted = [(turns[2 - j], 0.8 ** j) for j in range(3)]
    groups = ed.weighted_passes(weighted, "equiv" if kind == "edit" else "unrel")
    assert len(groups) == 1 and len(groups[0][0]) == 6  # all three turns in one pass
    assert groups[0][1] == [1.0, 1.0, 0.8, 0.8, 0.8 ** 2, 0.8 ** 2]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the weights off the reference point so the KL term is not zero
        for m in modules.values():
            m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
    try:
        refs = None
        if kind == "kl":
            ed.restore_weights()
            refs = ed.reference_log_probs([b for t, _ in weighted for b in t.unrel])
            with torch.no_grad():  # far enough from the reference that KL is not a float-noise difference
                for m in modules.values():
                    m.weight.add_(0.5 * torch.randn(m.weight.shape, generator=g))
        ed.zero_lm_grads()
        joined = ed.edit_loss(weighted) if refs is None else ed.kl_loss(weighted, refs)
        grads = {n: m.weight.grad.clone() for n, m in modules.items()}
        ed.zero_lm_grads()
        reference = _per_batch_losses(ed, weighted, refs)
        # KL is a small difference of log-probabilities of magnitude ~ln(vocabulary): each is rounded
        # at float32 (1.2e-7 of a few units) in an order that depends on the pass's shape (on AVX-512
        # CPUs the attention kernel too), so the KL carries that absolute error however small it is
        # (3e-7 of 0.017 measured on an AMD EPYC); references shifted by one mini-batch move it by 1.4e-4.
        assert joined == pytest.approx(reference, rel=1e-5, abs=1e-6) and reference > 0
        for n, m in modules.items():
            torch.testing.assert_close(grads[n], m.weight.grad, rtol=1e-4, atol=1e-6)
    finally:
        ed.zero_lm_grads()
        ed.restore_weights()
