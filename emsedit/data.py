"""Edit requests: reading the four dataset schemas, tokenisation and collation into turns.

This module turns dataset files into :class:`EditRequest` records and a group of requests into a
:class:`Turn` of padded LM mini-batches, exactly as the method spec §4 describes:

* readers for MEND zsRE (``src, rephrase, alt, answers, loc, loc_ans``), MALMEN/EMSEdit zsRE
  (``src, ans, rephrase, loc, loc_ans``), ROME CounterFact (``requested_rewrite``,
  ``paraphrase_prompts``, ``neighborhood_prompts``) and EasyEdit's reduced CounterFact (``prompt,
  subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``); the
  schema is recognised per record, and a bad record raises :class:`DataError` naming the file, the
  record index and the field;
* :func:`make_turn`: spec §4.2 tokenisation (prompt with the tokenizer's default special tokens,
  answer as ``" " + answer`` without special tokens, teacher forcing, labels already shifted) and
  spec §4.3 collation (each tuple kind sorted by length, longest first, cut into mini-batches of
  ``lm_batch_size`` and right-padded).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "DataError",
    "EmptyTargetError",
    "EditRequest",
    "LMBatch",
    "Turn",
    "read_requests",
    "load_records",
    "parse_record",
    "iter_batches",
    "make_turn",
    "DATASET_KINDS",
    "SCHEMAS",
    "IGNORE_INDEX",
]

#: The two dataset kinds a request can belong to.
DATASET_KINDS: tuple[str, ...] = ("zsre", "counterfact")

#: Schema name -> the dataset kind it belongs to.
SCHEMAS: dict[str, str] = {
    "mend_zsre": "zsre",
    "malmen_zsre": "zsre",
    "rome_counterfact": "counterfact",
    "easyedit_counterfact": "counterfact",
}

IGNORE_INDEX = -100  # label value of positions that are not scored (spec §4.2)
# Prompts per transformer pass: consecutive mini-batches are computed together up to this many rows
# (each keeps its own loss normalisation). On 2 CPU cores passes of 4 prompts cost ~38 ms per prompt,
# of 16 ~24 ms, and the vocabulary projection reads its whole weight once per pass. 32 was no faster
# per cell but held ~500 MB more at the peak (MALMEN² batch 256). Part of the numerics.
PASS_ROWS = 16


class DataError(ValueError):
    """A dataset file or one of its records cannot be used; says which file, record and field.

    ``index`` is the position of the record in the file (``None`` when the problem concerns the
    whole file) and ``field`` the offending field as a dotted path, e.g.
    ``requested_rewrite.target_new.str`` or ``paraphrase_prompts[1]`` (``None`` when no single field
    is to blame).
    """

    def __init__(self, path: str | Path, index: int | None, field: str | None, problem: str):
        self.path = str(path)
        self.index = index
        self.field = field
        self.problem = problem
        where = self.path
        if index is not None:
            where += f": record {index}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")


class EmptyTargetError(DataError):
    """A record's edit target is an empty string (``read_requests`` may skip such records)."""


@dataclass(frozen=True)
class EditRequest:
    """One edit request with its generalisation and locality probes, schema-independent.

    ``index`` is the position of the record in its source file. For CounterFact ``old_target`` is
    the true answer and ``loc_old_answer`` the new one (the locality probe is scored true-vs-new);
    for zsRE both are ``None``.
    """

    index: int
    prompt: str
    target: str
    old_target: str | None
    rephrases: tuple[str, ...]
    loc_prompts: tuple[str, ...]
    loc_answer: str
    loc_old_answer: str | None


@dataclass
class LMBatch:
    """One right-padded LM mini-batch of teacher-forced (prompt, answer) tuples (spec §4.2).

    ``labels[i, t]`` is the token to be predicted at position ``t`` (-100 where not scored);
    ``old_labels`` is the same construction with the other answer (CounterFact only).
    ``old_label_pad`` records the value ``old_labels`` was padded with (0 = the official quirk,
    -100 = corrected), so that scoring can tell padding from a real token when it needs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    old_labels: torch.Tensor | None = None
    old_label_pad: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> LMBatch:
        """Return a copy of this batch with every tensor on ``device``."""
        return LMBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            old_labels=None if self.old_labels is None else self.old_labels.to(device),
            old_label_pad=self.old_label_pad,
        )


@dataclass
class Turn:
    """One turn of edit requests, collated into LM mini-batches per tuple kind (spec §4.3).

    The three kinds are sorted independently, so the i-th edit and the i-th paraphrase need not
    belong to the same request.
    """

    requests: list[EditRequest]
    edit: list[LMBatch] = field(default_factory=list)
    equiv: list[LMBatch] = field(default_factory=list)
    unrel: list[LMBatch] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[Any]:
    """Read a dataset file as a list of raw records: a JSON list, or JSON lines (one per line).

    Files ending in ``.jsonl`` / ``.ndjson`` are always read as JSON lines; other files are read as
    JSON and fall back to JSON lines when the text is a sequence of objects. Raises
    :class:`DataError` when the file is missing, not UTF-8, not JSON, or not a list of records.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(p, None, None, "file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(p, None, None, f"not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise DataError(p, None, None, f"cannot be read ({exc})") from None

    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return _load_json_lines(p, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):
            return _load_json_lines(p, text)
        raise DataError(
            p, None, None, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if isinstance(data, dict):
        raise DataError(
            p, None, None,
            "top level is a JSON object; expected a list of records (or one JSON object per line)",
        )
    if not isinstance(data, list):
        raise DataError(p, None, None, f"top level is a {_json_type(data)}; expected a list of records")
    if not data:
        raise DataError(p, None, None, "the file holds no records")
    return data


def _load_json_lines(p: Path, text: str) -> list[Any]:
    """Parse JSON lines; record indices count non-blank lines."""
    records: list[Any] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(
                p, len(records), None,
                f"line {line_no} is not valid JSON (column {exc.colno}: {exc.msg})",
            ) from None
    if not records:
        raise DataError(p, None, None, "the file holds no records")
    return records


def _json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way JSON does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Record:
    """Typed field access on one raw record, raising DataError with file, index and field."""

    def __init__(self, path: Path, index: int, raw: Mapping[str, Any]):
        self.path = path
        self.index = index
        self.raw = raw

    def error(self, field_name: str | None, problem: str) -> DataError:
        """A DataError about this record and the given field."""
        return DataError(self.path, self.index, field_name, problem)

    def get(self, dotted: str) -> Any:
        """Return the value at a dotted path (``a.b.c``), every step required."""
        node: Any = self.raw
        walked: list[str] = []
        for part in dotted.split("."):
            if not isinstance(node, Mapping):
                raise self.error(".".join(walked), f"expected an object, got {_json_type(node)}")
            walked.append(part)
            if part not in node:
                raise self.error(".".join(walked), "missing")
            node = node[part]
        return node

    def string(self, dotted: str, value: Any = None, *, use_value: bool = False) -> str:
        """Return a required non-empty string field."""
        v = value if use_value else self.get(dotted)
        if not isinstance(v, str):
            raise self.error(dotted, f"expected a string, got {_json_type(v)}")
        if not v.strip():
            raise self.error(dotted, "empty string")
        return v

    def strings(self, dotted: str, *, allow_single: bool = False) -> tuple[str, ...]:
        """Return a required non-empty list of non-empty strings (or one string if allowed)."""
        v = self.get(dotted)
        if allow_single and isinstance(v, str):
            return (self.string(dotted, v, use_value=True),)
        if not isinstance(v, list):
            want = "a string or a list of strings" if allow_single else "a list of strings"
            raise self.error(dotted, f"expected {want}, got {_json_type(v)}")
        if not v:
            raise self.error(dotted, "empty list")
        return tuple(self.string(f"{dotted}[{i}]", s, use_value=True) for i, s in enumerate(v))


_FAMILY_KEYS: dict[str, frozenset[str]] = {
    "rome_counterfact": frozenset({"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}),
    "easyedit_counterfact": frozenset(
        {"target_new", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}
    ),
    "zsre": frozenset({"src", "rephrase", "loc", "loc_ans", "alt", "answers", "ans"}),
}


def _detect_schema(rec: _Record) -> str:
    """Recognise which of the four schemas a record follows, from the keys it has.

    The family (ROME CounterFact, EasyEdit CounterFact, zsRE) with most of its keys present wins, so
    a record missing one field is still recognised and the missing field can be named. A zsRE
    record is MEND-schema when it has ``alt`` or ``answers`` and MALMEN-schema when it has ``ans``.
    """
    hits = {family: len(keys & rec.raw.keys()) for family, keys in _FAMILY_KEYS.items()}
    best = max(hits.values())
    winners = [family for family, n in hits.items() if n == best]
    if best == 0 or len(winners) > 1:
        raise rec.error(
            None,
            "unknown schema: cannot tell zsRE (src, rephrase, loc, loc_ans, alt/answers/ans), ROME "
            "CounterFact (requested_rewrite, ...) or EasyEdit CounterFact (prompt, target_new, ...) "
            f"apart; keys are {sorted(rec.raw)}",
        )
    family = winners[0]
    if family != "zsre":
        return family
    if "alt" in rec.raw or "answers" in rec.raw:
        return "mend_zsre"
    if "ans" in rec.raw:
        return "malmen_zsre"
    raise rec.error(
        "ans", "missing: a zsRE record needs 'alt'/'answers' (MEND schema) or 'ans' (MALMEN schema)"
    )


class _EmptyTarget(Exception):
    """Internal signal: the record's edit target is an empty string."""

    def __init__(self, field_name: str):
        self.field_name = field_name


def _target_string(rec: _Record, dotted: str, value: Any = None, *, use_value: bool = False) -> str:
    """Read the edit target; an empty (whitespace-only) one is signalled separately."""
    v = value if use_value else rec.get(dotted)
    if isinstance(v, str) and not v.strip():
        raise _EmptyTarget(dotted)
    return rec.string(dotted, v, use_value=True)


def _zsre_request(rec: _Record, schema: str, zsre_target: str) -> EditRequest:
    """Build a zsRE request (MEND or MALMEN schema); locality prompt is ``loc + "?"``."""
    prompt = rec.string("src")
    rephrase = rec.string("rephrase")
    loc = rec.string("loc")
    loc_ans = rec.string("loc_ans")
    if schema == "malmen_zsre":
        target = _target_string(rec, "ans")
    elif zsre_target == "alt":
        target = _target_string(rec, "alt")
    else:
        answers = rec.get("answers")
        if not isinstance(answers, list):
            raise rec.error("answers", f"expected a list of strings, got {_json_type(answers)}")
        if not answers:
            raise rec.error("answers", "empty list")
        target = _target_string(rec, "answers[0]", answers[0], use_value=True)
    return EditRequest(
        index=rec.index,
        prompt=prompt,
        target=target,
        old_target=None,
        rephrases=(rephrase,),
        loc_prompts=(loc + "?",),
        loc_answer=loc_ans,
        loc_old_answer=None,
    )


def _rome_request(rec: _Record) -> EditRequest:
    """Build a CounterFact request from the ROME schema (``prompt.format(subject)``)."""
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, Mapping):
        raise rec.error("requested_rewrite", f"expected an object, got {_json_type(rr)}")
    template = rec.string("requested_rewrite.prompt")
    subject = rec.string("requested_rewrite.subject")
    if "{}" not in template:
        raise rec.error("requested_rewrite.prompt", "has no '{}' placeholder for the subject")
    try:
        prompt = template.format(subject)
    except (IndexError, KeyError, ValueError) as exc:
        raise rec.error("requested_rewrite.prompt", f"cannot be formatted with the subject ({exc})") from None
    target_new = _target_string(rec, "requested_rewrite.target_new.str")
    target_true = rec.string("requested_rewrite.target_true.str")
    return EditRequest(
        index=rec.index,
        prompt=prompt,
        target=target_new,
        old_target=target_true,
        rephrases=rec.strings("paraphrase_prompts"),
        loc_prompts=rec.strings("neighborhood_prompts"),
        loc_answer=target_true,
        loc_old_answer=target_new,
    )


def _easyedit_request(rec: _Record) -> EditRequest:
    """Build a CounterFact request from EasyEdit's reduced schema (prompt already formatted)."""
    prompt = rec.string("prompt")
    if "{}" in prompt:  # some EasyEdit variants keep the ROME placeholder
        prompt = prompt.replace("{}", rec.string("subject"))
    elif "subject" in rec.raw:
        rec.string("subject")  # type-check it when present; it is not otherwise needed
    target_new = _target_string(rec, "target_new")
    ground_truth = rec.string("ground_truth")
    return EditRequest(
        index=rec.index,
        prompt=prompt,
        target=target_new,
        old_target=ground_truth,
        rephrases=rec.strings("rephrase_prompt", allow_single=True),
        loc_prompts=rec.strings("locality_prompt", allow_single=True),
        loc_answer=rec.string("locality_ground_truth"),
        loc_old_answer=target_new,
    )


def parse_record(
    raw: Any,
    *,
    path: str | Path,
    index: int,
    dataset_kind: str,
    zsre_target: str = "alt",
) -> EditRequest:
    """Turn one raw record into an :class:`EditRequest`, recognising its schema.

    Raises :class:`DataError` for a malformed record or one whose schema belongs to the other
    dataset kind. An empty edit target raises :class:`DataError` too (``read_requests`` can skip
    such records instead).
    """
    rec = _Record(Path(path), index, raw if isinstance(raw, Mapping) else {})
    if not isinstance(raw, Mapping):
        raise rec.error(None, f"expected a JSON object, got {_json_type(raw)}")
    schema = _detect_schema(rec)
    if SCHEMAS[schema] != dataset_kind:
        raise rec.error(
            None, f"is a {schema} record, but the dataset kind is '{dataset_kind}'"
        )
    try:
        if schema in ("mend_zsre", "malmen_zsre"):
            return _zsre_request(rec, schema, zsre_target)
        if schema == "rome_counterfact":
            return _rome_request(rec)
        return _easyedit_request(rec)
    except _EmptyTarget as empty:
        raise EmptyTargetError(rec.path, rec.index, empty.field_name, "empty string (the edit target)") from None


def read_requests(
    path: str | Path,
    dataset_kind: Literal["zsre", "counterfact"],
    *,
    zsre_target: Literal["alt", "answers"] = "alt",
    on_empty_target: Literal["skip", "error"] = "skip",
) -> list[EditRequest]:
    """Read a dataset file (any of the four schemas, JSON list or JSON lines) into edit requests.

    ``zsre_target`` picks the new answer of MEND-schema zsRE records: ``"alt"`` (the counterfactual
    alternative, default) or ``"answers"`` (the gold answer ``answers[0]``). MALMEN-schema records
    always use ``ans``.

    A malformed record raises :class:`DataError` naming the file, record index and field. The one
    exception is a record whose *edit target* is an empty string (MEND's zsRE train split has a few
    empty ``alt`` values): with ``on_empty_target="skip"`` (default) such records are left out with
    a warning — the other requests keep their file index — and with ``"error"`` they raise.
    """
    if dataset_kind not in DATASET_KINDS:
        raise ValueError(f"dataset_kind must be one of {DATASET_KINDS}, got {dataset_kind!r}")
    if zsre_target not in ("alt", "answers"):
        raise ValueError(f"zsre_target must be 'alt' or 'answers', got {zsre_target!r}")
    if on_empty_target not in ("skip", "error"):
        raise ValueError(f"on_empty_target must be 'skip' or 'error', got {on_empty_target!r}")

    p = Path(path)
    requests: list[EditRequest] = []
    skipped: list[int] = []
    for index, raw in enumerate(load_records(p)):
        try:
            requests.append(
                parse_record(raw, path=p, index=index, dataset_kind=dataset_kind, zsre_target=zsre_target)
            )
        except EmptyTargetError:
            if on_empty_target == "error":
                raise
            skipped.append(index)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else "")
        warnings.warn(
            f"{p}: skipped {len(skipped)} record(s) with an empty edit target (indices {shown})",
            stacklevel=2,
        )
    if not requests:
        raise DataError(p, None, None, "no usable records")
    return requests


# --------------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------------


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


def _pad_batch(items: Sequence[_Item], old_label_pad: int) -> LMBatch:
    """Right-pad one mini-batch: ids/mask with 0, labels with -100, old_labels with the given pad."""
    old_labels = None
    if items[0].old_labels is not None:
        old_labels = _pad_rows([it.old_labels or () for it in items], old_label_pad)
    return LMBatch(
        input_ids=_pad_rows([it.input_ids for it in items], 0),
        attention_mask=_pad_rows([[1] * len(it.input_ids) for it in items], 0),
        labels=_pad_rows([it.labels for it in items], IGNORE_INDEX),
        old_labels=old_labels,
        old_label_pad=old_label_pad,
    )


def _collate(items: list[_Item], lm_batch_size: int, old_label_pad: int, sort_by: str) -> list[LMBatch]:
    """Stable-sort items longest first, cut into mini-batches, pad each."""
    if sort_by == "input":
        ordered = sorted(items, key=lambda it: -len(it.input_ids))
    else:
        ordered = sorted(items, key=lambda it: -it.prompt_len)
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

    return Turn(
        requests=requests,
        edit=_collate(items(edit_t), lm_batch_size, old_label_pad, sort_by),
        equiv=_collate(items(equiv_t), lm_batch_size, old_label_pad, sort_by),
        unrel=_collate(items(unrel_t), lm_batch_size, old_label_pad, sort_by),
    )


def iter_batches(turns: Iterable[Turn]) -> Iterable[tuple[str, LMBatch]]:
    """Yield ``(kind, batch)`` for every mini-batch of every turn, kinds in edit/equiv/unrel order."""
    for turn in turns:
        for kind in ("edit", "equiv", "unrel"):
            for batch in getattr(turn, kind):
                yield kind, batch


def passes(batches: Sequence[LMBatch], max_rows: int | None = None) -> list[list[LMBatch]]:
    """Consecutive mini-batches grouped into passes of at most ``max_rows`` (default ``PASS_ROWS``)
    prompts, at least one mini-batch each."""
    max_rows = PASS_ROWS if max_rows is None else max_rows
    out: list[list[LMBatch]] = []
    rows = 0
    for b in batches:
        if out and rows + len(b) <= max_rows:
            out[-1].append(b)
            rows += len(b)
        else:
            out.append([b])
            rows = len(b)
    return out


def joined_rows(batches: Sequence[LMBatch], name: str, pad: int) -> torch.Tensor:
    """The mini-batches' ``name`` tensors stacked row-wise, right-padded with ``pad`` to the widest."""
    width = max(b.input_ids.shape[1] for b in batches)
    return torch.cat([torch.nn.functional.pad(getattr(b, name), (0, width - b.input_ids.shape[1]), value=pad)
                      for b in batches])
