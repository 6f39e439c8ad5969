"""The data the editors work on: edit requests, LM mini-batches and turns, and the data error.

* :class:`EditRequest` — one edit with its generalisation and locality probes, whatever file schema it
  came from (reading files: :mod:`emsedit.schemas`);
* :class:`MiniBatch` and :class:`Turn` — a turn of requests tokenised and collated into padded LM
  mini-batches per tuple kind (building them, and joining them into passes: :mod:`emsedit.batching`);
* :class:`DataError` — a file or record that cannot be used, naming the file, record and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "EmptyTargetError", "EditRequest", "MiniBatch", "Turn", "DATASET_KINDS", "IGNORE_INDEX",
           "json_type"]

#: The two dataset kinds a request can belong to.
DATASET_KINDS: tuple[str, ...] = ("zsre", "counterfact")

IGNORE_INDEX = -100  # label value of positions that are not scored (spec §4.2)
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
    #: (new question, new answer) pairs probing a consequence of the edit (EasyEdit's zsRE
    #: ``portability`` field); empty when the record has none
    portability: tuple[tuple[str, str], ...] = ()


@dataclass
class MiniBatch:
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

    def to(self, device: torch.device | str) -> MiniBatch:
        """Return a copy of this batch with every tensor on ``device``."""
        return MiniBatch(
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
    belong to the same request: ``sources[kind][r]`` is where the r-th row of that kind (counted over
    its mini-batches in order) stands among that kind's tuples in request order (the requests'
    prompts flattened; for edit tuples, the request's position in ``requests``), and
    ``owners[kind][i]`` is the position in ``requests`` of the request whose tuple i is.
    """

    requests: list[EditRequest]
    edit: list[MiniBatch] = field(default_factory=list)
    equiv: list[MiniBatch] = field(default_factory=list)
    unrel: list[MiniBatch] = field(default_factory=list)
    sources: dict[str, list[int]] = field(default_factory=dict)
    owners: dict[str, list[int]] = field(default_factory=dict)

    def row_requests(self, kind: str) -> list[int] | None:
        """The request (position in ``requests``) of each row of ``kind``, in mini-batch order;
        None for a turn built without ``sources``/``owners``."""
        if kind not in self.sources or kind not in self.owners:
            return None
        return [self.owners[kind][i] for i in self.sources[kind]]


def json_type(value: Any) -> str:
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
