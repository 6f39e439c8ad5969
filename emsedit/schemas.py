"""Dataset files and their four record schemas, read into :class:`~emsedit.data.EditRequest` s.

:data:`SCHEMAS` is the table of schemas: each names its dataset kind, the keys that recognise its
family and, within a family, the keys that tell it apart, and its reader:

* ``mend_zsre`` (``src, rephrase, alt, answers, loc, loc_ans``) and ``malmen_zsre`` (``src, ans,
  rephrase, loc, loc_ans``), both with an optional EasyEdit ``portability`` object (``New Question``,
  ``New Answer``; or a list of them);
* ``rome_counterfact`` (``requested_rewrite``, ``paraphrase_prompts``, ``neighborhood_prompts``);
* ``easyedit_counterfact`` (``prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth``).

The schema is recognised per record; a bad record raises :class:`~emsedit.data.DataError` naming the
file, the record index and the field. A new schema is a reader and one row of the table.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emsedit.data import DATASET_KINDS, DataError, EditRequest, EmptyTargetError, json_type

__all__ = ["SCHEMAS", "Schema", "load_records", "parse_record", "read_requests"]


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
        raise DataError(p, None, None, f"top level is a {json_type(data)}; expected a list of records")
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
                raise self.error(".".join(walked), f"expected an object, got {json_type(node)}")
            walked.append(part)
            if part not in node:
                raise self.error(".".join(walked), "missing")
            node = node[part]
        return node

    def string(self, dotted: str, value: Any = None, *, use_value: bool = False) -> str:
        """Return a required non-empty string field."""
        v = value if use_value else self.get(dotted)
        if not isinstance(v, str):
            raise self.error(dotted, f"expected a string, got {json_type(v)}")
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
            raise self.error(dotted, f"expected {want}, got {json_type(v)}")
        if not v:
            raise self.error(dotted, "empty list")
        return tuple(self.string(f"{dotted}[{i}]", s, use_value=True) for i, s in enumerate(v))


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
            raise rec.error("answers", f"expected a list of strings, got {json_type(answers)}")
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
        portability=_portability(rec),
    )


def _portability(rec: _Record) -> tuple[tuple[str, str], ...]:
    """EasyEdit's optional ``portability`` field: one object, or a list of them, each with
    ``New Question`` and ``New Answer``; absent (or null) gives no portability probe."""
    raw = rec.raw.get("portability")
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        where = f"portability[{i}]" if isinstance(raw, list) else "portability"
        if not isinstance(item, Mapping):
            raise rec.error(where, f"expected an object with 'New Question' and 'New Answer', got {json_type(item)}")
        out.append(tuple(rec.string(f"{where}.{key}", item.get(key), use_value=True)
                         for key in ("New Question", "New Answer")))
    return tuple(out)


def _rome_request(rec: _Record) -> EditRequest:
    """Build a CounterFact request from the ROME schema (``prompt.format(subject)``)."""
    rr = rec.get("requested_rewrite")
    if not isinstance(rr, Mapping):
        raise rec.error("requested_rewrite", f"expected an object, got {json_type(rr)}")
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


@dataclass(frozen=True)
class Schema:
    """One record schema: its dataset kind, how it is recognised, and its reader."""

    kind: str  # "zsre" or "counterfact"
    family: frozenset[str]  # keys of its family; the family with most of them present wins
    marker: frozenset[str]  # in a family of several schemas, any of these keys picks this one
    read: Callable[[_Record, str], EditRequest]  # (record, zsre_target) -> request


_ZSRE_KEYS = frozenset({"src", "rephrase", "loc", "loc_ans", "alt", "answers", "ans"})

#: Schema name -> its declaration. Order matters only within a family (the first marker found wins).
SCHEMAS: dict[str, Schema] = {
    "mend_zsre": Schema("zsre", _ZSRE_KEYS, frozenset({"alt", "answers"}),
                        lambda rec, target: _zsre_request(rec, "mend_zsre", target)),
    "malmen_zsre": Schema("zsre", _ZSRE_KEYS, frozenset({"ans"}),
                          lambda rec, target: _zsre_request(rec, "malmen_zsre", target)),
    "rome_counterfact": Schema(
        "counterfact", frozenset({"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}), frozenset(),
        lambda rec, target: _rome_request(rec)),
    "easyedit_counterfact": Schema(
        "counterfact",
        frozenset({"target_new", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}),
        frozenset(), lambda rec, target: _easyedit_request(rec)),
}


def _detect_schema(rec: _Record) -> str:
    """Recognise which schema a record follows, from the keys it has.

    The family (ROME CounterFact, EasyEdit CounterFact, zsRE) with most of its keys present wins, so
    a record missing one field is still recognised and the missing field can be named. Within the
    zsRE family a record is MEND-schema when it has ``alt`` or ``answers`` and MALMEN-schema when it
    has ``ans``.
    """
    families = list(dict.fromkeys(s.family for s in SCHEMAS.values()))
    hits = [len(family & rec.raw.keys()) for family in families]
    best = max(hits)
    if best == 0 or hits.count(best) > 1:
        raise rec.error(
            None,
            "unknown schema: cannot tell zsRE (src, rephrase, loc, loc_ans, alt/answers/ans), ROME "
            "CounterFact (requested_rewrite, ...) or EasyEdit CounterFact (prompt, target_new, ...) "
            f"apart; keys are {sorted(rec.raw)}",
        )
    family = families[hits.index(best)]
    members = [name for name, s in SCHEMAS.items() if s.family == family]
    for name in members:
        if len(members) == 1 or SCHEMAS[name].marker & rec.raw.keys():
            return name
    raise rec.error(
        "ans", "missing: a zsRE record needs 'alt'/'answers' (MEND schema) or 'ans' (MALMEN schema)"
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
        raise rec.error(None, f"expected a JSON object, got {json_type(raw)}")
    schema = _detect_schema(rec)
    if SCHEMAS[schema].kind != dataset_kind:
        raise rec.error(
            None, f"is a {schema} record, but the dataset kind is '{dataset_kind}'"
        )
    try:
        return SCHEMAS[schema].read(rec, zsre_target)
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
