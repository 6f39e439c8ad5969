"""Tests for model configs, module resolution, weight layout and loading (tiny in-process models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from emsedit.config import (
    REPO_ROOT,
    ConfigError,
    ModelConfig,
    find_model_config,
    load_yaml_dataclass,
)
from emsedit.models import (
    ModelNotMaterializedError,
    ModuleResolutionError,
    add_shift,
    answer_forward,
    answer_forward_many,
    expand_pattern,
    grad_in_out,
    load_model,
    materialize_model,
    resolve_modules,
    resolve_name_or_path,
    restore_weights,
    snapshot_weights,
    weight_in_out,
    weight_shape,
)
from emsedit.tiny import (
    make_tiny_gpt2,
    make_tiny_llama,
    make_tokenizer,
    save_tiny_model,
)

torch.set_num_threads(1)

LLAMA_EDIT = ["model.layers.{0..1}.mlp.down_proj"]
GPT2_EDIT = ["transformer.h.{0..1}.mlp.c_proj"]


@pytest.fixture(scope="module")
def llama_tok():
    return make_tokenizer("llama")


@pytest.fixture(scope="module")
def gpt2_tok():
    return make_tokenizer("gpt2")


@pytest.fixture()
def llama64(llama_tok):
    return make_tiny_llama(llama_tok, seed=0, dtype=torch.float64)


@pytest.fixture()
def gpt2_64(gpt2_tok):
    return make_tiny_gpt2(gpt2_tok, seed=0, dtype=torch.float64)


@pytest.fixture(params=["llama", "gpt2"])
def model_and_patterns(request, llama64, gpt2_64):
    return (llama64, LLAMA_EDIT) if request.param == "llama" else (gpt2_64, GPT2_EDIT)


# ------------------------------------------------------------------------------ answer-position logits

def test_answer_forward_matches_full_logits_at_scored_positions(model_and_patterns):
    """Logits come only from answer positions, yet equal the full model's there, gradients included."""
    from emsedit.batching import make_turn
    from emsedit.data import EditRequest

    model, patterns = model_and_patterns
    tok = make_tokenizer("llama" if "layers" in patterns[0] else "gpt2")
    reqs = [EditRequest(i, "the colour of item " + "very " * i + "big is", "red and blue" if i % 2 else "red",
                        None, ("x",), ("y",), "z", None) for i in range(5)]
    batch = make_turn(reqs, tok, split="eval", lm_batch_size=5).edit[0]
    module = next(iter(resolve_modules(model, patterns).values()))
    logits, scored = answer_forward(model, batch)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    first = batch.labels.shape[1] - scored.labels.shape[1]
    rows = scored.labels != -100
    assert rows.sum() > 0 and (~rows).sum() > 0  # some kept positions are not scored
    torch.testing.assert_close(logits[rows], full[:, first:][rows])
    assert (logits[~rows] == 0).all()
    logits[rows].square().sum().backward()
    fast = module.weight.grad.clone()
    module.weight.grad = None
    full[:, first:][rows].square().sum().backward()
    torch.testing.assert_close(fast, module.weight.grad)
    with torch.no_grad():  # argmax: the full model's argmax at scored positions, -1 elsewhere
        ids, cut = answer_forward_many(model, [batch], argmax=True)[0]
    assert ids.dtype == torch.long and ids.shape == rows.shape and torch.equal(cut.labels, scored.labels)
    assert torch.equal(ids[rows], full[:, first:][rows].argmax(-1)) and (ids[~rows] == -1).all()


# ------------------------------------------------------------------------------ patterns / resolution

def test_expand_pattern_ranges_lists_and_products():
    assert expand_pattern("a.{2..4}.b") == ["a.2.b", "a.3.b", "a.4.b"]
    assert expand_pattern("h.{10,12,14}.fc_in") == ["h.10.fc_in", "h.12.fc_in", "h.14.fc_in"]
    assert expand_pattern("{1..2}.{x,y}") == ["1.x", "1.y", "2.x", "2.y"]
    assert expand_pattern("{1..2,7}") == ["1", "2", "7"]
    assert expand_pattern("plain.name") == ["plain.name"]
    with pytest.raises(ModuleResolutionError):
        expand_pattern("a.{1..2.b")


def test_resolve_modules_order_follows_patterns(llama64):
    mods = resolve_modules(llama64, ["model.layers.{1,0}.mlp.up_proj", "model.layers.0.mlp.gate_proj"])
    assert list(mods) == [
        "model.layers.1.mlp.up_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.gate_proj",
    ]
    assert mods["model.layers.1.mlp.up_proj"] is llama64.model.layers[1].mlp.up_proj


def test_resolve_modules_gpt2_conv1d(gpt2_64):
    mods = resolve_modules(gpt2_64, GPT2_EDIT)
    assert list(mods) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_typo_lists_near_matches(llama64):
    with pytest.raises(ModuleResolutionError) as info:
        resolve_modules(llama64, ["model.layers.{0..1}.mlp.dwn_proj"])
    msg = str(info.value)
    assert "model.layers.0.mlp.dwn_proj" in msg and "model.layers.1.mlp.dwn_proj" in msg
    assert "model.layers.0.mlp.down_proj" in msg  # the near match is offered


def test_out_of_range_layer_is_an_error(llama64):
    with pytest.raises(ModuleResolutionError, match="model.layers.5.mlp.down_proj"):
        resolve_modules(llama64, ["model.layers.{0..5}.mlp.down_proj"])


@pytest.mark.parametrize("name", ["model.layers.0.mlp", "model.norm", "model.embed_tokens"])
def test_non_linear_module_rejected(llama64, name):
    with pytest.raises(ModuleResolutionError, match="only nn.Linear and transformers Conv1D"):
        resolve_modules(llama64, [name])


def test_duplicate_module_rejected(llama64):
    with pytest.raises(ModuleResolutionError, match="named twice"):
        resolve_modules(llama64, ["model.layers.{0..1}.mlp.down_proj", "model.layers.1.mlp.down_proj"])


# ------------------------------------------------------------------------------ layout

def test_weight_shape_linear_and_conv1d(llama64, gpt2_64):
    assert weight_shape(llama64.model.layers[0].mlp.down_proj) == (64, 32)
    assert weight_shape(llama64.model.layers[0].mlp.gate_proj) == (32, 64)
    assert weight_shape(gpt2_64.transformer.h[0].mlp.c_proj) == (128, 32)
    assert weight_shape(gpt2_64.transformer.h[0].mlp.c_fc) == (32, 128)
    for module in (llama64.model.layers[0].mlp.down_proj, gpt2_64.transformer.h[0].mlp.c_proj):
        assert tuple(weight_in_out(module).shape) == weight_shape(module)
    with pytest.raises(TypeError):
        weight_shape(llama64.model.norm)


def test_add_then_subtract_restores_exactly(model_and_patterns):
    model, patterns = model_and_patterns
    mods = resolve_modules(model, patterns)
    before = snapshot_weights(mods)
    gen = torch.Generator().manual_seed(1)
    # Dyadic weights and shifts: every sum is exact in float64, so revert must be bit-exact.
    with torch.no_grad():
        for m in mods.values():
            m.weight.copy_(torch.round(m.weight * 2**12) / 2**12)
    dyadic = snapshot_weights(mods)
    deltas = {n: torch.randint(-64, 64, weight_shape(m), generator=gen).double() / 2**10
              for n, m in mods.items()}
    for n, m in mods.items():
        applied = add_shift(m, deltas[n])
        assert torch.equal(applied, deltas[n])
        assert not torch.equal(m.weight, dyadic[n])
    for n, m in mods.items():
        add_shift(m, deltas[n], sign=-1)
        assert torch.equal(m.weight, dyadic[n])
    # Arbitrary float64 shifts revert to within rounding.
    for n, m in mods.items():
        d = torch.randn(weight_shape(m), generator=gen, dtype=torch.float64) * 0.01
        add_shift(m, d)
        add_shift(m, d, sign=-1)
        torch.testing.assert_close(m.weight.detach(), dyadic[n], rtol=0, atol=1e-15)
    restore_weights(mods, before)
    for n, m in mods.items():
        assert torch.equal(m.weight, before[n])


def test_add_shift_rejects_wrong_shape(llama64):
    m = llama64.model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="expected \\(d_in, d_out\\)"):
        add_shift(m, torch.zeros(32, 64, dtype=torch.float64))  # (out, in): the wrong layout


def test_add_shift_casts_to_weight_dtype(llama_tok):
    model = make_tiny_llama(llama_tok, seed=0, dtype=torch.bfloat16)
    m = model.model.layers[0].mlp.down_proj
    delta = torch.full(weight_shape(m), 1e-3 + 1e-7, dtype=torch.float32)
    applied = add_shift(m, delta)
    assert applied.dtype == torch.bfloat16
    assert torch.equal(applied, delta.to(torch.bfloat16))


def test_shift_layout_single_entry(model_and_patterns):
    model, patterns = model_and_patterns
    module = next(iter(resolve_modules(model, patterns).values()))
    d_in, d_out = weight_shape(module)
    i, j = 3, 5
    delta = torch.zeros(d_in, d_out, dtype=torch.float64)
    delta[i, j] = 0.75
    x = torch.zeros(2, d_in, dtype=torch.float64)
    x[0, i] = 1.0        # row 0: input feature i only
    x[1, i + 1] = 1.0    # row 1: a different input feature
    # the (in, out) entry read from the module's own layout: nn.Linear stores (out, in), Conv1D (in, out)
    native = (lambda: module.weight.detach()[j, i]) if isinstance(module, torch.nn.Linear) \
        else (lambda: module.weight.detach()[i, j])
    before = float(native())
    with torch.no_grad():
        y0 = module(x)
        add_shift(module, delta)
        y1 = module(x)
    expected = torch.zeros_like(y0)
    expected[0, j] = 0.75
    torch.testing.assert_close(y1 - y0, expected, rtol=0, atol=1e-12)
    # weight_in_out reads in (in, out): its [i, j] is the shifted native entry, not its transpose's
    view = weight_in_out(module)
    assert float(view[i, j]) == float(native()) == before + 0.75
    assert tuple(view.shape) == (d_in, d_out)
    # and it is a view: writing into it changes the weight
    with torch.no_grad():
        view[i, j] = -2.5
    assert float(native()) == -2.5


def test_grad_in_out_layout(model_and_patterns):
    model, patterns = model_and_patterns
    module = next(iter(resolve_modules(model, patterns).values()))
    d_in, d_out = weight_shape(module)
    module.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no .grad"):
        grad_in_out(module)
    zeros = grad_in_out(module, if_none="zeros")
    assert tuple(zeros.shape) == (d_in, d_out) and not zeros.any()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, d_in, generator=gen, dtype=torch.float64)
    gy = torch.randn(4, d_out, generator=gen, dtype=torch.float64)
    (module(x) * gy).sum().backward()
    torch.testing.assert_close(grad_in_out(module), x.T @ gy)


# ------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_save_tiny_model_load_round_trip(tmp_path, style):
    yaml_path = save_tiny_model(tmp_path / style, style=style, seed=3)
    cfg = ModelConfig.from_yaml(yaml_path)
    assert Path(cfg.name_or_path) == (tmp_path / style).resolve()
    model, tok = load_model(cfg)
    assert not model.training and model.dtype == torch.float32

    edited = resolve_modules(model, cfg.edit_modules)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in edited} and len(trainable) == 2

    ref_tok = make_tokenizer(style)
    text = "The capital of France is Paris."
    ids = tok(text).input_ids
    assert ids == ref_tok(text).input_ids
    assert (ids[0] == tok.bos_token_id) == (style == "llama")
    build = make_tiny_llama if style == "llama" else make_tiny_gpt2
    ref = build(ref_tok, seed=3)
    batch = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, ref(batch).logits, rtol=0, atol=0)


class _FakeAuto:
    """Stand-in for AutoModelForCausalLM/AutoTokenizer that returns a prebuilt object for GGUF loads."""

    def __init__(self, obj):
        self.obj, self.calls = obj, []

    def from_pretrained(self, path, **kwargs):
        self.calls.append((Path(path), kwargs))
        return self.obj


def test_materialize_then_load(tmp_path, monkeypatch, llama_tok):
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "models" / "tiny-mat"
    cfg = ModelConfig(name="tiny-mat", name_or_path=str(out), edit_modules=tuple(LLAMA_EDIT),
                      materialize={"from": "fake_gguf_pkg", "gguf_file": "m.gguf"})

    with pytest.raises(ModelNotMaterializedError, match="python -m emsedit materialize --model tiny-mat"):
        load_model(cfg)

    src = make_tiny_llama(llama_tok, seed=5)
    src.hf_quantizer = object()  # what a GGUF load leaves behind
    fake_model, fake_tok = _FakeAuto(src), _FakeAuto(llama_tok)
    with monkeypatch.context() as m:
        m.setattr("emsedit.models.AutoModelForCausalLM", fake_model)
        m.setattr("emsedit.models.AutoTokenizer", fake_tok)
        assert materialize_model(cfg) == out.resolve()
        with pytest.raises(FileExistsError):
            materialize_model(cfg)
    assert fake_model.calls[0] == (pkg, {"gguf_file": "m.gguf", "dtype": torch.float32})
    assert fake_tok.calls[0] == (pkg, {"gguf_file": "m.gguf"})
    assert src.hf_quantizer is None
    assert (out / "model.safetensors").is_file() and (out / "materialized.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert out.stat().st_mode & 0o055  # not left private (mkdtemp's 0700)

    model, tok = load_model(cfg)
    ids = torch.tensor([tok("Berlin is a city").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=0, atol=0)


def test_resolve_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = ModelConfig(name="x", name_or_path="EleutherAI/gpt-j-6B", edit_modules=("a",))
    assert resolve_name_or_path(hub) == "EleutherAI/gpt-j-6B"
    (tmp_path / "local" / "m").mkdir(parents=True)
    local = ModelConfig(name="x", name_or_path="local/m", edit_modules=("a",))
    assert resolve_name_or_path(local) == str((tmp_path / "local" / "m").resolve())
    smol = ModelConfig.from_yaml(find_model_config("smollm2-135m"))
    assert resolve_name_or_path(smol) == str(REPO_ROOT / "resources" / "models" / "smollm2-135m")


# ------------------------------------------------------------------------------ configs

def test_yaml_dataclass_rejects_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: m\nname_or_path: gpt2\nedit_module: [a]\n")
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "'edit_module'" in msg and "did you mean 'edit_modules'" in msg
    with pytest.raises(ConfigError, match="<dict>: unknown key 'colour'"):
        load_yaml_dataclass(ModelConfig, {"name": "m", "name_or_path": "g", "edit_modules": ["a"],
                                          "colour": 1})


def test_yaml_dataclass_value_errors_name_the_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: m\nname_or_path: gpt2\n")
    with pytest.raises(ConfigError, match="missing required key 'edit_modules'"):
        ModelConfig.from_yaml(path)
    path.write_text("name: m\nname_or_path: gpt2\nedit_modules: [a]\ndtype: fp8\n")
    with pytest.raises(ConfigError, match=f"{path}.*'dtype' must be one of"):
        ModelConfig.from_yaml(path)
    path.write_text("name: m\nname_or_path: gpt2\nedit_modules: [a]\n"
                    "materialize: {from: p, gguf: x}\n")
    with pytest.raises(ConfigError, match="unknown key 'gguf' in 'materialize'"):
        ModelConfig.from_yaml(path)


EXPECTED_MODULE_COUNTS = {
    "smollm2-135m": 6, "gptj": 6, "gptj_seq": 9, "llama-3-instruct": 12,
    "gemma-2": 18, "gemma-2-batch": 9, "gpt2-xl": 6,
}


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "config" / "models").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_model_config_parses(path):
    cfg = ModelConfig.from_yaml(path)
    assert cfg.name == path.stem
    names = [n for p in cfg.edit_modules for n in expand_pattern(p)]
    assert len(names) == len(set(names))
    if path.stem in EXPECTED_MODULE_COUNTS:
        assert len(names) == EXPECTED_MODULE_COUNTS[path.stem]
    assert cfg.trust_remote_code is False
    assert load_yaml_dataclass(ModelConfig, cfg.to_dict()) == cfg


def test_find_model_config(tmp_path, monkeypatch):
    assert find_model_config("gptj") == REPO_ROOT / "config" / "models" / "gptj.yaml"
    with pytest.raises(ConfigError, match="did you mean 'gptj'"):
        find_model_config("gpj")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text("name: mine\nname_or_path: gpt2\nedit_modules: [a]\n")
    assert find_model_config("mine", config_dir=tmp_path) == tmp_path / "models" / "mine.yaml"
    monkeypatch.setenv("EMSEDIT_CONFIG_DIR", str(tmp_path))
    assert find_model_config("mine") == tmp_path / "models" / "mine.yaml"
    assert find_model_config(tmp_path / "models" / "mine.yaml").is_file()


# ------------------------------------------------------------------------------ tiny builders

def test_tokenizer_is_deterministic(llama_tok, gpt2_tok):
    text = "The capital of France is Paris."
    assert llama_tok(text).input_ids == [0, 267, 313, 268, 377, 488, 264, 458, 15]
    assert gpt2_tok(text).input_ids == [266, 312, 267, 376, 487, 263, 457, 14]
    assert make_tokenizer("llama").get_vocab() == llama_tok.get_vocab()
    odd = " Zürich, 日本 & naïve?"
    assert gpt2_tok.decode(gpt2_tok(odd).input_ids) == odd
    assert llama_tok.pad_token == llama_tok.eos_token and gpt2_tok.pad_token is None


def test_tiny_models_are_seeded_and_leave_global_rng(llama_tok):
    state = torch.random.get_rng_state()
    a = make_tiny_llama(llama_tok, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = make_tiny_llama(llama_tok, seed=7)
    c = make_tiny_llama(llama_tok, seed=8)
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert isinstance(a.model.layers[0].mlp.down_proj, nn.Linear)


def test_cli_tiny_model(tmp_path, capsys):
    from emsedit.cli import main

    assert main(["tiny-model", "--out", str(tmp_path / "g"), "--style", "gpt2"]) == 0
    yaml_path = Path(capsys.readouterr().out.strip())
    cfg = ModelConfig.from_yaml(yaml_path)
    assert cfg.name == "tiny-gpt2" and cfg.edit_modules == tuple(GPT2_EDIT)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
