"""Tests for spec §8 metrics on hand-made logits (emsedit.metrics)."""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence

import pytest
import torch

from emsedit.batching import make_turn
from emsedit.data import EditRequest, MiniBatch
from emsedit.metrics import (
    CORRECTED_QUIRKS,
    OFFICIAL_QUIRKS,
    MetricQuirks,
    answer_argmax,
    evaluate_turns,
    score_batch,
    summarize,
)
from tokenizers_for_tests import gpt2_style_tokenizer

torch.set_num_threads(1)

V = 8  # vocabulary size of the hand-made logits
FILL = -10.0


def cf_batch(rows: Sequence[tuple[int, list[int], list[int]]], old_pad: int) -> MiniBatch:
    """Build a right-padded CounterFact batch from (prompt length, answer A, answer B) rows.

    Prompt tokens are id 1; labels = [-100]*(P-1) ⧺ A, old_labels = [-100]*(P-1) ⧺ B, each matrix
    padded to its own widest row (spec §4.2).
    """
    width_a = max(p + len(a) - 1 for p, a, _ in rows)
    width_b = max(p + len(b) - 1 for p, _, b in rows)
    n = len(rows)
    input_ids = torch.zeros((n, width_a), dtype=torch.long)
    mask = torch.zeros((n, width_a), dtype=torch.long)
    labels = torch.full((n, width_a), -100, dtype=torch.long)
    old = torch.full((n, width_b), old_pad, dtype=torch.long)
    for r, (p, a, b) in enumerate(rows):
        ids = [1] * p + a[:-1]
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        lab = [-100] * (p - 1) + a
        labels[r, : len(lab)] = torch.tensor(lab)
        olab = [-100] * (p - 1) + b
        old[r, : len(olab)] = torch.tensor(olab)
    return MiniBatch(input_ids, mask, labels, old, old_pad)


def logits_for(batch: MiniBatch, values: dict[tuple[int, int, int], float]) -> torch.Tensor:
    """Logits of the batch's shape, FILL everywhere except the given (row, position, token) values."""
    out = torch.full((*batch.labels.shape, V), FILL)
    for (r, t, v), x in values.items():
        out[r, t, v] = x
    return out


def all_quirks() -> list[MetricQuirks]:
    return [MetricQuirks(p, t) for p in (True, False) for t in (True, False)]


def needs_minus100(q: MetricQuirks) -> bool:
    return not q.cf_oldlabel_pad_zero


# ----- zsRE ---------------------------------------------------------------------------------------


def test_zsre_token_accuracy() -> None:
    labels = torch.tensor([[-100, 2, 3], [-100, -100, 4], [-100, -100, -100]])
    batch = MiniBatch(torch.zeros_like(labels), torch.ones_like(labels), labels)
    logits = torch.full((3, 3, V), FILL)
    logits[0, 1, 2] = 1.0  # correct
    logits[0, 2, 1] = 1.0  # wrong (label 3)
    logits[1, 2, 4] = 1.0  # correct
    logits[1, 1, 7] = 5.0  # position not scored: irrelevant
    # the third row has no scored position: skipped, not counted
    assert score_batch(logits, batch, "zsre") == [0.5, 1.0]
    ids = torch.where(labels != -100, logits.argmax(-1), -1)  # argmax ids, as evaluate_turns passes them
    assert score_batch(ids, batch, "zsre") == [0.5, 1.0]
    assert answer_argmax(ids, labels) == answer_argmax(logits, labels) == [[2, 1], [4], []]
    with pytest.raises(ValueError, match="do not fit"):  # CounterFact needs the logits themselves
        score_batch(ids, dataclasses.replace(batch, old_labels=labels), "counterfact")


def test_zsre_ignores_old_labels_and_quirks() -> None:
    batch = cf_batch([(2, [3, 4], [6])], old_pad=0)
    logits = logits_for(batch, {(0, 1, 3): 1.0, (0, 2, 4): 1.0})
    for q in all_quirks():
        assert score_batch(logits, batch, "zsre", quirks=q) == [1.0]


# ----- CounterFact --------------------------------------------------------------------------------


def test_cf_pad_zero_quirk_flips_result() -> None:
    """B shorter than A inside a batch whose old_labels matrix is wide: positions past B's end."""
    rows = [(2, [3, 4, 5], [6]), (2, [3], [6, 7, 2])]
    values = {
        (0, 1, 3): 1.0, (0, 1, 6): 0.0,  # A_0 beats B_0
        (0, 2, 4): 1.0, (0, 2, 0): 2.0,  # past B's end: A_1 loses against token 0
        (0, 3, 5): 1.0, (0, 3, 0): 0.0,  # past B's end: A_2 beats token 0
        (1, 1, 3): 1.0, (1, 1, 6): 0.0,
    }
    for pad in (0, -100):  # the official result does not depend on how old_labels were padded
        batch = cf_batch(rows, pad)
        for trunc in (True, False):  # equal widths: truncation does not matter here
            got = score_batch(logits_for(batch, values), batch, "counterfact", quirks=MetricQuirks(True, trunc))
            assert got == pytest.approx([2 / 3, 1.0])
    batch = cf_batch(rows, -100)
    for trunc in (True, False):
        got = score_batch(logits_for(batch, values), batch, "counterfact", quirks=MetricQuirks(False, trunc))
        assert got == pytest.approx([1.0, 1.0])


def test_cf_minibatch_truncation_quirk_flips_result() -> None:
    """A longer than B in every row: the labels matrix is wider than old_labels."""
    rows = [(2, [3, 4, 5], [6]), (3, [3], [6])]  # widths: labels 4, old_labels 3
    values = {
        (0, 1, 3): 1.0, (0, 1, 6): 0.0,  # success
        (0, 2, 4): 1.0, (0, 2, 0): 2.0,  # fails against token 0
        (0, 3, 5): 1.0, (0, 3, 0): 2.0,  # fails against token 0; cut off by the truncation quirk
        (1, 2, 3): 1.0, (1, 2, 6): 0.0,
    }
    expected = {
        MetricQuirks(True, True): [1 / 2, 1.0],   # official: position 3 dropped from num and den
        MetricQuirks(True, False): [1 / 3, 1.0],  # no truncation, positions past B compare to id 0
        MetricQuirks(False, True): [1.0, 1.0],    # past B's end excluded
        MetricQuirks(False, False): [1.0, 1.0],
    }
    for q, want in expected.items():
        batch = cf_batch(rows, -100 if needs_minus100(q) else 0)
        assert score_batch(logits_for(batch, values), batch, "counterfact", quirks=q) == pytest.approx(want), q


def test_cf_truncation_alone_flips_a_single_row() -> None:
    batch = cf_batch([(2, [3, 4], [6])], old_pad=0)  # labels width 3, old_labels width 2
    logits = logits_for(batch, {(0, 1, 3): 0.0, (0, 1, 6): 1.0, (0, 2, 4): 1.0, (0, 2, 0): 0.0})
    assert score_batch(logits, batch, "counterfact", quirks=OFFICIAL_QUIRKS) == [0.0]
    assert score_batch(logits, batch, "counterfact", quirks=MetricQuirks(True, False)) == [0.5]


@pytest.mark.parametrize("b_wins", [True, False])
def test_cf_b_longer_than_a(b_wins: bool) -> None:
    """old_labels wider than labels: cut to the labels width; every variant agrees."""
    rows = [(2, [3], [6, 7]), (2, [4, 5], [6, 7, 2])]
    values = {
        (0, 1, 3): 1.0, (0, 1, 6): 2.0 if b_wins else 0.0,
        (1, 1, 4): 1.0, (1, 1, 6): 0.0,  # success
        (1, 2, 5): 1.0, (1, 2, 7): 2.0,  # B's second token, aligned from the answer start, wins
        (1, 2, 0): 9.0,                  # token 0 is not what is compared here
    }
    want = [0.0 if b_wins else 1.0, 0.5]
    for q in all_quirks():
        batch = cf_batch(rows, -100 if needs_minus100(q) else 0)
        assert score_batch(logits_for(batch, values), batch, "counterfact", quirks=q) == pytest.approx(want)


def test_cf_tie_is_a_failure() -> None:
    batch = cf_batch([(2, [3], [6])], old_pad=0)
    logits = logits_for(batch, {(0, 1, 3): 1.0, (0, 1, 6): 1.0})
    assert score_batch(logits, batch, "counterfact") == [0.0]


def test_cf_corrected_pad_needs_minus100_batches() -> None:
    batch = cf_batch([(2, [3, 4], [6])], old_pad=0)
    with pytest.raises(ValueError, match="old_label_pad=-100"):
        score_batch(logits_for(batch, {}), batch, "counterfact", quirks=CORRECTED_QUIRKS)


def test_cf_needs_old_labels_and_shapes_must_fit() -> None:
    labels = torch.tensor([[-100, 3]])
    batch = MiniBatch(torch.zeros_like(labels), torch.ones_like(labels), labels)
    with pytest.raises(ValueError, match="old_labels"):
        score_batch(torch.zeros(1, 2, V), batch, "counterfact")
    with pytest.raises(ValueError, match="do not fit"):
        score_batch(torch.zeros(1, 3, V), batch, "zsre")
    with pytest.raises(ValueError, match="kind"):
        score_batch(torch.zeros(1, 2, V), batch, "fever")  # type: ignore[arg-type]


# ----- aggregation ----------------------------------------------------------------------------------


def test_summarize_zsre() -> None:
    got = summarize([1.0, 0.5], [0.25], [0.0, 1.0, 0.5], "zsre", OFFICIAL_QUIRKS)
    assert got == {
        "efficacy": 75.0,
        "generalization": 25.0,
        "specificity": 50.0,
        "average": 50.0,
        "counts": {"efficacy": 2, "generalization": 1, "specificity": 3},
        "protocol": "teacher_forced_token_acc",
        "scorer": {
            "specificity": "gold_answer",
            "quirks": {"cf_oldlabel_pad_zero": True, "cf_minibatch_truncation": True},
        },
    }


def test_summarize_counterfact_and_empty() -> None:
    got = summarize([1.0], [], [0.5], "counterfact", CORRECTED_QUIRKS)
    assert got["protocol"] == "prob_new_gt_old"
    assert got["scorer"] == {
        "specificity": "true_vs_new",
        "quirks": {"cf_oldlabel_pad_zero": False, "cf_minibatch_truncation": False},
    }
    assert got["generalization"] == 0.0 and got["counts"]["generalization"] == 0
    assert got["average"] == pytest.approx(50.0)


def test_quirks_from_mapping() -> None:
    assert MetricQuirks.from_mapping(None) == OFFICIAL_QUIRKS
    assert MetricQuirks.from_mapping({"cf_oldlabel_pad_zero": False}) == MetricQuirks(False, True)
    with pytest.raises(ValueError, match="unknown metric quirk"):
        MetricQuirks.from_mapping({"cf_pad": False})
    with pytest.raises(ValueError, match="true or false"):
        MetricQuirks.from_mapping({"cf_minibatch_truncation": "no"})


# ----- evaluate_turns on a tiny model ---------------------------------------------------------------


def tiny_gpt2(vocab_size: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(cfg)


def cf_requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(
            index=i,
            prompt=f"The mother tongue of person {i} is",
            target="English" if i % 2 else "the piano",
            old_target="French",
            rephrases=(f"Person {i} speaks", f"Person {i} was born speaking"),
            loc_prompts=tuple(f"Neighbour {j} of {i} speaks" for j in range(3)),
            loc_answer="French",
            loc_old_answer="English" if i % 2 else "the piano",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("quirks,pad", [(OFFICIAL_QUIRKS, 0), (CORRECTED_QUIRKS, -100)])
def test_evaluate_turns_matches_batchwise_scores(quirks: MetricQuirks, pad: int) -> None:
    tok = gpt2_style_tokenizer()
    model = tiny_gpt2(len(tok))
    model.train()
    reqs = cf_requests(5)
    turns = [make_turn(reqs[:3], tok, split="eval", old_label_pad=pad),
             make_turn(reqs[3:], tok, split="eval", old_label_pad=pad)]
    got = evaluate_turns(model, turns, "counterfact", quirks, progress=False)
    assert model.training  # mode restored
    assert got["counts"] == {"efficacy": 5, "generalization": 10, "specificity": 15}
    model.eval()
    scores: dict[str, list[float]] = {"edit": [], "equiv": [], "unrel": []}
    with torch.no_grad():
        for turn in turns:
            for kind in scores:
                for b in getattr(turn, kind):
                    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                    scores[kind] += score_batch(logits, b, "counterfact", quirks=quirks)
    want = summarize(scores["edit"], scores["equiv"], scores["unrel"], "counterfact", quirks)
    numeric = ("efficacy", "generalization", "specificity", "average")
    assert {k: got[k] for k in numeric} == pytest.approx({k: want[k] for k in numeric})
    skip = (*numeric, "per_request")  # per-request scores: the test below
    assert {k: v for k, v in got.items() if k not in skip} == {k: v for k, v in want.items() if k not in skip}
    for key in numeric:
        assert 0.0 <= got[key] <= 100.0


@pytest.mark.parametrize("kind", ["counterfact", "zsre"])
def test_per_request_scores_are_each_requests_own(kind: str) -> None:
    """Every request's score equals that request evaluated alone (its own one-request turn), in edit
    order across turns; the aggregates are the means over the prompts behind them. (CounterFact with
    the corrected metric: the official one cuts answers per mini-batch, so a request's score depends
    on its mini-batch's neighbours.)"""
    tok = gpt2_style_tokenizer()
    model = tiny_gpt2(len(tok))
    reqs = cf_requests(5)
    quirks, pad = (CORRECTED_QUIRKS, -100) if kind == "counterfact" else (OFFICIAL_QUIRKS, 0)
    if kind == "zsre":  # same prompts, no old answers
        reqs = [dataclasses.replace(r, old_target=None, loc_old_answer=None) for r in reqs]
    turns = [make_turn(reqs[:3], tok, split="eval", old_label_pad=pad),
             make_turn(reqs[3:], tok, split="eval", old_label_pad=pad)]
    got = evaluate_turns(model, turns, kind, quirks, progress=False)
    alone = [evaluate_turns(model, [make_turn([r], tok, split="eval", old_label_pad=pad)], kind, quirks,
                            progress=False) for r in reqs]
    for metric in ("efficacy", "generalization", "specificity"):
        assert got["per_request"][metric] == pytest.approx([a[metric] for a in alone]), metric
        counts = {"efficacy": 1, "generalization": 2, "specificity": 3}[metric]  # prompts per request
        assert got[metric] == pytest.approx(sum(got["per_request"][metric]) / len(reqs))
        assert got["counts"][metric] == counts * len(reqs)
    if kind == "counterfact":  # the random tiny model gets no zsRE token right; CounterFact's scores vary
        assert sum(len(set(got["per_request"][m])) > 1 for m in ("efficacy", "generalization", "specificity")) >= 2, got["per_request"]
    assert "per_request" not in evaluate_turns(model, turns, kind, quirks, progress=False, per_request=False)


def test_evaluate_turns_zsre_oracle() -> None:
    """A model that always predicts the gold label scores 100 everywhere."""
    tok = gpt2_style_tokenizer()
    reqs = [
        EditRequest(i, f"What is thing {i}?", "unmanned aircraft", None, (f"Thing {i} is?",),
                    (f"nq question: other {i}?",), "Walter Sobchak", None)
        for i in range(3)
    ]
    turn = make_turn(reqs, tok, split="eval", lm_batch_size=2)
    table = {}
    for kind in ("edit", "equiv", "unrel"):
        for b in getattr(turn, kind):
            for r in range(len(b)):
                table[tuple(b.input_ids[r].tolist())] = b.labels[r]

    class Oracle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    logits_to_keep: int = 0):  # noqa: ANN201
            logits = torch.zeros((*input_ids.shape, len(tok)))
            for r in range(input_ids.shape[0]):
                labels = table[tuple(input_ids[r].tolist())]
                for t, y in enumerate(labels.tolist()):
                    if y != -100:
                        logits[r, t, y] = 1.0
            if logits_to_keep:  # like transformers: logits of the last positions only
                logits = logits[:, -logits_to_keep:]
            return type("Out", (), {"logits": logits})()

    got = evaluate_turns(Oracle(), [turn], "zsre", progress=False)
    assert (got["efficacy"], got["generalization"], got["specificity"], got["average"]) == (100.0,) * 4
    assert got["counts"] == {"efficacy": 3, "generalization": 3, "specificity": 3}
