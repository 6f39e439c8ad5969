"""Tests for spec §4.2 tokenisation and §4.3 collation (emsedit.batching.make_turn)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from emsedit.batching import make_turn
from emsedit.data import EditRequest, MiniBatch, Turn
from tokenizers_for_tests import gpt2_style_tokenizer, llama_style_tokenizer

torch.set_num_threads(1)

TOKENIZERS = {"gpt2": gpt2_style_tokenizer, "llama": llama_style_tokenizer}


def zsre_request(i: int, prompt: str, target: str) -> EditRequest:
    return EditRequest(
        index=i,
        prompt=prompt,
        target=target,
        old_target=None,
        rephrases=(f"Put differently, {prompt}",),
        loc_prompts=(f"nq question: unrelated question number {i}?",),
        loc_answer=f"answer {i}",
        loc_old_answer=None,
    )


def cf_request(i: int, n_rephrase: int = 2, n_loc: int = 3) -> EditRequest:
    new, true = ("English", "French") if i % 2 else ("the piano keys", "guitar")
    return EditRequest(
        index=i,
        prompt=f"The mother tongue of person {i} is",
        target=new,
        old_target=true,
        rephrases=tuple(f"Rephrase {j} of case {i}:" + " word" * j for j in range(n_rephrase)),
        loc_prompts=tuple(f"Neighbour {j} of case {i} speaks" + " more" * j for j in range(n_loc)),
        loc_answer=true,
        loc_old_answer=new,
    )


ZSRE = [
    zsre_request(0, "What is the product made by UniFirst?", "unmanned aircraft"),
    zsre_request(1, "Who?", "Walter Sobchak"),
    zsre_request(2, "When was the inception of IAAF Combined Events Challenge?", "2006"),
    zsre_request(3, "What is it?", "x"),
    zsre_request(4, "Which language does Danielle Darrieux speak?", "French"),
]


def rows(batches: list[MiniBatch]) -> list[dict[str, Any]]:
    """Unpad every row of every batch: the real (unpadded) sequences."""
    out = []
    for b in batches:
        for r in range(len(b)):
            n = int(b.attention_mask[r].sum())
            row = {
                "input_ids": b.input_ids[r, :n].tolist(),
                "labels": b.labels[r, :n].tolist(),
                "ids_pad": b.input_ids[r, n:].tolist(),
                "mask": b.attention_mask[r].tolist(),
                "labels_pad": b.labels[r, n:].tolist(),
                "old_labels": None if b.old_labels is None else b.old_labels[r].tolist(),
            }
            out.append(row)
    return out


def expected(tok: Any, prompt: str, answer: str) -> tuple[list[int], list[int], list[int]]:
    p = tok(prompt)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    return p, a, p + a[:-1]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_labels_are_exactly_the_answer_tokens(name: str) -> None:
    tok = TOKENIZERS[name]()
    turn = make_turn(ZSRE, tok, split="train", lm_batch_size=2)
    by_input = {}
    for kind, get in (("edit", lambda r: [(r.prompt, r.target)]),
                      ("equiv", lambda r: [(q, r.target) for q in r.rephrases]),
                      ("unrel", lambda r: [(q, r.loc_answer) for q in r.loc_prompts])):
        for r in ZSRE:
            for prompt, answer in get(r):
                p, a, ids = expected(tok, prompt, answer)
                by_input[(kind, tuple(ids))] = (p, a)
    for kind in ("edit", "equiv", "unrel"):
        got = rows(getattr(turn, kind))
        assert len(got) == len(ZSRE)
        for row in got:
            p, a = by_input[(kind, tuple(row["input_ids"]))]
            # input_ids = prompt ⧺ answer[:-1]
            assert row["input_ids"] == p + a[:-1]
            # labelled positions are exactly the last prompt token .. second-to-last answer token,
            # and the labels there are exactly the answer tokens
            scored = [i for i, y in enumerate(row["labels"]) if y != -100]
            assert scored == list(range(len(p) - 1, len(p) - 1 + len(a)))
            assert [row["labels"][i] for i in scored] == a
            # no EOS anywhere, BOS only for the Llama-style tokenizer
            assert tok.eos_token_id not in row["input_ids"] and tok.eos_token_id not in row["labels"]
            if name == "llama":
                assert row["input_ids"][0] == tok.bos_token_id
                assert row["input_ids"].count(tok.bos_token_id) == 1
            else:
                assert tok.bos_token_id not in row["input_ids"]
            # right padding: ids/mask 0, labels -100
            assert set(row["ids_pad"]) <= {0} and set(row["labels_pad"]) <= {-100}
            n = len(row["input_ids"])
            assert row["mask"] == [1] * n + [0] * (len(row["mask"]) - n)
            assert row["old_labels"] is None


def test_tokenizer_difference_is_only_the_bos() -> None:
    gpt, llama = gpt2_style_tokenizer(), llama_style_tokenizer()
    tg = make_turn(ZSRE[:1], gpt, split="eval")
    tl = make_turn(ZSRE[:1], llama, split="eval")
    assert tl.edit[0].input_ids[0].tolist() == [llama.bos_token_id] + tg.edit[0].input_ids[0].tolist()
    assert tl.edit[0].labels[0].tolist() == [-100] + tg.edit[0].labels[0].tolist()


def test_sorted_longest_first_and_chunked() -> None:
    tok = gpt2_style_tokenizer()
    reqs = [zsre_request(i, "Same prompt?", "same answer") for i in range(3)] + ZSRE
    for size in (1, 3, 4, 16):
        turn = make_turn(reqs, tok, split="train", lm_batch_size=size)
        for kind in ("edit", "equiv", "unrel"):
            batches = getattr(turn, kind)
            assert len(batches) == math.ceil(len(reqs) / size)
            assert all(len(b) == size for b in batches[:-1])
            lengths = [len(r["input_ids"]) for r in rows(batches)]
            assert lengths == sorted(lengths, reverse=True)
            assert sum(len(b) for b in batches) == len(reqs)
            # each batch is padded only to its own longest row
            for b in batches:
                assert b.input_ids.shape[1] == int(b.attention_mask.sum(1).max())


def test_ties_keep_request_order() -> None:
    tok = gpt2_style_tokenizer()
    answers = ["q", "r", "s", "t"]
    reqs = [zsre_request(0, "What is it?", "a much longer answer than the others")] + [
        zsre_request(i + 1, "Same prompt?", a) for i, a in enumerate(answers)
    ]
    lengths = {len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in answers}
    assert len(lengths) == 1  # precondition: all tied
    batch = make_turn(reqs, tok, split="train", lm_batch_size=8).edit[0]
    tail = [tok(" " + a, add_special_tokens=False)["input_ids"][-1] for a in answers]
    got = [int(batch.labels[r][batch.labels[r] != -100][-1]) for r in range(1, 5)]
    assert got == tail


def test_sort_by_prompt_length() -> None:
    tok = gpt2_style_tokenizer()
    short_prompt_long_answer = zsre_request(0, "Who?", "a very very long answer with many many tokens in it")
    long_prompt_short_answer = zsre_request(1, "What is the product made by UniFirst and when?", "x")
    reqs = [short_prompt_long_answer, long_prompt_short_answer]
    first_by_input = make_turn(reqs, tok, split="train", sort_by="input").edit[0]
    first_by_prompt = make_turn(reqs, tok, split="train", sort_by="prompt").edit[0]
    who = tok("Who?")["input_ids"]
    assert first_by_input.input_ids[0, : len(who)].tolist() == who
    assert first_by_prompt.input_ids[1, : len(who)].tolist() == who


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("pad", [0, -100])
def test_counterfact_old_labels(name: str, pad: int) -> None:
    tok = TOKENIZERS[name]()
    reqs = [cf_request(i) for i in range(4)]
    turn = make_turn(reqs, tok, split="train", lm_batch_size=4, old_label_pad=pad)
    prompt_of = {}
    for r in reqs:
        prompt_of[r.prompt] = ("edit", r.target, r.old_target)
        prompt_of[r.rephrases[0]] = ("equiv", r.target, r.old_target)
        prompt_of[r.loc_prompts[0]] = ("unrel", r.loc_answer, r.loc_old_answer)
    seen = 0
    for kind in ("edit", "equiv", "unrel"):
        (batch,) = getattr(turn, kind)
        assert batch.old_labels is not None and batch.old_label_pad == pad
        old_width = batch.old_labels.shape[1]
        for r in range(len(batch)):
            n = int(batch.attention_mask[r].sum())
            ids = batch.input_ids[r, :n].tolist()
            match = [q for q in prompt_of if ids[: len(tok(q)["input_ids"])] == tok(q)["input_ids"]
                     and prompt_of[q][0] == kind]
            prompt = max(match, key=len)
            _, answer, other = prompt_of[prompt]
            p, a, _ = expected(tok, prompt, answer)
            b = tok(" " + other, add_special_tokens=False)["input_ids"]
            assert ids == p + a[:-1]
            want_old = [-100] * (len(p) - 1) + b
            assert batch.old_labels[r].tolist() == want_old + [pad] * (old_width - len(want_old))
            seen += 1
        # old_labels are padded to their own longest row, independent of the labels width
        assert old_width == max(
            len(tok(q)["input_ids"]) - 1 + len(tok(" " + prompt_of[q][2], add_special_tokens=False)["input_ids"])
            for q in prompt_of if prompt_of[q][0] == kind
        )
    assert seen == 12


def test_counterfact_train_vs_eval_split() -> None:
    tok = gpt2_style_tokenizer()
    reqs = [cf_request(0, n_rephrase=2, n_loc=10), cf_request(1, n_rephrase=3, n_loc=2), cf_request(2)]
    train = make_turn(reqs, tok, split="train", lm_batch_size=4)
    evalt = make_turn(reqs, tok, split="eval", lm_batch_size=4)
    count = lambda t, k: sum(len(b) for b in getattr(t, k))  # noqa: E731
    assert (count(train, "edit"), count(train, "equiv"), count(train, "unrel")) == (3, 3, 3)
    assert (count(evalt, "edit"), count(evalt, "equiv"), count(evalt, "unrel")) == (3, 2 + 3 + 2, 10 + 2 + 3)
    assert len(evalt.unrel) == math.ceil(15 / 4)
    # train keeps the *first* rephrase / locality prompt of each request
    first_prompts = {tuple(tok(r.loc_prompts[0])["input_ids"]) for r in reqs}
    for row in rows(train.unrel):
        assert any(tuple(row["input_ids"][: len(fp)]) == fp for fp in first_prompts)
    assert isinstance(train, Turn) and train.requests == reqs


class CountingTokenizer:
    """Wraps a tokenizer and records every call, to check strings are tokenised once, in batches."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[tuple[int, bool]] = []
        self.strings: list[str] = []

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        texts = [text] if isinstance(text, str) else list(text)
        self.calls.append((len(texts), kwargs.get("add_special_tokens", True)))
        self.strings.extend(texts)
        return self.inner(text, **kwargs)


def test_each_distinct_string_tokenised_once_in_batched_calls() -> None:
    counting = CountingTokenizer(gpt2_style_tokenizer())
    reqs = [cf_request(i, n_rephrase=2, n_loc=3) for i in range(6)]
    make_turn(reqs, counting, split="eval")
    assert len(counting.calls) == 2  # one call for prompts, one for answers
    assert len(counting.strings) == len(set(counting.strings))


def test_bad_arguments() -> None:
    tok = gpt2_style_tokenizer()
    with pytest.raises(ValueError, match="split"):
        make_turn(ZSRE, tok, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lm_batch_size"):
        make_turn(ZSRE, tok, split="train", lm_batch_size=0)
    with pytest.raises(ValueError, match="at least one"):
        make_turn([], tok, split="train")
    with pytest.raises(ValueError, match="mixes"):
        make_turn([ZSRE[0], cf_request(0)], tok, split="train")
