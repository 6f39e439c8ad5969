"""A cell's metric set: the official teacher-forced scores and the views beyond them (issue 12).

:func:`evaluate_views` returns :func:`emsedit.metrics.evaluate_turns`'s metric set, whose official
keys and values are unchanged, with these additions (each with its ``count`` of prompts, its
``per_request`` values in edit order — the mean over that request's prompts, ``null`` for a
request without any — and its ``protocol``, ``teacher_forced`` or ``generated``; scores in percent,
means over prompts as the official scores, ``null`` when nothing was scored):

* ``portability`` (teacher-forced): token accuracy of the new answer given the new question (zsRE
  records with EasyEdit's ``portability`` field; count 0 otherwise), scored as the other zsRE tuples;
* ``locality`` (teacher-forced): per locality prompt, the share of its answer tokens whose argmax
  after editing equals the argmax of the unedited model, beside the gold-answer ``specificity``;
* ``generated`` (view ``generated``): greedy answers (:mod:`emsedit.generation`) scored by exact
  match and contains for ``efficacy`` (edit prompt vs new target), ``generalization`` (rephrases
  vs new target), ``portability`` (new question vs new answer), ``specificity`` (locality prompt vs
  its gold answer; CounterFact: the true answer), and ``locality``: the share of locality prompts
  whose (normalised) answer is the unedited model's.

Locality needs the unedited model's outputs: the unedited evaluation (``reference=None``) adds them
as ``locality_reference`` (argmax ids and generated answer per locality prompt, per request), which
the ``evaluate`` record carries to the runs that reuse it; against itself it scores 100.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emsedit.batching import collate_pairs, passes
from emsedit.config import PROMPT_FORMATS, ConfigError
from emsedit.data import MiniBatch, Turn
from emsedit.generation import DEFAULT_MARGIN, NORMALIZATION, contains, exact_match, generate_answers, normalize_answer
from emsedit.metrics import OFFICIAL_QUIRKS, MetricQuirks, evaluate_turns, score_batch
from emsedit.progress import Progress
from emsedit.timing import PhaseTimer

__all__ = ["METRIC_VIEWS", "EvalSettings", "Probes", "parse_metric_views", "build_probes", "evaluate_views"]

#: The metric views a cell can compute; the teacher-forced one holds the official scores.
METRIC_VIEWS = ("teacher_forced", "generated")
_GENERATED = ("efficacy", "generalization", "portability", "specificity")


def parse_metric_views(value: str | Sequence[str]) -> tuple[str, ...]:
    """``teacher_forced`` or ``teacher_forced,generated`` (a string or a list) -> the views, in
    canonical order. Unknown names, and a set without the official teacher-forced view, are a
    :class:`ConfigError`."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in METRIC_VIEWS]
    if unknown:
        raise ConfigError(f"unknown metric view(s) {', '.join(map(repr, unknown))} (known: {', '.join(METRIC_VIEWS)})")
    if "teacher_forced" not in names:
        raise ConfigError("the metric views must include teacher_forced (the official scores every record carries)")
    return tuple(v for v in METRIC_VIEWS if v in names)


@dataclass(frozen=True)
class EvalSettings:
    """Which views a cell computes, and how it generates (recorded as ``config.eval_metrics``)."""

    views: tuple[str, ...] = METRIC_VIEWS
    prompt_format: str = "plain"
    margin: int = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "views", parse_metric_views(self.views))
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"unknown prompt format {self.prompt_format!r} (known: {', '.join(PROMPT_FORMATS)})")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ConfigError(f"the generation margin must be an integer >= 0, got {self.margin!r}")

    @property
    def generated(self) -> bool:
        return "generated" in self.views

    def as_dict(self) -> dict[str, Any]:
        return {"views": list(self.views), "prompt_format": self.prompt_format, "generation_margin": self.margin}


@dataclass
class Probes:
    """What the views score beyond the turns' mini-batches, built once per cell (so that the prefix
    cache replays the portability mini-batches after editing)."""

    n_requests: int
    #: per turn: for each locality tuple in request order, its (request in edit order, prompt index)
    locality: list[list[tuple[int, int]]] = field(default_factory=list)
    #: per turn: the portability mini-batches and, per row in batch order, its (request, prompt index)
    portability: list[tuple[list[MiniBatch], list[tuple[int, int]]]] = field(default_factory=list)
    #: generated metric -> (request, prompt index, prompt, gold answer), in edit order
    generation: dict[str, list[tuple[int, int, str, str]]] = field(default_factory=dict)


def build_probes(turns: Sequence[Turn], tokenizer: Any, *, lm_batch_size: int = 4,
                 device: torch.device | str = "cpu") -> Probes:
    """Collect the locality owners, portability mini-batches and generation prompts of eval turns."""
    probes = Probes(n_requests=sum(len(t.requests) for t in turns),
                    generation={name: [] for name in _GENERATED})
    offset = 0
    for turn in turns:
        probes.locality.append([(offset + r, j) for r, req in enumerate(turn.requests)
                                for j in range(len(req.loc_prompts))])
        owners = [(offset + r, j) for r, req in enumerate(turn.requests) for j in range(len(req.portability))]
        batches, order = collate_pairs([pair for req in turn.requests for pair in req.portability], tokenizer,
                                       lm_batch_size=lm_batch_size)
        probes.portability.append(([b.to(device) for b in batches], [owners[i] for i in order]))
        for r, req in enumerate(turn.requests):
            gen = probes.generation
            gen["efficacy"].append((offset + r, 0, req.prompt, req.target))
            gen["generalization"] += [(offset + r, j, q, req.target) for j, q in enumerate(req.rephrases)]
            gen["portability"] += [(offset + r, j, q, a) for j, (q, a) in enumerate(req.portability)]
            gen["specificity"] += [(offset + r, j, q, req.loc_answer) for j, q in enumerate(req.loc_prompts)]
        offset += len(turn.requests)
    return probes


def _block(values: Sequence[tuple[tuple[int, int], float]], n_requests: int) -> tuple[float | None, int, list]:
    """(score in percent or None, count, per-request percent or None) of per-prompt [0, 1] values."""
    per: list[list[float]] = [[] for _ in range(n_requests)]
    for (r, _j), v in values:
        per[r].append(v)
    score = 100.0 * sum(v for _, v in values) / len(values) if values else None
    return score, len(values), [100.0 * sum(p) / len(p) if p else None for p in per]


def _scored(values: Sequence[tuple[tuple[int, int], float]], n_requests: int, protocol: str,
            scorer: str) -> dict[str, Any]:
    score, count, per_request = _block(values, n_requests)
    return {"score": score, "count": count, "per_request": per_request, "protocol": protocol, "scorer": scorer}


def _nested(flat: dict[tuple[int, int], Any], n_requests: int) -> list[list[Any]]:
    """{(request, prompt index): x} -> per request, the list of x in prompt order."""
    out: list[list[Any]] = [[] for _ in range(n_requests)]
    for (r, _j), x in sorted(flat.items()):
        out[r].append(x)
    return out


def _portability_tf(model: Any, probes: Probes) -> list[tuple[tuple[int, int], float]]:
    from emsedit.models import answer_forward_many

    values = []
    for batches, owners in probes.portability:
        rows: list[float] = []  # every tuple has an answer token, so each row gets a score
        for group in passes(batches):
            for logits, scored in answer_forward_many(model, group):
                rows += score_batch(logits, scored, "zsre")
        values += list(zip(owners, rows, strict=True))
    return values


def _generated(model: Any, tokenizer: Any, probes: Probes, settings: EvalSettings,
               reference: list[list[str]] | None, progress: bool) -> tuple[dict[str, Any], dict]:
    items = [(name, *item) for name in _GENERATED for item in probes.generation[name]]
    bar = Progress("generate", len(items), unit="prompts", enabled=progress)
    answers = generate_answers(model, tokenizer, [it[3] for it in items], [it[4] for it in items],
                               prompt_format=settings.prompt_format, margin=settings.margin, on_batch=bar.update)
    bar.close()
    block: dict[str, Any] = {"protocol": "generated", "prompt_format": settings.prompt_format,
                             "max_new_tokens": f"gold answer tokens + {settings.margin}",
                             "stop": "end of sequence, newline or sentence end", "normalization": NORMALIZATION}
    loc_answers: dict[tuple[int, int], str] = {}
    for name in _GENERATED:
        mine = [(it[1:3], ans, it[4]) for it, ans in zip(items, answers) if it[0] == name]
        em_score, count, em_per = _block([(k, float(exact_match(a, g))) for k, a, g in mine], probes.n_requests)
        in_score, _, in_per = _block([(k, float(contains(a, g))) for k, a, g in mine], probes.n_requests)
        block[name] = {"exact_match": em_score, "contains": in_score, "count": count,
                       "per_request": {"exact_match": em_per, "contains": in_per}}
        if name == "specificity":
            loc_answers = {k: a for k, a, _ in mine}
    if reference is None:
        reference = _nested(loc_answers, probes.n_requests)
    same = [(k, float(normalize_answer(a) == normalize_answer(reference[k[0]][k[1]]))) for k, a in loc_answers.items()]
    block["locality"] = _scored(same, probes.n_requests, "generated", "unedited_generation")
    return block, {"generated": _nested(loc_answers, probes.n_requests)}


def evaluate_views(model: Any, tokenizer: Any, turns: Sequence[Turn], probes: Probes, kind: str,
                   quirks: MetricQuirks = OFFICIAL_QUIRKS, settings: EvalSettings = EvalSettings(),
                   reference: dict[str, Any] | None = None, *, progress: bool = True,
                   timer: PhaseTimer | None = None, phase: str = "generate") -> dict[str, Any]:
    """The metric set of the views in ``settings`` (see the module docstring).

    ``reference`` is the unedited evaluation's ``locality_reference``; without it this is the
    unedited evaluation, which scores locality against itself and adds its ``locality_reference``.
    Generation is timed under ``phase`` when a ``timer`` is given.
    """
    unedited = reference is None
    argmax_rows: list[list[list[int]]] = []
    was_training = model.training
    metrics = evaluate_turns(model, turns, kind, quirks, progress=progress, locality_argmax=argmax_rows)
    model.eval()
    try:
        with torch.inference_mode():
            argmax = {probes.locality[t][src]: ids for t, turn in enumerate(turns)
                      for src, ids in zip(turn.sources["unrel"], argmax_rows[t])}
            before = _nested(argmax, probes.n_requests) if unedited else reference["teacher_forced"]
            agree = []
            for (r, j), ids in argmax.items():
                old = before[r][j]
                if len(old) != len(ids):
                    raise ValueError("the unedited locality reference does not fit these requests")
                agree.append(((r, j), sum(a == b for a, b in zip(ids, old)) / len(ids)))
            metrics["portability"] = _scored(_portability_tf(model, probes), probes.n_requests,
                                             "teacher_forced", "new_answer")
            metrics["locality"] = _scored(agree, probes.n_requests, "teacher_forced", "unedited_argmax")
            own = {"teacher_forced": _nested(argmax, probes.n_requests)}
            if settings.generated:
                with timer.phase(phase) if timer is not None else contextlib.nullcontext():
                    metrics["generated"], answers = _generated(model, tokenizer, probes, settings,
                                                               None if unedited else reference["generated"],
                                                               progress)
                own.update(answers)
    finally:
        model.train(was_training)
    if unedited:
        metrics["locality_reference"] = own
    return metrics
