"""Evaluation beyond teacher forcing (issue 12): answer normalisation, the batched KV-cache greedy
decoder against a plain step-by-step argmax loop, generated and teacher-forced locality against the
unedited model, portability, the record layout and its schema, and the one-line user errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from emsedit import cli, protocols
from emsedit.batching import make_turn
from emsedit.data import DataError, EditRequest
from emsedit.evaluation import EvalSettings, build_probes, evaluate_views, parse_metric_views
from emsedit.generation import (
    answer_finished,
    contains,
    cut_answer,
    exact_match,
    generate_answers,
    greedy_generate,
    normalize_answer,
    prompt_token_ids,
    stop_token_ids,
)
from emsedit.config import ConfigError
from emsedit.prefix_cache import PrefixCachedModel
from emsedit.records import validate_record
from emsedit.schemas import read_requests
from emsedit.tiny import make_tiny_gpt2, make_tiny_llama, make_tokenizer, save_tiny_model

torch.set_num_threads(1)

PROMPTS = ["The capital of France is", "Who is the author of Hamlet? The author is", "red",
           "The mother tongue of Danielle Darrieux is a", "What country is Mount Fuji in?"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    tok = make_tokenizer(request.param)
    build = make_tiny_llama if request.param == "llama" else make_tiny_gpt2
    return build(tok, seed=1), tok


def naive_greedy(model, ids, limit, stop_ids=(), finished=None):
    """A plain argmax loop: one full forward per new token, no cache, no padding, no batch."""
    seq, new = list(ids), []
    with torch.inference_mode():
        while len(new) < limit:
            token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token in stop_ids:
                break
            new.append(token)
            seq.append(token)
            if finished is not None and finished(new):
                break
    return new


def cf_request(i: int, n_loc: int = 1) -> EditRequest:
    return EditRequest(index=i, prompt=f"The capital of item {i} is", target="Paris", old_target="Rome",
                       rephrases=(f"Item {i} has the capital",),
                       loc_prompts=tuple(f"The language{' spoken' * k} in thing {i} is" for k in range(n_loc)),
                       loc_answer="French", loc_old_answer="Paris")


def zsre_request(i: int, portability: bool = True) -> EditRequest:
    return EditRequest(index=i, prompt=f"What is the capital of item {i}?", target="Berlin", old_target=None,
                       rephrases=(f"Which city is the capital of item {i}?",),
                       loc_prompts=(f"nq question: who wrote book {i}?",), loc_answer="William Shakespeare",
                       loc_old_answer=None,
                       portability=((f"What language is spoken in the capital of item {i}?", "German"),)
                       if portability else ())


# ------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  A  cat's   hat. ", "cats hat"),
    ("Jean-Paul Sartre", "jeanpaul sartre"),
    ("an Apple, the «pear»", "apple pear"),
    ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("\n", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_contains():
    assert exact_match("The Beatles.", "beatles") and not exact_match("Beatles band", "Beatles")
    assert contains("It is Paris, France", "paris") and contains("Paris", "Paris")
    assert not contains("Parisian food", "Paris")  # whole words only
    assert not contains("anything at all", "The")  # nothing left of the gold answer
    assert contains("the United States of America", "United States")


@pytest.mark.parametrize("text,answer,finished", [
    ("  Paris. It is big", "Paris.", True),
    ("\n\nParis\nand more", "Paris", True),
    ("3.5 million", "3.5 million", False),
    ("Paris.", "Paris.", False),  # a sentence end is seen once white space follows
    ("\n  ", "", False),
    ("Who? Me", "Who?", True),
])
def test_answer_cut_and_stop(text, answer, finished):
    assert cut_answer(text) == answer
    assert answer_finished(text) is finished


def test_metric_view_names():
    assert parse_metric_views("generated, teacher_forced") == ("teacher_forced", "generated")
    assert parse_metric_views(["teacher_forced"]) == ("teacher_forced",)
    with pytest.raises(ConfigError, match="unknown metric view"):
        parse_metric_views("teacher_forced,sampled")
    with pytest.raises(ConfigError, match="must include teacher_forced"):
        parse_metric_views("generated")
    with pytest.raises(ConfigError, match="prompt format"):
        EvalSettings(prompt_format="instruct")
    with pytest.raises(ConfigError, match="margin"):
        EvalSettings(margin=-1)


# ------------------------------------------------------------------------------------ greedy decoding
def test_batched_cached_decoder_equals_a_plain_argmax_loop(tiny):
    model, tok = tiny
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    limits = [7, 3, 9, 1, 5]
    want = [naive_greedy(model, p, n) for p, n in zip(ids, limits)]
    with torch.inference_mode():
        got = greedy_generate(model, ids, limits, stop_ids=set(), pad_id=0, batch_rows=3)
    assert got == want
    # the prefix cache wrapper is bypassed (it serves teacher-forced mini-batches only)
    wrapped = PrefixCachedModel(model, ["model.layers.1.mlp.down_proj" if hasattr(model, "model")
                                        else "transformer.h.1.mlp.c_proj"])
    with torch.inference_mode():
        assert greedy_generate(wrapped, ids, limits, stop_ids=set(), pad_id=0) == want
    assert wrapped.hits == 0 and not wrapped.export()


def test_stops_and_answers_match_the_plain_loop(tiny):
    model, tok = tiny
    stops = stop_token_ids(model, tok)
    assert tok.eos_token_id in stops
    golds = ["Paris", "William Shakespeare", "blue", "French", "Japan"]
    margin = 2

    def finished(new):
        return answer_finished(tok.decode(new, skip_special_tokens=True))

    want = []
    for p, g in zip(PROMPTS, golds):
        limit = len(tok(" " + g, add_special_tokens=False)["input_ids"]) + margin
        new = naive_greedy(model, tok(p)["input_ids"], limit, stops, finished)
        want.append(cut_answer(tok.decode(new, skip_special_tokens=True)))
    with torch.inference_mode():
        assert generate_answers(model, tok, PROMPTS, golds, margin=margin) == want
    # an end-of-sequence token stops a row and is not part of its answer
    first = naive_greedy(model, tok(PROMPTS[0])["input_ids"], 1)[0]
    with torch.inference_mode():
        assert greedy_generate(model, [tok(PROMPTS[0])["input_ids"]], [5], stop_ids={first}) == [[]]


def test_generated_scores_are_what_the_answers_give():
    """Request 0's target is the model's own greedy answer: efficacy exact match 100 for it, and every
    per-request score is exact match / contains of the independently decoded answer."""
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=1)
    stops = stop_token_ids(model, tok)

    def finished(new):
        return answer_finished(tok.decode(new, skip_special_tokens=True))

    def answer(prompt, limit):
        return cut_answer(tok.decode(naive_greedy(model, tok(prompt)["input_ids"], limit, stops, finished),
                                     skip_special_tokens=True))

    requests = [zsre_request(i) for i in range(3)]
    # a decoding length whose answer, taken as the gold answer, gets the same length back
    for limit in range(2, 12):
        own = answer(requests[0].prompt, limit)
        margin = limit - len(tok(" " + own, add_special_tokens=False)["input_ids"])
        if margin >= 0 and normalize_answer(own):
            break
    assert margin >= 0 and normalize_answer(own)
    requests[0] = EditRequest(**{**requests[0].__dict__, "target": own})
    turns = [make_turn(requests, tok, split="eval")]
    settings = EvalSettings(margin=margin)
    metrics = evaluate_views(model, tok, turns, build_probes(turns, tok), "zsre", settings=settings, progress=False)
    gen = metrics["generated"]
    assert gen["efficacy"]["per_request"]["exact_match"][0] == 100.0
    for name, prompts in (("efficacy", lambda r: [(r.prompt, r.target)]),
                          ("generalization", lambda r: [(q, r.target) for q in r.rephrases]),
                          ("portability", lambda r: list(r.portability)),
                          ("specificity", lambda r: [(q, r.loc_answer) for q in r.loc_prompts])):
        for i, r in enumerate(requests):
            (q, gold), = prompts(r)
            got = answer(q, len(tok(" " + gold, add_special_tokens=False)["input_ids"]) + margin)
            assert gen[name]["per_request"]["exact_match"][i] == 100.0 * exact_match(got, gold)
            assert gen[name]["per_request"]["contains"][i] == 100.0 * contains(got, gold)
        assert gen[name]["count"] == 3


def test_chat_prompt_format():
    tok = make_tokenizer("llama")
    with pytest.raises(ConfigError, match="chat template"):
        prompt_token_ids(tok, ["Hi"], "chat")
    tok.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}assistant:"
    ids = prompt_token_ids(tok, ["The capital of France is"], "chat")[0]
    assert ids == tok("<s>user: The capital of France is\nassistant:", add_special_tokens=False)["input_ids"]
    assert prompt_token_ids(tok, ["red"], "plain")[0] == tok("red")["input_ids"]


# ------------------------------------------------------------------------------------ locality and portability
@pytest.mark.parametrize("kind", ["zsre", "counterfact"])
@pytest.mark.parametrize("cached", [False, True])
def test_unedited_locality_is_100_against_itself(kind, cached):
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=2)
    if cached:
        model = PrefixCachedModel(model, ["model.layers.1.mlp.down_proj"])
    requests = [zsre_request(i) for i in range(6)] if kind == "zsre" else [cf_request(i, n_loc=1 + i % 3) for i in range(6)]
    turns = [make_turn(requests[:3], tok, split="eval"), make_turn(requests[3:], tok, split="eval")]
    probes = build_probes(turns, tok)
    pre = evaluate_views(model, tok, turns, probes, kind, progress=False)
    post = evaluate_views(model, tok, turns, probes, kind, reference=pre["locality_reference"], progress=False)
    n_loc = sum(len(r.loc_prompts) for r in requests)
    for metrics in (pre, post):
        assert metrics["locality"]["score"] == 100.0 and metrics["locality"]["count"] == n_loc
        assert metrics["locality"]["per_request"] == [100.0] * 6
        assert metrics["generated"]["locality"]["score"] == 100.0
        assert metrics["generated"]["locality"]["per_request"] == [100.0] * 6
    assert "locality_reference" not in post
    for key in ("efficacy", "generalization", "specificity", "portability", "generated"):
        assert post[key] == pre[key]
    ref = pre["locality_reference"]
    assert [len(r) for r in ref["teacher_forced"]] == [len(r.loc_prompts) for r in requests]
    assert [len(r) for r in ref["generated"]] == [len(r.loc_prompts) for r in requests]

    # a changed model moves both locality views below 100
    inner = model.model if cached else model
    with torch.no_grad():
        inner.lm_head.weight.copy_(torch.randn_like(inner.lm_head.weight))
    changed = evaluate_views(model, tok, turns, probes, kind, reference=ref, progress=False)
    assert changed["locality"]["score"] < 100.0 and changed["generated"]["locality"]["score"] < 100.0


def test_teacher_forced_portability_and_missing_portability():
    tok = make_tokenizer("llama")
    model = make_tiny_llama(tok, seed=3)
    requests = [zsre_request(i, portability=i % 2 == 0) for i in range(4)]
    turns = [make_turn(requests, tok, split="eval")]
    metrics = evaluate_views(model, tok, turns, build_probes(turns, tok), "zsre",
                             settings=EvalSettings(views=("teacher_forced",)), progress=False)
    port = metrics["portability"]
    assert port["count"] == 2 and port["protocol"] == "teacher_forced"
    assert port["per_request"][1] is None and port["per_request"][3] is None
    # the same tuples scored by the official zsRE rule, one request per turn
    for i in (0, 2):
        q, a = requests[i].portability[0]
        alone = EditRequest(**{**requests[i].__dict__, "prompt": q, "target": a, "portability": ()})
        one = evaluate_views(model, tok, [make_turn([alone], tok, split="eval")],
                             build_probes([make_turn([alone], tok, split="eval")], tok), "zsre",
                             settings=EvalSettings(views=("teacher_forced",)), progress=False)
        assert port["per_request"][i] == pytest.approx(one["efficacy"], abs=1e-9)
    assert "generated" not in metrics and "generated" not in metrics["locality_reference"]

    none = [zsre_request(i, portability=False) for i in range(3)]
    turns = [make_turn(none, tok, split="eval")]
    metrics = evaluate_views(model, tok, turns, build_probes(turns, tok), "zsre", progress=False)
    assert metrics["portability"] == {"score": None, "count": 0, "per_request": [None] * 3,
                                      "protocol": "teacher_forced", "scorer": "new_answer"}
    assert metrics["generated"]["portability"]["count"] == 0
    assert metrics["generated"]["portability"]["exact_match"] is None


def test_turn_sources_map_rows_to_tuples():
    tok = make_tokenizer("llama")
    requests = [cf_request(i, n_loc=1 + i % 3) for i in range(5)]
    turn = make_turn(requests, tok, split="eval", lm_batch_size=2)
    flat = {"edit": [r.prompt for r in requests], "equiv": [q for r in requests for q in r.rephrases],
            "unrel": [q for r in requests for q in r.loc_prompts]}
    for kind, prompts in flat.items():
        rows = [row for b in getattr(turn, kind) for row, m in zip(b.input_ids, b.attention_mask)
                for row in [row[m.bool()]]]
        assert sorted(turn.sources[kind]) == list(range(len(prompts)))
        for row, src in zip(rows, turn.sources[kind]):
            assert tok.decode(row, skip_special_tokens=True).startswith(prompts[src])


def test_portability_field_is_read(tmp_path):
    base = {"src": "What is X?", "alt": "Y", "answers": ["Z"], "rephrase": "X is?", "loc": "nq question: q",
            "loc_ans": "a"}
    records = [
        {**base, "portability": {"Recalled Relation": "r", "New Question": "Q1?", "New Answer": "A1"}},
        {**base, "portability": [{"New Question": "Q2?", "New Answer": "A2"}, {"New Question": "Q3?", "New Answer": "A3"}]},
        base,
        {**base, "portability": None},
    ]
    path = tmp_path / "z.json"
    path.write_text(json.dumps(records))
    got = [r.portability for r in read_requests(path, "zsre")]
    assert got == [(("Q1?", "A1"),), (("Q2?", "A2"), ("Q3?", "A3")), (), ()]
    path.write_text(json.dumps([{**base, "portability": {"New Question": "Q?"}}]))
    with pytest.raises(DataError, match=r"record 0: field 'portability.New Answer'"):
        read_requests(path, "zsre")


# ------------------------------------------------------------------------------------ records and CLI
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    model_yaml = save_tiny_model(root / "tiny", style="llama", seed=0)
    subjects = ["France", "Germany", "Italy", "Spain", "Japan", "England", "Russia", "China"]
    data = root / "data"
    data.mkdir()

    def dataset(name, portability):
        recs = [{"src": f"The capital of {s}", "alt": "Paris", "answers": ["x"],
                 "rephrase": f"What is the capital of {s}", "loc": f"The language spoken in {s}", "loc_ans": "French",
                 **({"portability": {"Recalled Relation": "r", "New Question": f"The currency of {s} is",
                                     "New Answer": "the yen"}} if portability else {})}
                for s in subjects * 2]
        files = {}
        for split in ("train", "eval"):
            path = data / f"{name}_{split}.json"
            path.write_text(json.dumps(recs))
            files[split] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "url": None}
        out = root / f"{name}.yaml"
        out.write_text(yaml.safe_dump({"name": name, "kind": "zsre", **files}))
        return str(out)

    return {"root": root, "model": str(model_yaml), "port": dataset("port", True),
            "plain": dataset("plain", False), "data": str(data)}


def _cli(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in args])
    return status, err.getvalue()


def _common(env, dataset="port"):
    return ["--model", env["model"], "--dataset", env[dataset], "--data-dir", env["data"], "--seed", "0",
            "--threads", "1"]


def _run(env, out, *extra, dataset="port"):
    return ["run", *_common(env, dataset), "--editor", "emsedit", "--turns", "2", "--edits", "4",
            "--train-turns", "1", "--set", "rank=8", "--set", "lr=100", "--out", out, *extra]


def test_records_validate_and_carry_the_views(env):
    root = env["root"]
    status, err = _cli("evaluate", *_common(env), "--n", "8", "--edits", "4", "--out", root / "pre.json")
    assert status == 0, err
    pre = json.loads((root / "pre.json").read_text())
    validate_record(pre)
    assert pre["config"]["eval_metrics"] == {"views": ["teacher_forced", "generated"], "prompt_format": "plain",
                                             "generation_margin": 5}
    metrics = pre["metrics"]["pre"]
    assert metrics["portability"]["count"] == 8 and len(metrics["portability"]["per_request"]) == 8
    assert metrics["locality"]["score"] == 100.0 and metrics["generated"]["locality"]["score"] == 100.0
    assert len(metrics["locality_reference"]["generated"]) == 8
    assert "generate_pre" in pre["timings"]

    status, err = _cli(*_run(env, root / "run.json", "--pre", root / "pre.json"))
    assert status == 0, err
    run = json.loads((root / "run.json").read_text())
    validate_record(run)
    assert run["metrics"]["pre"] == metrics
    post = run["metrics"]["post"]
    assert "locality_reference" not in post and post["generated"]["protocol"] == "generated"
    for block in (post["portability"], post["locality"], post["generated"]["locality"]):
        assert len(block["per_request"]) == 8 and block["count"] == 8
    # computing the unedited scores in the run gives the same record as reusing them
    status, err = _cli(*_run(env, root / "run_own.json"))
    assert status == 0, err
    own = json.loads((root / "run_own.json").read_text())
    assert own["metrics"] == run["metrics"]



def test_a_pre_record_of_other_views_is_refused_before_the_model_loads(env, monkeypatch):
    root = env["root"]
    pre = root / "pre_views.json"
    status, err = _cli("evaluate", *_common(env), "--n", "8", "--edits", "4", "--metrics", "teacher_forced",
                       "--out", pre)
    assert status == 0, err

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(protocols, "load_model", never)
    for extra in ((), ("--metrics", "teacher_forced", "--generation-margin", "3")):
        status, err = _cli(*_run(env, root / "never.json", "--pre", pre, *extra))
        assert status == 2 and err.strip().count("\n") == 0 and "metric views" in err, err
        assert not (root / "never.json").exists()


def test_teacher_forced_only_and_no_portability(env):
    root = env["root"]
    out = root / "tf.json"
    status, err = _cli("evaluate", *_common(env, "plain"), "--n", "8", "--edits", "4", "--metrics",
                       "teacher_forced", "--out", out)
    assert status == 0, err
    record = json.loads(out.read_text())
    validate_record(record)
    pre = record["metrics"]["pre"]
    assert "generated" not in pre and "generate_pre" not in record["timings"]
    assert pre["portability"]["count"] == 0 and pre["portability"]["score"] is None
    assert pre["locality"]["score"] == 100.0


def test_bad_metric_view_or_prompt_format_is_one_line_before_the_model_loads(env, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(protocols, "load_model", never)
    root = env["root"]
    bad_model = root / "bad-format.yaml"
    bad_model.write_text(yaml.safe_dump({**yaml.safe_load(Path(env["model"]).read_text()), "prompt_format": "instruct"}))
    cases = [
        ["evaluate", *_common(env), "--n", "8", "--metrics", "teacher_forced,sampled", "--out", root / "x.json"],
        ["evaluate", *_common(env), "--n", "8", "--metrics", "generated", "--out", root / "x.json"],
        ["evaluate", *_common(env), "--n", "8", "--generation-margin", "-2", "--out", root / "x.json"],
        _run(env, root / "x.json", "--metrics", "tf"),
        ["evaluate", *[bad_model if a == env["model"] else a for a in _common(env)], "--n", "8", "--out", root / "x.json"],
    ]
    for args in cases:
        status, err = _cli(*args)
        assert status == 2, err
        assert "Traceback" not in err and err.strip().count("\n") == 0, err
        assert not (root / "x.json").exists()
    assert "prompt_format" in err and "instruct" in err
