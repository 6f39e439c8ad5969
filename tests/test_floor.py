"""The compute floor of the benchmark (benchmarks/floor.py): FLOP formula, pass counter, throughput."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from emsedit.batching import make_turn
from emsedit.config import ModelConfig
from emsedit.data import EditRequest
from emsedit.generation import greedy_generate
from emsedit.models import answer_forward, answer_forward_many, load_model
from emsedit.prefix_cache import PrefixCachedModel
from emsedit.tiny import make_tiny_gpt2, make_tiny_llama, make_tokenizer, save_tiny_model

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("floor", ROOT / "benchmarks" / "floor.py")
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)

# A tiny Llama-style config: head_dim 4, q_dim 8, kv_dim 4, so a layer's linear parameters are
# q 8·8 + k 8·4 + v 8·4 + o 8·8 + gate/up/down 3·8·16 = 64 + 32 + 32 + 64 + 384 = 576.
CONFIG = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
          "num_key_value_heads": 1, "vocab_size": 10}
COUNTS = {"lowest": 1, "layers": 3, "lower_tokens": 5, "lower_pairs": 15, "upper_tokens": 10, "upper_pairs": 30,
          "upper_tokens_grad": 4, "upper_pairs_grad": 10, "head_rows": 3, "head_rows_grad": 2}


def test_floor_flops_by_hand():
    assert floor.layer_sizes(CONFIG) == {"hidden": 8, "inner": 16, "layers": 3, "vocab": 10, "q_dim": 8,
                                         "layer_params": 576}
    flops = floor.floor_flops(COUNTS, CONFIG)
    assert flops == {
        "lower": 1 * (2 * 576 * 5 + 4 * 8 * 15),  # 1 lower layer, distinct prompts: 6240
        "upper_forward": 2 * (2 * 576 * 10 + 4 * 8 * 30),  # 2 upper layers, every pass: 24960
        "upper_backward": 1 * (2 * 576 * 4 + 8 * 8 * 10),  # grad passes, the layer above the lowest: 5248
        "head_forward": 2 * 8 * 10 * 3,  # 480
        "head_backward": 2 * 8 * 10 * 2,  # 320
        "total": 6240 + 24960 + 5248 + 480 + 320,
    }
    assert flops["total"] == 37248
    assert floor.floor_seconds(flops, 1e-6) == pytest.approx(37248 / 1e3)
    assert floor.floor_seconds(1e9, 2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        floor.floor_seconds(1.0, 0.0)


def test_layer_sizes_match_real_models_and_unknown_configs_fail():
    tok = make_tokenizer("llama")
    llama = make_tiny_llama(tok, n_layers=2)
    linear = sum(m.weight.numel() for m in llama.model.layers[0].modules() if isinstance(m, nn.Linear))
    assert floor.layer_sizes(llama.config)["layer_params"] == linear
    gpt2 = make_tiny_gpt2(make_tokenizer("gpt2"), n_layers=2)
    sizes = floor.layer_sizes(gpt2.config)
    conv = sum(m.weight.numel() for n, m in gpt2.transformer.h[0].named_modules() if n.count(".") == 1 and
               hasattr(m, "nf"))
    assert sizes["layer_params"] == conv and sizes["layers"] == 2 and sizes["hidden"] == 32
    with pytest.raises(ValueError, match="unsupported model config"):
        floor.layer_sizes({"d_model": 8, "vocab_size": 10})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_yaml = save_tiny_model(tmp_path_factory.mktemp("floor") / "tiny-llama", style="llama")
    model, tok = load_model(ModelConfig.from_yaml(model_yaml))
    return model, tok


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


def test_count_passes_prefix_cached(tiny):
    model, _tok = tiny
    cached = PrefixCachedModel(model, ["model.layers.1.mlp.down_proj"])
    assert cached.lowest == 1
    ids, mask = _batch()
    with floor.count_passes(cached) as counts:
        cached(input_ids=ids, attention_mask=mask)
        s = counts.summary()
        assert (s["lowest"], s["layers"]) == (1, 2)
        assert s["upper_tokens"] == 8 and s["upper_tokens_grad"] == 8  # real tokens only, grad enabled
        assert s["upper_pairs"] == 15 + 6  # causal pairs: 5·6/2 + 3·4/2
        assert s["lower_prompts"] == 2 and s["lower_tokens"] == 8
        assert s["head_rows"] == 10  # full logits: 2 rows × 5 positions

        cached(input_ids=ids, attention_mask=mask)  # the same mini-batch: lower layers replayed
        assert cached.hits == 1
        s = counts.summary()
        assert s["upper_tokens"] == 16 and s["upper_passes"] == 2
        assert s["lower_prompts"] == 2 and s["lower_rows_computed"] == 2 and s["lower_passes"] == 1

        with torch.no_grad():
            cached(input_ids=ids, attention_mask=mask)
        assert counts.passes[-1]["grad"] is False and counts.passes[-1]["upper"] is True
        s = counts.summary()
        assert s["upper_tokens"] == 24 and s["upper_tokens_grad"] == 16 and s["grad_passes"] == 2
        assert s["lower_prompts"] == 2
    # the hooks are gone: another pass is not counted
    cached(input_ids=ids.clone(), attention_mask=mask)
    assert counts.summary()["passes"] == 3


def test_count_passes_warm_joined_and_answer_rows(tiny):
    model, tok = tiny
    cached = PrefixCachedModel(model, ["model.layers.1.mlp.down_proj"])
    reqs = [EditRequest(i, f"the colour of item {i} is", "red", None, (f"item {i} has colour",),
                        (f"where is item {i}?",), "north", None) for i in range(6)]
    batches = make_turn(reqs, tok, split="eval", lm_batch_size=4).edit
    real = sum(int(b.attention_mask.sum()) for b in batches)
    scored = sum(int((b.labels != -100).sum()) for b in batches)
    with floor.count_passes(cached) as counts:
        cached.warm(batches)  # an early-stopped pass: lower layers only
        s = counts.summary()
        assert s["lower_passes"] == 1 and s["upper_passes"] == 0 and s["head_rows"] == 0
        assert s["lower_prompts"] == 6 and s["lower_tokens"] == real
        with torch.no_grad():
            answer_forward_many(cached, batches)  # one joined pass, replayed; head at answer positions
        s = counts.summary()
        assert s["upper_passes"] == 1 and s["upper_tokens"] == real and s["lower_passes"] == 1
        assert s["head_rows"] == scored and s["grad_passes"] == 0
        answer_forward(cached, batches[0])[0].sum().backward()
        s = counts.summary()
        assert s["grad_passes"] == 1 and s["head_rows_grad"] == int((batches[0].labels != -100).sum())
        assert s["lower_prompts"] == 6


def test_count_passes_plain_model_and_generation(tiny):
    model, _tok = tiny
    for name, p in model.named_parameters():  # only layer 1 trainable: the split is at layer 1
        p.requires_grad_(name == "model.layers.1.mlp.down_proj.weight")
    try:
        ids, mask = _batch()
        with floor.count_passes(model) as counts:
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids, attention_mask=mask)  # no prefix cache: lower layers run again
            s = counts.summary()
            assert s["lowest"] == 1 and s["lower_rows_computed"] == 4 and s["lower_prompts"] == 2
            with torch.no_grad():
                out = greedy_generate(model, [[1, 5, 6], [1, 7]], [3, 3], stop_ids=set(), pad_id=0)
            gen = counts.passes[2:]
            assert len(gen) == 3 and [p["tokens"] for p in gen] == [5, 2, 2]
            assert [p["head_rows"] for p in gen] == [2, 2, 2]  # logits_to_keep=1
            s = counts.summary()
            assert s["unknown_context"] == 0
            # each step's rows are new sequences (prompt + tokens so far): 2 prompts + 2 × 2 continuations
            assert s["lower_prompts"] == 2 + 2 + 4 and s["lower_tokens"] == 8 + 5 + 2 + 2
            assert s["upper_pairs"] == 2 * 21 + (6 + 3) + (4 + 3) + (5 + 4)
            assert all(len(o) == 3 for o in out)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("mlp.down_proj.weight"))


def test_matmul_gflops_is_positive_and_restores_threads():
    torch.set_num_threads(1)
    rate = floor.matmul_gflops(1, repeats=3, seconds=0.05)
    assert math.isfinite(rate) and rate > 0.0
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError):
        floor.matmul_gflops(0)


def test_count_executed_splits_transformer_networks_and_algebra(tiny):
    """Executed FLOPs against hand counts: a full forward of the tiny Llama (every computed position,
    padding included; attention over all (query, key) pairs), a root module standing for an editor's
    hypernetwork, and a matmul outside any module; an attention call on CPU is counted (torch's counter
    leaves the CPU kernels out), forward and backward."""
    model, _tok = tiny
    size = floor.layer_sizes(model.config)
    ids, mask = _batch()
    rows, width = ids.shape
    network = nn.Linear(size["hidden"], 3, bias=False)
    a, b = torch.randn(4, 6), torch.randn(6, 5)
    with floor.count_executed() as executed, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        network(torch.randn(7, size["hidden"]))
        a @ b
    split = floor.executed_split(executed, model)
    tokens = rows * width
    transformer = (size["layers"] * (2 * size["layer_params"] * tokens + 4 * size["q_dim"] * rows * width * width)
                   + 2 * size["hidden"] * size["vocab"] * tokens)
    assert split == {"transformer": transformer, "editor_networks": 2 * 7 * size["hidden"] * 3,
                     "outside_modules": 2 * 4 * 6 * 5, "total": transformer + 2 * 7 * size["hidden"] * 3 + 240}

    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    with floor.count_executed() as attention:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal).sum().backward()
    forward = 4 * 2 * 3 * 5 * 5 * 4  # (q k^T) and (p v): 2 · B·H·L·S·D each
    # backward as torch counts it: 5 such products (dV, dP, dQ, dK and the recomputed scores) = 2.5 × forward
    assert attention["by_roots"] == {frozenset(): attention["total"]}
    assert attention["total"] == forward + forward * 5 // 2


class _Shifted(nn.Module):
    """A layer whose weight an editor network computes (as an edit's shift does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_count_executed_backward_into_a_network_counts_as_network():
    """A backward through the transformer into the network that made its weight: torch's tracker keeps
    the transformer active (its input needs no gradient); the network's ops still count as network."""
    layer, network = _Shifted(), nn.Linear(3, 4 * 5, bias=False)
    z, x = torch.randn(2, 3), torch.randn(6, 4)
    with floor.count_executed() as executed:
        layer.weight = network(z).sum(0).reshape(4, 5)
        layer(x).sum().backward()
    split = floor.executed_split(executed, layer)
    assert split == {"transformer": 2 * (2 * 6 * 4 * 5), "editor_networks": 2 * (2 * 2 * 3 * 20),
                     "outside_modules": 0, "total": 2 * 240 + 2 * 240}


def test_floor_seconds_of_a_job_use_the_higher_rate_measured_around_it():
    """A job's floor is at the faster of the throughputs measured just before and after it, so a slow
    moment of the machine never makes the job look closer to its floor than it is."""
    spec = importlib.util.spec_from_file_location("run_benchmarks", ROOT / "benchmarks" / "run_benchmarks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    block = {"measured_s": 3.0, "matmul_gflops": [50.0, 100.0], "flops": {"total": 2e11}, "counts": {}}
    out = bench.with_floor_seconds(block)
    assert out["floor_s"] == pytest.approx(2.0) and out["ratio"] == pytest.approx(1.5)
    assert out["matmul_gflops"] == [50.0, 100.0]
    executed = bench.with_executed_seconds({"total": 3e11}, out)
    assert executed["executed_s"] == pytest.approx(3.0) and executed["executed_over_floor"] == pytest.approx(1.5)
    assert executed["measured_over_executed"] == pytest.approx(1.0)
