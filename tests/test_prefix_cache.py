"""The prefix cache replays unedited lower layers and changes no result."""

from __future__ import annotations

import torch

from emsedit.data import EditRequest, make_turn
from emsedit.models import add_shift, answer_forward, resolve_modules, weight_shape
from emsedit.prefix_cache import PrefixCachedModel, find_layer_list
from emsedit.tiny import make_tiny_gpt2, make_tiny_llama, make_tokenizer


def _batches(tok):
    reqs = [EditRequest(i, f"the colour of item {i} is", "red", None, (f"item {i} has colour",),
                        (f"where is item {i}?",), "north", None) for i in range(6)]
    return make_turn(reqs, tok, split="eval", lm_batch_size=4).edit


def _check(model, names, tok) -> None:
    cached = PrefixCachedModel(model, names)
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


def test_llama_replay_matches_plain_model() -> None:
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=1, n_layers=3, dtype=torch.float64)
    _check(model, ["model.layers.2.mlp.down_proj"], tok)


def test_gpt2_replay_matches_plain_model() -> None:
    tok = make_tokenizer("gpt2")
    tok.pad_token = tok.pad_token or tok.eos_token or tok.convert_ids_to_tokens(0)
    model = make_tiny_gpt2(tok, seed=1, n_layers=3)
    model.double()
    _check(model, ["transformer.h.2.mlp.c_proj"], tok)


def test_disabled_when_the_lowest_layer_is_edited() -> None:
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, n_layers=2)
    assert find_layer_list(model, ["model.layers.0.mlp.down_proj"]) is None
    assert not PrefixCachedModel(model, ["model.layers.0.mlp.down_proj"]).enabled
