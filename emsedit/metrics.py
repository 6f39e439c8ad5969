"""Efficacy, generalisation and specificity scores as the official code computes them (spec §8).

Every example gets a token-level score under teacher forcing; a metric is the mean over examples,
in percent:

* zsRE (protocol ``teacher_forced_token_acc``): the fraction of scored positions (``labels !=
  -100``) where the argmax token equals the label. Specificity is accuracy against the gold NQ
  answer (scorer ``gold_answer``), not agreement with the unedited model.
* CounterFact (protocol ``prob_new_gt_old``): at each scored position ``i`` the example succeeds
  iff ``logit[i, A_i] > logit[i, B_i]``, where A are the teacher-forced ``labels`` and B the
  ``old_labels`` (new vs true for efficacy/generalisation, true vs new for specificity, scorer
  ``true_vs_new``).

The official CounterFact scorer has two quirks, reproduced by default and switchable through
:class:`MetricQuirks`:

``cf_oldlabel_pad_zero`` (official: True)
    ``old_labels`` are padded with token id 0, so where B is shorter than A the remaining
    positions compare A against token 0 and still count. Corrected (False): those positions are
    left out of numerator and denominator. The corrected variant needs batches collated with
    ``old_label_pad=-100`` (``make_turn``), otherwise padding cannot be told from token 0.
``cf_minibatch_truncation`` (official: True)
    The widths of the padded ``labels`` and ``old_labels`` matrices are reconciled per mini-batch:
    a wider ``old_labels`` is cut to the ``labels`` width; a wider ``labels`` is cut to the
    ``old_labels`` width and the cut positions are dropped from numerator and denominator.
    Corrected (False): every example keeps all its answer positions.

An example with no scored position (possible after truncation) is skipped and not counted.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from emsedit.data import IGNORE_INDEX, MiniBatch, Turn
from emsedit.progress import Progress

__all__ = [
    "MetricQuirks",
    "OFFICIAL_QUIRKS",
    "CORRECTED_QUIRKS",
    "PROTOCOLS",
    "score_batch",
    "summarize",
    "evaluate_turns",
]

Kind = Literal["zsre", "counterfact"]

#: Dataset kind -> the protocol name recorded with the metrics.
PROTOCOLS: dict[str, str] = {"zsre": "teacher_forced_token_acc", "counterfact": "prob_new_gt_old"}
#: Dataset kind -> what specificity is scored against.
SPECIFICITY_SCORERS: dict[str, str] = {"zsre": "gold_answer", "counterfact": "true_vs_new"}


@dataclass(frozen=True)
class MetricQuirks:
    """Switches for the official CounterFact scoring quirks; the defaults reproduce the paper."""

    cf_oldlabel_pad_zero: bool = True
    cf_minibatch_truncation: bool = True

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> MetricQuirks:
        """Build from a config mapping; unknown keys and non-boolean values are rejected."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown metric quirk(s) {unknown}; known: {sorted(known)}")
        for key, value in values.items():
            if not isinstance(value, bool):
                raise ValueError(f"metric quirk '{key}' must be true or false, got {value!r}")
        return cls(**values)

    def as_dict(self) -> dict[str, bool]:
        """The switches as a plain dict (recorded in every metric set)."""
        return asdict(self)


OFFICIAL_QUIRKS = MetricQuirks()
CORRECTED_QUIRKS = MetricQuirks(cf_oldlabel_pad_zero=False, cf_minibatch_truncation=False)


def _check_kind(kind: str) -> None:
    if kind not in PROTOCOLS:
        raise ValueError(f"kind must be one of {sorted(PROTOCOLS)}, got {kind!r}")


def _ratios(successes: torch.Tensor, counted: torch.Tensor) -> list[float]:
    """Per-row successes / counted positions, leaving out rows with nothing counted."""
    num = (successes & counted).sum(-1).double()
    den = counted.sum(-1).double()
    keep = den > 0
    return (num[keep] / den[keep]).tolist()


def _predicted(logits: torch.Tensor) -> torch.Tensor:
    """Argmax ids from logits (batch × width × vocab), or the ids themselves (batch × width, integer)."""
    return logits if logits.dim() == 2 and not logits.is_floating_point() else logits.argmax(-1)


def _zsre_scores(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Teacher-forced top-1 token accuracy per example."""
    scored = labels != IGNORE_INDEX
    return _ratios(_predicted(logits) == labels, scored)


def _counterfact_scores(
    logits: torch.Tensor, labels: torch.Tensor, old_labels: torch.Tensor, old_label_pad: int,
    quirks: MetricQuirks,
) -> list[float]:
    """Token-wise new-vs-old logit comparison per example, with the quirks as switched."""
    if not quirks.cf_oldlabel_pad_zero and old_label_pad != IGNORE_INDEX:
        raise ValueError(
            "cf_oldlabel_pad_zero=False needs old_labels padded with -100 "
            f"(make_turn(..., old_label_pad=-100)); this batch was padded with {old_label_pad}, "
            "so padding cannot be told apart from token id 0"
        )
    width_a, width_b = labels.shape[1], old_labels.shape[1]
    if quirks.cf_minibatch_truncation:
        width = min(width_a, width_b)
        logits, labels, old_labels = logits[:, :width], labels[:, :width], old_labels[:, :width]
    elif width_b >= width_a:
        old_labels = old_labels[:, :width_a]
    else:
        # Past the old_labels matrix there is no B token at all; mark it like corrected padding.
        tail = old_labels.new_full((old_labels.shape[0], width_a - width_b), IGNORE_INDEX)
        old_labels = torch.cat([old_labels, tail], dim=1)

    scored = labels != IGNORE_INDEX
    has_b = old_labels != IGNORE_INDEX
    if not quirks.cf_oldlabel_pad_zero:
        # With -100 padding, "no B token" is exactly old_labels == -100.
        counted = scored & has_b
    else:
        counted = scored
    # Where there is no B token, the official code compares against id 0 (its padding value).
    b_ids = torch.where(has_b, old_labels, torch.zeros_like(old_labels))
    a_ids = torch.where(scored, labels, torch.zeros_like(labels))
    logit_a = logits.gather(-1, a_ids.unsqueeze(-1)).squeeze(-1)
    logit_b = logits.gather(-1, b_ids.unsqueeze(-1)).squeeze(-1)
    return _ratios(logit_a > logit_b, counted)


def score_batch(
    logits: torch.Tensor,
    batch: MiniBatch,
    kind: Kind,
    *,
    quirks: MetricQuirks = OFFICIAL_QUIRKS,
) -> list[float]:
    """Score one LM mini-batch: one score in [0, 1] per example that has a scored position.

    ``logits`` is the model output on ``batch.input_ids``, shape (batch, width, vocab); for zsRE,
    whose score reads the argmax only, it may be the argmax ids (batch, width; see
    :func:`emsedit.models.answer_forward_many`'s ``argmax``). Examples with no scored position are
    left out, so the list can be shorter than the batch.
    """
    _check_kind(kind)
    labels = batch.labels.to(logits.device)
    ids = kind == "zsre" and logits.dim() == 2 and not logits.is_floating_point()
    if (logits.dim() != 3 and not ids) or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not fit labels of shape {tuple(labels.shape)}"
        )
    if kind == "zsre":
        return _zsre_scores(logits, labels)
    if batch.old_labels is None:
        raise ValueError("CounterFact scoring needs old_labels in the batch")
    return _counterfact_scores(
        logits, labels, batch.old_labels.to(logits.device), batch.old_label_pad, quirks
    )


def _percent(scores: Sequence[float]) -> float:
    """Mean of [0, 1] scores in percent; 0.0 for no scores (its count then says 0)."""
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def summarize(
    edit_scores: Sequence[float],
    equiv_scores: Sequence[float],
    unrel_scores: Sequence[float],
    kind: Kind,
    quirks: MetricQuirks = OFFICIAL_QUIRKS,
    owners: Mapping[str, Sequence[int]] | None = None,
    n_requests: int = 0,
) -> dict[str, Any]:
    """Aggregate per-example scores into one metric set (the result record's ``metric_set``).

    Returns ``efficacy``, ``generalization``, ``specificity`` and ``average`` = (E+G+S)/3 in
    percent, the ``counts`` each averages, the ``protocol`` and the ``scorer`` (what specificity is
    compared against, and the quirk switches). A metric with no examples is reported as 0.0 with
    count 0. With ``owners`` (per kind ``edit``/``equiv``/``unrel``, the request of each score,
    0..n_requests−1) it adds ``per_request``: per metric, each request's mean score in percent (None
    for a request without examples of that kind), in request order.
    """
    _check_kind(kind)
    efficacy, generalization, specificity = (
        _percent(edit_scores), _percent(equiv_scores), _percent(unrel_scores)
    )
    extra = {}
    if owners is not None:
        extra["per_request"] = {
            metric: _per_request(values, owners[name], n_requests)
            for metric, name, values in (("efficacy", "edit", edit_scores),
                                         ("generalization", "equiv", equiv_scores),
                                         ("specificity", "unrel", unrel_scores))
        }
    return {
        "efficacy": efficacy,
        "generalization": generalization,
        "specificity": specificity,
        "average": (efficacy + generalization + specificity) / 3.0,
        "counts": {
            "efficacy": len(edit_scores),
            "generalization": len(equiv_scores),
            "specificity": len(unrel_scores),
        },
        "protocol": PROTOCOLS[kind],
        "scorer": {"specificity": SPECIFICITY_SCORERS[kind], "quirks": quirks.as_dict()},
        **extra,
    }


def _per_request(values: Sequence[float], owners: Sequence[int], n_requests: int) -> list[float | None]:
    """Each request's mean of its values, in percent (None without values)."""
    if len(values) != len(owners):
        raise ValueError(f"{len(values)} scores but {len(owners)} owners")
    sums, counts = [0.0] * n_requests, [0] * n_requests
    for value, owner in zip(values, owners):
        sums[owner] += value
        counts[owner] += 1
    return [100.0 * s / c if c else None for s, c in zip(sums, counts)]


def answer_argmax(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Per row, the argmax token ids at its scored positions (``labels != -100``); ``logits`` may be
    the argmax ids already."""
    pred = _predicted(logits).cpu()
    scored = (labels != IGNORE_INDEX).cpu()
    return [row[keep].tolist() for row, keep in zip(pred, scored)]


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate_turns(
    model: torch.nn.Module,
    turns: Sequence[Turn],
    kind: Kind,
    quirks: MetricQuirks = OFFICIAL_QUIRKS,
    *,
    progress: bool = True,
    locality_argmax: list[list[list[int]]] | None = None,
    per_request: bool = True,
) -> dict[str, Any]:
    """Score a model on every mini-batch of the given turns and return :func:`summarize`'s dict.

    Runs under ``torch.inference_mode`` with the model in eval mode (its previous train/eval mode
    is restored afterwards). ``progress`` reports the batches scored (:mod:`emsedit.progress`).
    ``locality_argmax``, when given a list, receives one entry per turn: for every locality row (in
    mini-batch order, see ``Turn.sources``) the argmax token ids at its answer positions.
    With ``per_request`` (and turns that know their rows' requests, ``Turn.row_requests``) the
    metric set carries every request's scores, the requests numbered across the turns in order.
    """
    from emsedit.batching import passes
    from emsedit.models import answer_forward_many

    _check_kind(kind)
    scores: dict[str, list[float]] = {"edit": [], "equiv": [], "unrel": []}
    device = _model_device(model)
    # one turn's mini-batches of one kind, in joined passes (each replays or computes its lower layers once)
    lists = [(t, name, [b.to(device) for b in getattr(turn, name)])
             for t, turn in enumerate(turns) for name in scores]
    if locality_argmax is not None:
        locality_argmax.extend([] for _ in turns)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = Progress("evaluate", sum(len(batches) for *_, batches in lists), unit="batches", enabled=progress)
            for t, name, batches in lists:
                for group in passes(batches):
                    # zsRE scores read the argmax only: taken on the scored rows, not zero-filled logits
                    for logits, scored in answer_forward_many(model, group, argmax=kind == "zsre"):
                        scores[name].extend(score_batch(logits, scored, kind, quirks=quirks))
                        if locality_argmax is not None and name == "unrel":
                            locality_argmax[t].extend(answer_argmax(logits, scored.labels))
                    bar.update(len(group))
            bar.close()
    finally:
        model.train(was_training)
    owners = None
    rows = {name: [turn.row_requests(name) for turn in turns] for name in scores}
    if per_request and all(r is not None for per_turn in rows.values() for r in per_turn):
        starts = [sum(len(turn.requests) for turn in turns[:t]) for t in range(len(turns))]
        owners = {name: [start + r for start, per in zip(starts, per_turn) for r in per]
                  for name, per_turn in rows.items()}
    return summarize(scores["edit"], scores["equiv"], scores["unrel"], kind, quirks,
                     owners=owners, n_requests=sum(len(turn.requests) for turn in turns))
