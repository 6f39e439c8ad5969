"""Per-prompt attention in packed passes equals running each prompt on its own."""

from __future__ import annotations

import pytest
import torch

from emsedit.packed_attention import NAME, segment_attention
from emsedit.tiny import make_tiny_gpt2, make_tiny_llama, make_tokenizer

LENGTHS = [5, 1, 9, 3]  # one prompt of a single token, the longest not first


def _model(style: str, attn: str = "sdpa"):
    tok = make_tokenizer(style)
    if style == "llama":
        model = make_tiny_llama(tok, seed=1, n_layers=2, dtype=torch.float64)  # 4 heads, 2 key-value heads
    else:
        model = make_tiny_gpt2(tok, seed=1, n_layers=2).double()
    model.set_attn_implementation(attn)
    return model


def _prompts(model):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in LENGTHS]


def _packed(prompts):
    ids = torch.cat(prompts)[None]
    positions = torch.cat([torch.arange(len(p)) for p in prompts])[None]
    return ids, positions


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_segment_attention_equals_one_pass_per_prompt_with_gradients(style):
    model = _model(style)
    weight = model.get_output_embeddings().weight
    prompts = _prompts(model)
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(sum(LENGTHS), model.config.vocab_size, generator=g, dtype=torch.float64)

    alone = torch.cat([model(input_ids=p[None]).logits[0] for p in prompts])  # the reference
    (alone * probe).sum().backward()
    grad_alone, weight.grad = weight.grad.clone(), None

    ids, positions = _packed(prompts)
    with segment_attention(model, LENGTHS, ids.device):
        assert model.config._attn_implementation == NAME
        packed = model(input_ids=ids, position_ids=positions, attention_mask=None).logits[0]
    assert model.config._attn_implementation == "sdpa"  # put back
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12)
    (packed * probe).sum().backward()
    torch.testing.assert_close(weight.grad, grad_alone, rtol=0, atol=1e-10)
    # without the context, the same row attends across prompts unless the masked path is used: the
    # row's logits from the second prompt on differ when nothing separates the prompts
    crossed = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert not torch.allclose(crossed[LENGTHS[0]:], alone[LENGTHS[0]:], atol=1e-6)


def test_segment_attention_leaves_other_attention_alone_and_restores_after_an_error():
    eager = _model("llama", attn="eager")
    ids, positions = _packed(_prompts(eager))
    with segment_attention(eager, LENGTHS, ids.device):
        assert eager.config._attn_implementation == "eager"
    model = _model("llama")
    with pytest.raises(ValueError, match="boom"), segment_attention(model, LENGTHS, ids.device):
        raise ValueError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.config.sliding_window = max(LENGTHS) - 1  # a window the causal blocks would not honour
    with segment_attention(model, LENGTHS, ids.device):
        assert model.config._attn_implementation == "sdpa"


def test_segment_attention_nests():
    """A pass inside another packed pass's context (the prefix cache's warm-up) gets its own layout."""
    model = _model("llama")
    prompts = _prompts(model)
    ids, positions = _packed(prompts)
    alone = torch.cat([model(input_ids=p[None]).logits[0] for p in prompts[:2]])
    inner_ids, inner_positions = _packed(prompts[:2])
    with segment_attention(model, LENGTHS, ids.device):
        with segment_attention(model, LENGTHS[:2], ids.device):
            inner = model(input_ids=inner_ids, position_ids=inner_positions, attention_mask=None).logits[0]
        assert model.config._attn_implementation == NAME
        model(input_ids=ids, position_ids=positions, attention_mask=None)  # the outer layout again
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(inner, alone, rtol=0, atol=1e-12)


def test_segment_attention_refuses_a_pass_of_another_layout():
    model = _model("llama")
    ids, positions = _packed(_prompts(model))
    with segment_attention(model, LENGTHS[:-1], ids.device), pytest.raises(RuntimeError, match="packed pass"):
        model(input_ids=ids, position_ids=positions, attention_mask=None)
