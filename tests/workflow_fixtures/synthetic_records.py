"""Write schema-valid synthetic result records for every cell of a workflow config.

Stands in for `python -m emsedit run` so the aggregation -> tables -> notebooks -> claims -> report
path can be tested without models. The numbers follow a planted pattern (MSBP helps, S = 2 is best
and S >= 3 costs specificity, l2 trains ~35 % faster than KL at the same quality, step-specific
beats shared, EMSEdit is data-efficient and beats the baselines) plus seeded noise, so the claims
have known answers. Each metric carries per-request scores in edit order (``per_request``): a
request's difficulty, shared by every cell on the same edit order (and its unedited scores), plus
the cell's noise; the aggregate score is their mean, as in a real record.

Beside the official scores, records carry the views of issue 12 (workflow/schemas/result.schema.yaml):
teacher-forced ``portability`` (zsRE; CounterFact: null, count 0, as with no portability data) and
``locality``, and, when the config's ``eval_metrics`` holds ``generated`` (the default), a
``generated`` block whose exact match is 100 for a request whose teacher-forced score reaches the
metric's threshold (GENERATED_THRESHOLD) and 0 otherwise: a 0/100 score per prompt, as greedy answers
give, and claims that can come out differently on the two views.

Usage: python tests/workflow_fixtures/synthetic_records.py CONFIG.yaml WORKDIR [--noise SD]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import grid  # noqa: E402

BASE = {"emsedit": 78.0, "rledit": 66.0, "malmen": 60.0, "mend": 52.0, "ultraedit": 64.0}
S1_BASE = {"emsedit": 70.0}  # EMSEdit with a single step


def quality(cell: grid.Cell) -> dict:
    """Efficacy, generalization, specificity after editing, with the planted effects (noise-free)."""
    q = S1_BASE.get(cell.editor, BASE[cell.editor]) if cell.steps == 1 else BASE[cell.editor]
    if cell.editor != "emsedit" and cell.steps >= 2:
        q += 8.0  # MSBP helps baselines
    if cell.steps >= 3:
        q -= 6.0 * (cell.steps - 2)
    if cell.hypernetworks == "shared" and cell.protocol == "sequential":
        q -= 4.0
    if cell.train_turns != "default":
        t = int(cell.train_turns)
        q += (1.0 if cell.editor == "emsedit" else 4.0) * math.log2(t)
    if cell.variant != grid.FAITHFUL:
        q += 2.0
    spec = 55.0 - (7.0 * (cell.steps - 2) if cell.steps >= 3 else 0.0)
    return {"efficacy": q + 10, "generalization": q, "specificity": spec, "portability": q - 30,
            "locality": spec + 35}


def difficulty(cell: grid.Cell) -> dict:
    """Per metric, each request's offset from the cell's score: fixed by the edit order (dataset,
    model, size, seed), so every cell on that order (and its unedited evaluation) shares it."""
    rng = random.Random(f"{cell.dataset}/{cell.model}/{cell.n}/{cell.seed}/requests")
    return {m: [rng.uniform(-8.0, 8.0) for _ in range(cell.n)]
            for m in ("efficacy", "generalization", "specificity", "portability", "locality")}


def per_request(vals: dict, offsets: dict, rng: random.Random, noise: float) -> dict:
    """Per metric, the per-request scores in edit order: score + the request's offset + noise, in 0..100."""
    return {m: [round(min(100.0, max(0.0, v + o + rng.gauss(0, noise))), 4) for o in offsets[m]] for m, v in vals.items()}


# The teacher-forced score from which a request's greedy answer is exact (contains: 10 points less).
GENERATED_THRESHOLD = {"efficacy": 75.0, "generalization": 65.0, "portability": 40.0, "specificity": 50.0}
DEFAULT_VIEWS = ["teacher_forced", "generated"]


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


def probe(per: list, protocol: str, scorer: str) -> dict:
    """A portability or locality block (schema probe_score); all-null per-request scores give a
    null score with count 0, as a record of data without portability questions."""
    count = sum(v is not None for v in per)
    return {"score": _mean(per), "count": count, "per_request": per, "protocol": protocol, "scorer": scorer}


def generated(per: dict, locality: list) -> dict:
    """The generated block (schema generated) from the teacher-forced per-request scores: exact
    match 100 where the score reaches GENERATED_THRESHOLD, contains 10 points below it."""
    out = {"protocol": "generated", "prompt_format": "plain"}
    for m, threshold in GENERATED_THRESHOLD.items():
        em = [None if v is None else (100.0 if v >= threshold else 0.0) for v in per[m]]
        hit = [None if v is None else (100.0 if v >= threshold - 10 else 0.0) for v in per[m]]
        out[m] = {"exact_match": _mean(em), "contains": _mean(hit), "count": sum(v is not None for v in em),
                  "per_request": {"exact_match": em, "contains": hit}}
    unchanged = [100.0 if v >= 85.0 else 0.0 for v in locality]
    out["locality"] = probe(unchanged, "generated", "unedited_generation")
    return out


def metric_set(per: dict, n: int, kind: str, views: list[str]) -> dict:
    """The official scores from per-request ones (their mean, as a real record), then the views of
    issue 12: portability (null for CounterFact) and locality, and the generated block with ``views``."""
    official = {m: per[m] for m in ("efficacy", "generalization", "specificity")}
    out = {k: round(sum(v) / len(v), 4) for k, v in official.items()}  # the aggregate is the per-request mean
    out["average"] = round(sum(out.values()) / 3, 4)
    out["per_request"] = official
    out["counts"] = {"efficacy": n, "generalization": n, "specificity": n}
    out["protocol"] = "teacher_forced_token_acc" if kind == "zsre" else "prob_new_gt_old"
    out["scorer"] = {"specificity_against": "pre_edit_predictions", "quirks": []}
    portability = per["portability"] if kind == "zsre" else [None] * n
    out["portability"] = probe(portability, "teacher_forced", "new_answer")
    out["locality"] = probe(per["locality"], "teacher_forced", "unedited_argmax")
    if "generated" in views:
        out["generated"] = generated({**official, "portability": portability}, per["locality"])
    return out


def timings(cell: grid.Cell, rng: random.Random) -> dict:
    train = 1 if cell.train_turns == "default" else int(cell.train_turns)
    work = cell.edits * cell.steps * max(1, train) * 0.01 * (1 + 0.05 * rng.random())
    phases = {"train_cache": 0.25 * work, "train_predict_shift": 0.15 * work, "train_edit_loss": 0.2 * work,
              "train_locality_loss": (0.45 if cell.loss == "kl" else 0.05) * work, "train_hypernet_update": 0.08 * work}
    t = {"load_model": 1.0 + 0.1 * rng.random(), **phases}
    t["train_total"] = sum(phases.values()) * 1.02
    t["edit_cache"], t["edit_predict_shift"], t["edit_apply"] = 0.002 * cell.n, 0.001 * cell.n, 0.0005 * cell.n
    t["edit_total"] = t["edit_cache"] + t["edit_predict_shift"] + t["edit_apply"]
    t["evaluate_pre"], t["evaluate_post"] = 0.0, 0.004 * cell.n
    t["total"] = t["load_model"] + t["train_total"] + t["edit_total"] + t["evaluate_post"]
    return {k: round(v, 6) for k, v in t.items()}


def pre_quality(cell: grid.Cell, rng: random.Random) -> dict:
    return {"efficacy": 20 + rng.random(), "generalization": 18 + rng.random(), "specificity": 100.0,
            "portability": 15 + rng.random(), "locality": 100.0}


def record(cell: grid.Cell, config: dict, noise: float) -> dict:
    rng = random.Random(f"{cell.path}/12345")  # str seeds are stable across processes; hash() is not
    kind = "counterfact" if "counterfact" in cell.dataset else "zsre"
    order_rng = random.Random(cell.seed)
    edit_order = order_rng.sample(range(10 * cell.n + 10), cell.n)
    # pre scores depend only on (dataset, model, n, seed): the shared unedited evaluation
    pre_rng = random.Random(f"{cell.dataset}/{cell.model}/{cell.n}/{cell.seed}")
    offsets = difficulty(cell)
    views = list(config.get("eval_metrics") or DEFAULT_VIEWS)
    return {
        "schema_version": 1,
        "kind": "run",
        "config": {
            "editor": {"name": cell.editor, **grid.variant_overrides(config, cell.variant, cell.editor)},
            "model": {"name": cell.model}, "dataset": {"name": cell.dataset, "kind": kind},
            "protocol": cell.protocol, "turns": cell.turns, "edits": cell.edits, "steps": cell.steps,
            "loss": cell.loss, "seed": cell.seed, "train_turns": None if cell.train_turns == "default" else int(cell.train_turns),
            "hypernetworks": cell.hypernetworks, "tags": {"variant": cell.variant, "synthetic": "true"},
            "eval_metrics": {"views": views, "prompt_format": "plain", "generation_margin": 5},
        },
        "edit_order": edit_order,
        "train_order": list(range(cell.n)),
        "metrics": {"pre": metric_set(per_request(pre_quality(cell, pre_rng), {**offsets, "locality": [0.0] * cell.n},
                                                  pre_rng, 0.0), cell.n, kind, views),
                    "post": metric_set(per_request(quality(cell), offsets, rng, noise), cell.n, kind, views)},
        "training": {"optimizer_steps": 1, "skipped_nonfinite": 0, "train_turns": cell.train_turns},
        "timings": timings(cell, rng),
        "peak_rss_mb": round(600 + 3.0 * cell.edits + 0.5 * cell.n + rng.random(), 3),
        "versions": {"python": "3.11", "torch": "synthetic", "transformers": "synthetic", "emsedit": "synthetic"},
        "git_commit": None,
        "created": "2026-01-01T00:00:00+00:00",
    }


def write_records(config_path: str | Path, workdir: str | Path, noise: float = 1.0) -> list[Path]:
    """Write one record per cell of the config under WORKDIR; returns the paths."""
    with open(config_path) as fh:
        config = yaml.safe_load(fh)
    written = []
    for cell in grid.unique_cells(grid.expand(config)):
        path = Path(workdir) / cell.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record(cell, config, noise), indent=1))
        written.append(path)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("workdir")
    ap.add_argument("--noise", type=float, default=1.0)
    args = ap.parse_args()
    print(f"wrote {len(write_records(args.config, args.workdir, args.noise))} records")
