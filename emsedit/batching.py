"""Tokenisation and collation of edit requests into turns of LM mini-batches, and joined passes.

* :func:`make_turn`: spec §4.2 tokenisation (prompt with the tokenizer's default special tokens,
  answer as ``" " + answer`` without special tokens, teacher forcing, labels already shifted) and
  spec §4.3 collation (each tuple kind sorted by length, longest first, cut into mini-batches of
  ``lm_batch_size`` and right-padded);
* :func:`passes` and :func:`joined_rows`: consecutive mini-batches joined into transformer passes of
  at most :data:`PASS_ROWS` prompts, a small last pass joined to the one before (each mini-batch
  keeps its own loss normalisation and scores);
  :func:`packed_rows`: the same prompts' real tokens back to back in one row, for passes that need
  no padding (the model then keeps each prompt to itself by its position ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from emsedit.data import IGNORE_INDEX, EditRequest, MiniBatch, Turn

__all__ = ["PASS_ROWS", "collate_pairs", "iter_minibatches", "joined_rows", "make_turn", "packed_rows", "passes"]

# Prompts per transformer pass: consecutive mini-batches are computed together up to this many rows
# (each keeps its own loss normalisation). On 2 CPU cores passes of 4 prompts cost ~38 ms per prompt,
# of 16 ~24 ms, and the vocabulary projection reads its whole weight once per pass. 32 was no faster
# per cell but held ~500 MB more at the peak (MALMEN² batch 256). Part of the numerics.
PASS_ROWS = 16


@dataclass(frozen=True)
class _Item:
    """One tokenised (prompt, answer[, other answer]) tuple before padding."""

    input_ids: list[int]
    labels: list[int]
    old_labels: list[int] | None
    prompt_len: int


def _token_ids(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool) -> dict[str, list[int]]:
    """Tokenise each distinct text once, in one batched call; returns text -> ids."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return {}
    encoded = tokenizer(distinct, add_special_tokens=add_special_tokens)["input_ids"]
    return {text: list(ids) for text, ids in zip(distinct, encoded)}


def _item(p: list[int], a: list[int], b: list[int] | None, prompt: str, answer: str) -> _Item:
    """Build one teacher-forced tuple: ids = p ⧺ a[:-1], labels = [-100]*(|p|-1) ⧺ a."""
    if not p:
        raise ValueError(f"the tokenizer produced no tokens for the prompt {prompt!r}")
    if not a:
        raise ValueError(f"the tokenizer produced no tokens for the answer {answer!r}")
    head = [IGNORE_INDEX] * (len(p) - 1)
    return _Item(
        input_ids=p + a[:-1],
        labels=head + a,
        old_labels=None if b is None else head + b,
        prompt_len=len(p),
    )


def _pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer rows to the longest one and stack them into one LongTensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _pad_batch(items: Sequence[_Item], old_label_pad: int) -> MiniBatch:
    """Right-pad one mini-batch: ids/mask with 0, labels with -100, old_labels with the given pad."""
    old_labels = None
    if items[0].old_labels is not None:
        old_labels = _pad_rows([it.old_labels or () for it in items], old_label_pad)
    return MiniBatch(
        input_ids=_pad_rows([it.input_ids for it in items], 0),
        attention_mask=_pad_rows([[1] * len(it.input_ids) for it in items], 0),
        labels=_pad_rows([it.labels for it in items], IGNORE_INDEX),
        old_labels=old_labels,
        old_label_pad=old_label_pad,
    )


def _order(items: list[_Item], sort_by: str) -> list[int]:
    """Positions of the items, stable-sorted longest first (the order :func:`_collate` batches them in)."""
    if sort_by == "input":
        return sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    return sorted(range(len(items)), key=lambda i: -items[i].prompt_len)


def _collate(items: list[_Item], lm_batch_size: int, old_label_pad: int, sort_by: str) -> list[MiniBatch]:
    """Stable-sort items longest first, cut into mini-batches, pad each."""
    ordered = [items[i] for i in _order(items, sort_by)]
    return [
        _pad_batch(ordered[start : start + lm_batch_size], old_label_pad)
        for start in range(0, len(ordered), lm_batch_size)
    ]


def make_turn(
    requests: Sequence[EditRequest],
    tokenizer: Any,
    *,
    split: Literal["train", "eval"],
    lm_batch_size: int = 4,
    old_label_pad: int = 0,
    sort_by: Literal["input", "prompt"] = "input",
) -> Turn:
    """Tokenise and collate one turn of edit requests into padded LM mini-batches (spec §4.2–4.3).

    For each request: the edit tuple (prompt, target); the generalisation tuples (each rephrase,
    target); the locality tuples (each locality prompt, loc_answer). ``split="train"`` keeps only the
    first rephrase and first locality prompt of each request, ``split="eval"`` keeps all of them,
    flattened (this only matters for ROME-schema CounterFact, which has several).

    CounterFact requests (``old_target`` set) also get ``old_labels`` built from the other answer:
    ``old_target`` for edit/equiv tuples, ``loc_old_answer`` for locality tuples; padded with
    ``old_label_pad`` (0 reproduces the official code, -100 is the corrected variant).

    Each kind is sorted separately, longest first with ties kept in request order, then cut into
    mini-batches of ``lm_batch_size``. ``sort_by="input"`` (default) sorts by the length of the fed
    sequence (prompt ⧺ answer[:-1]), which is what the official collate function sorts by (the
    attention-mask sum); ``"prompt"`` sorts by the tokenised prompt length alone.
    """
    requests = list(requests)
    if not requests:
        raise ValueError("make_turn needs at least one request")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if lm_batch_size < 1:
        raise ValueError(f"lm_batch_size must be >= 1, got {lm_batch_size}")
    if sort_by not in ("input", "prompt"):
        raise ValueError(f"sort_by must be 'input' or 'prompt', got {sort_by!r}")
    with_old = [r.old_target is not None for r in requests]
    if any(with_old) and not all(with_old):
        raise ValueError("a turn mixes CounterFact requests (old_target set) with zsRE ones")
    counterfact = all(with_old)
    if counterfact and any(r.loc_old_answer is None for r in requests):
        raise ValueError("a CounterFact request lacks loc_old_answer")

    # (prompt, answer, other answer) triples per kind, in request order.
    def pick(prompts: tuple[str, ...]) -> tuple[str, ...]:
        return prompts[:1] if split == "train" else prompts

    edit_t = [(r.prompt, r.target, r.old_target) for r in requests]
    equiv_t = [(q, r.target, r.old_target) for r in requests for q in pick(r.rephrases)]
    unrel_t = [(q, r.loc_answer, r.loc_old_answer) for r in requests for q in pick(r.loc_prompts)]
    triples = edit_t + equiv_t + unrel_t

    prompt_ids = _token_ids(tokenizer, [t[0] for t in triples], add_special_tokens=True)
    answers = [t[1] for t in triples] + ([t[2] for t in triples if t[2] is not None] if counterfact else [])
    answer_ids = _token_ids(tokenizer, [" " + a for a in answers], add_special_tokens=False)

    def items(kind: list[tuple[str, str, str | None]]) -> list[_Item]:
        return [
            _item(
                prompt_ids[q],
                answer_ids[" " + a],
                answer_ids[" " + b] if (counterfact and b is not None) else None,
                q,
                a,
            )
            for q, a, b in kind
        ]

    built = {"edit": items(edit_t), "equiv": items(equiv_t), "unrel": items(unrel_t)}
    return Turn(
        requests=requests,
        **{kind: _collate(its, lm_batch_size, old_label_pad, sort_by) for kind, its in built.items()},
        sources={kind: _order(its, sort_by) for kind, its in built.items()},
        owners={"edit": list(range(len(requests))),
                "equiv": [i for i, r in enumerate(requests) for _ in pick(r.rephrases)],
                "unrel": [i for i, r in enumerate(requests) for _ in pick(r.loc_prompts)]},
    )


def collate_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Any, *, lm_batch_size: int = 4,
                  sort_by: Literal["input", "prompt"] = "input") -> tuple[list[MiniBatch], list[int]]:
    """Teacher-forced (prompt, answer) tuples tokenised and collated as :func:`make_turn` does its
    zsRE tuples; returns the mini-batches and, per row in batch order, the position of its pair."""
    if not pairs:
        return [], []
    prompt_ids = _token_ids(tokenizer, [q for q, _ in pairs], add_special_tokens=True)
    answer_ids = _token_ids(tokenizer, [" " + a for _, a in pairs], add_special_tokens=False)
    its = [_item(prompt_ids[q], answer_ids[" " + a], None, q, a) for q, a in pairs]
    return _collate(its, lm_batch_size, 0, sort_by), _order(its, sort_by)


def iter_minibatches(turns: Iterable[Turn]) -> Iterable[tuple[str, MiniBatch]]:
    """Yield ``(kind, batch)`` for every mini-batch of every turn, kinds in edit/equiv/unrel order."""
    for turn in turns:
        for kind in ("edit", "equiv", "unrel"):
            for batch in getattr(turn, kind):
                yield kind, batch


def passes(batches: Sequence[MiniBatch], max_rows: int | None = None) -> list[list[MiniBatch]]:
    """Consecutive mini-batches grouped into passes of at most ``max_rows`` (default ``PASS_ROWS``)
    prompts, at least one mini-batch each; a last pass of at most half ``max_rows`` prompts joins
    the pass before it when the two hold at most 1.5 × ``max_rows`` (so 20 prompts are one pass of
    20, not 16 + 4: a pass of a few prompts costs nearly a full one, the vocabulary projection
    reading its whole weight for a few rows)."""
    max_rows = PASS_ROWS if max_rows is None else max_rows
    out: list[list[MiniBatch]] = []
    rows = 0
    for b in batches:
        if out and rows + len(b) <= max_rows:
            out[-1].append(b)
            rows += len(b)
        else:
            out.append([b])
            rows = len(b)
    if len(out) > 1 and rows <= max_rows // 2 and sum(map(len, out[-2])) + rows <= max_rows + max_rows // 2:
        out[-2].extend(out.pop())
    return out


def joined_rows(batches: Sequence[MiniBatch], name: str, pad: int) -> torch.Tensor:
    """The mini-batches' ``name`` tensors stacked row-wise, right-padded with ``pad`` to the widest."""
    width = max(b.input_ids.shape[1] for b in batches)
    return torch.cat([torch.nn.functional.pad(getattr(b, name), (0, width - b.input_ids.shape[1]), value=pad)
                      for b in batches])


def packed_rows(batches: Sequence[MiniBatch]) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """The mini-batches' real tokens as one packed row: ``(input_ids, position_ids, lengths)`` of
    shapes (1, T), (1, T) and one length per prompt, prompts in row order, each one's positions
    counting from 0 as in its padded row (HF models read a position that does not follow on as the
    start of a new sequence and mask attention across). None unless every row is right-padded."""
    ids, positions, lengths = [], [], []
    for b in batches:
        mask = b.attention_mask if b.attention_mask is not None else torch.ones_like(b.input_ids)
        for r, n in enumerate(mask.sum(1).tolist()):
            if n < 1 or not bool(mask[r, :n].all()):
                return None  # left padding or holes
            ids.append(b.input_ids[r, :n])
            positions.append(torch.arange(n, device=b.input_ids.device))
            lengths.append(n)
    return torch.cat(ids)[None], torch.cat(positions)[None], lengths
