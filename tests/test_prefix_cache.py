"""The prefix cache replays unedited lower layers and changes no result."""

from __future__ import annotations

import pytest
import torch

from emsedit.batching import make_turn
from emsedit.data import EditRequest
from emsedit.losses import cross_entropy
from emsedit.models import (
    add_shift,
    answer_forward,
    answer_forward_many,
    resolve_modules,
    weight_shape,
)
from emsedit.prefix_cache import PrefixCachedModel, find_layer_list
from emsedit.tiny import make_tiny_gpt2, make_tiny_llama, make_tokenizer


def _batches(tok):
    reqs = [EditRequest(i, f"the colour of item {i} is", "red", None, (f"item {i} has colour",),
                        (f"where is item {i}?",), "north", None) for i in range(6)]
    return make_turn(reqs, tok, split="eval", lm_batch_size=4).edit


def _check(model, names, tok) -> None:
    cached = PrefixCachedModel(model, names, pack=False)  # bit for bit (packed passes: the tests below)
    assert cached.enabled and cached.lowest >= 1
    batches = _batches(tok)
    modules = resolve_modules(model, names)
    for b in batches:  # first pass records
        torch.testing.assert_close(answer_forward(cached, b)[0], answer_forward(model, b)[0], rtol=0, atol=0)
    for module in modules.values():  # an edit of the upper layer changes the output ...
        d_in, d_out = weight_shape(module)
        add_shift(module, torch.randn(d_in, d_out, dtype=torch.float64) * 0.5)
    for b in batches:  # ... and the replayed passes still equal the plain model's, with gradients
        out = answer_forward(cached, b)[0]
        torch.testing.assert_close(out, answer_forward(model, b)[0], rtol=0, atol=0)
        out.sum().backward()
    assert cached.hits == len(batches)
    assert all(m.weight.grad is not None for m in modules.values())
    fresh = make_turn([EditRequest(9, "a new prompt", "red", None, ("x",), ("y",), "z", None)], tok,
                      split="eval").edit[0]
    with torch.inference_mode():  # recorded under inference mode, replayed with grad: no error
        answer_forward(cached, fresh)
    answer_forward(cached, fresh)[0].sum().backward()


def _tiny(style: str, seed: int):
    """A float64 three-layer model of the style, its upper layer's edited module and its tokenizer."""
    tok = make_tokenizer(style)
    if style == "llama":
        return make_tiny_llama(tok, seed=seed, n_layers=3, dtype=torch.float64), ["model.layers.2.mlp.down_proj"], tok
    tok.pad_token = tok.pad_token or tok.eos_token or tok.convert_ids_to_tokens(0)
    return make_tiny_gpt2(tok, seed=seed, n_layers=3).double(), ["transformer.h.2.mlp.c_proj"], tok


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_replay_matches_plain_model(style) -> None:
    _check(*_tiny(style, seed=1))


def test_disabled_when_the_lowest_layer_is_edited() -> None:
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, n_layers=2)
    assert find_layer_list(model, ["model.layers.0.mlp.down_proj"]) is None
    assert not PrefixCachedModel(model, ["model.layers.0.mlp.down_proj"]).enabled


def _warm_check(model, names, tok) -> None:
    reqs = [EditRequest(i, "the colour of item " + "very " * (i % 4) + f"{i} is", "red", None, ("x",),
                        ("y",), "z", None) for i in range(11)]
    batches = make_turn(reqs, tok, split="eval", lm_batch_size=3).edit  # widths differ: padding
    assert len({b.input_ids.shape[1] for b in batches}) > 1
    cached = PrefixCachedModel(model, names)
    cached.warm(batches)
    assert len(cached._cache) == len(batches)  # one pass (11 prompts <= PASS_ROWS) stored per batch
    for b in batches:
        out = answer_forward(cached, b)[0]
        torch.testing.assert_close(out, answer_forward(model, b)[0])  # equal up to float rounding
        out.sum().backward()
    assert cached.hits == len(batches)
    assert all(m.weight.grad is not None for m in resolve_modules(model, names).values())
    again = PrefixCachedModel(model, names)  # the same list warmed again: the same numbers, exactly
    again.warm(batches)
    for b in batches:
        torch.testing.assert_close(again._cache[id(b.input_ids)][1], cached._cache[id(b.input_ids)][1],
                                   rtol=0, atol=0)
    cached.warm(batches)  # known batches are not computed again
    assert len(cached._cache) == len(batches)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_warm_computes_lower_layers_in_one_pass(style) -> None:
    _warm_check(*_tiny(style, seed=2))


def test_joined_pass_equals_one_pass_per_mini_batch() -> None:
    """answer_forward_many: each mini-batch's logits, labels and gradient as from its own pass."""
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=3, n_layers=3, dtype=torch.float64)
    names = ["model.layers.2.mlp.down_proj"]
    module = resolve_modules(model, names)[names[0]]
    reqs = [EditRequest(i, "item " + "very " * (i % 5) + f"{i} is", "red" if i % 3 else "dark red", None,
                        ("x",), ("y",), "z", None) for i in range(10)]
    batches = make_turn(reqs, tok, split="eval", lm_batch_size=3).edit
    assert len({b.input_ids.shape[1] for b in batches}) > 1
    alone = [answer_forward(model, b) for b in batches]
    sum(cross_entropy(lg, s.labels) for lg, s in alone).backward()
    expected_grad, module.weight.grad = module.weight.grad.clone(), None
    cached = PrefixCachedModel(model, names)
    for wrapped in (model, cached):
        joined = answer_forward_many(wrapped, batches)
        for (lg, s), (lg0, s0) in zip(joined, alone):
            assert lg.shape == lg0.shape
            assert torch.equal(s.labels, s0.labels)
            torch.testing.assert_close(lg, lg0.detach())
        sum(cross_entropy(lg, s.labels) for lg, s in joined).backward()
        torch.testing.assert_close(module.weight.grad, expected_grad)
        module.weight.grad = None
    assert cached.hits == 1 and len(cached._cache) == len(batches)  # the joined pass replayed them


def _tiny_arch(arch: str, vocab: int):
    """A float64 three-layer model of another architecture family the model configs name, and its
    upper layer's edited module (packing relies on each family's handling of packed position ids)."""
    import transformers

    small = {"gemma2": (transformers.Gemma2Config, {"hidden_size": 32, "intermediate_size": 64,
                                                    "num_hidden_layers": 3, "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "head_dim": 8,
                                                    # shorter than the prompts (15-24 tokens), longer
                                                    # than their padding (a padding query seeing only
                                                    # padding would make the padded pass NaN)
                                                    "sliding_window": 12}, "model.layers.2.mlp.down_proj"),
             "gptj": (transformers.GPTJConfig, {"n_embd": 32, "n_layer": 3, "n_head": 4, "rotary_dim": 4},
                      "transformer.h.2.mlp.fc_out")}
    config_class, sizes, name = small[arch]
    torch.manual_seed(4)
    config = config_class(vocab_size=vocab, max_position_embeddings=128, n_positions=128, **sizes)
    return transformers.AutoModelForCausalLM.from_config(config).double().eval(), [name]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gptj"])
def test_packed_lower_layers_equal_padded_ones(arch) -> None:
    """warm() runs a chunk's real tokens as one packed row (no padding computed): each prompt's lower
    layers equal those of the padded pass to float64 rounding, padding positions hold zeros, and a
    left-padded mini-batch falls back to the padded pass."""
    if arch in ("llama", "gpt2"):
        model, names, tok = _tiny(arch, seed=5)
    else:
        tok = make_tokenizer("llama")
        model, names = _tiny_arch(arch, len(tok))
    reqs = [EditRequest(i, "the colour of item " + "very " * (i % 4) + f"{i} is", "red", None, ("x",),
                        ("y",), "z", None) for i in range(11)]
    batches = make_turn(reqs, tok, split="eval", lm_batch_size=3).edit
    packed, padded = PrefixCachedModel(model, names), PrefixCachedModel(model, names, pack=False)
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw.get("position_ids")),
                                             with_kwargs=True)
    try:
        packed.warm(batches)
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0].shape == (1, int(sum(b.attention_mask.sum() for b in batches)))
    padded.warm(batches)
    for b in batches:
        mask = b.attention_mask.bool()
        got, want = packed._cache[id(b.input_ids)][1], padded._cache[id(b.input_ids)][1]
        assert got.shape == want.shape
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-10, atol=1e-12)
        assert not got[~mask].any()
    left = make_turn(reqs[:3], tok, split="eval", lm_batch_size=3).edit[0]
    left.input_ids = torch.flip(left.input_ids, [1])  # holes before real tokens: not packable
    left.attention_mask = torch.flip(left.attention_mask, [1])
    assert bool((~left.attention_mask.bool()).any())
    fallback = PrefixCachedModel(model, names)
    fallback.warm([left])
    assert fallback._cache[id(left.input_ids)][1].shape == (*left.input_ids.shape, got.shape[-1])


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_packed_passes_equal_padded_passes(style) -> None:
    """Passes through a packing prefix-cached model (the real tokens back to back) give each mini-batch
    the logits, loss gradient and hooked keys and gradients of the padded pass, to float64 rounding;
    under no_grad too (evaluation), and the scored positions' index gathers the same rows."""
    from emsedit.models import answer_rows_many
    from emsedit.tracing import Tracer

    model, names, tok = _tiny(style, seed=6)
    module = resolve_modules(model, names)[names[0]]
    reqs = [EditRequest(i, "item " + "very " * (i % 5) + f"{i} is", "red" if i % 3 else "dark red", None,
                        ("x",), ("y",), "z", None) for i in range(10)]
    batches = make_turn(reqs, tok, split="eval", lm_batch_size=3).edit
    results = {}
    for pack in (True, False):
        wrapped = PrefixCachedModel(model, names, pack=pack)
        with torch.no_grad():
            evaluated = answer_forward_many(wrapped, batches)
        where: list = []
        with Tracer(resolve_modules(model, names)) as tracer:
            rows = answer_rows_many(wrapped, batches, where=where)
            loss = sum(cross_entropy(lg, y) for lg, y in rows)
            keys, grads = tracer.keys_and_grads(loss, where[0])
        loss = sum(cross_entropy(lg, y) for lg, y in answer_rows_many(wrapped, batches))
        loss.backward()
        results[pack] = (evaluated, rows, keys, grads, module.weight.grad.clone(), where[0])
        module.weight.grad = None
    (ev, rows, keys, grads, grad, at), (ev0, rows0, keys0, grads0, grad0, mask0) = results[True], results[False]
    assert isinstance(at, tuple) and at[1].shape == (int(mask0.sum()),)  # the packed pass ran
    for (lg, s), (lg0, s0) in zip(ev, ev0):
        assert torch.equal(s.labels, s0.labels)
        torch.testing.assert_close(lg, lg0, rtol=1e-9, atol=1e-11)
    for (lg, y), (lg0, y0) in zip(rows, rows0):
        assert torch.equal(y, y0)
        torch.testing.assert_close(lg, lg0.detach(), rtol=1e-9, atol=1e-11)
    for n in names:
        torch.testing.assert_close(keys[n], keys0[n], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad, grad0, rtol=1e-9, atol=1e-11)
