"""From result records to the long ``cells`` frame, and the labels and helpers the studies share.

``cells`` has one row per (study, variant label, cell): the cell's keys, its seed, the record's
metrics and timings as flat columns, and the editor's label as the tables print it. The paper's
numbers (resources/reference/*.csv) are looked up under its own model and dataset names, mapped from
ours through config ``paper``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from emsedit.registry import REPO_CONFIG_DIR, workflow_declarations
from studies import GENERATED_METRICS, GENERATED_PREFIX, METRICS, PROBES, QUALITY  # declared once, with the studies

TIMING_KEYS = [
    "load_model", "train_lower_layers", "train_cache", "train_predict_shift", "train_edit_loss", "train_locality_loss",
    "train_hypernet_update", "train_total", "edit_cache", "edit_predict_shift", "edit_apply",
    "edit_total", "evaluate_pre", "evaluate_post", "total",
]
# The editors' declarations (label, own S and loss: config/editors/<name>.yaml, emsedit/registry.py),
# read on first use from the repository's config/ or, after use_editors(config_dir), the workflow's.
_EDITORS: dict = {}
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
OWN = "own"  # a cell's own Adam iterations; "S<k>" marks an S = 1 control with the iterations of S = k


# --- labels and the paper's names -----------------------------------------------------------------


def use_editors(config_dir: str | Path) -> None:
    """Read the editor declarations of a workflow's config_dir (the repository's plus its own)."""
    _EDITORS.clear()
    _EDITORS.update(workflow_declarations(config_dir))


def editor_decl(editor: str):
    """The declaration of one editor (its label, own S and own loss)."""
    if not _EDITORS:
        use_editors(REPO_CONFIG_DIR)
    try:
        return _EDITORS[editor]
    except KeyError:
        raise ValueError(f"unknown editor {editor!r} in the records; declared: {sorted(_EDITORS)}") from None


def editor_label(editor: str, steps: int, loss: str, iterations: str = OWN) -> str:
    """The paper's name for an editor setting: RLEdit, RLEdit² (S = 2), EMSEdit (KL), ...; an
    iteration-matched control reads "MALMEN (S=1, iterations of S=2)"."""
    decl = editor_decl(editor)
    name = decl.label
    if iterations != OWN:
        base = editor_label(editor, 1, loss)
        return f"{base} (S=1, iterations of S={iterations.removeprefix('S')})"
    if steps != decl.steps:
        name = name + str(steps).translate(SUPERSCRIPTS) if decl.steps == 1 else f"{name} (S={steps})"
    if loss != decl.loss:
        name += f" ({loss.upper()})"
    return name


def paper_model(model: str, paper: dict) -> str:
    return (paper.get("models") or {}).get(model, paper.get("default_model", "LLaMA-3"))


def paper_dataset(dataset: str, paper: dict) -> str | None:
    return (paper.get("datasets") or {}).get(dataset)


def load_reference(reference_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The paper's numbers: file stem (main, sweeps, ...) -> frame."""
    return {p.stem.removeprefix("paper_"): pd.read_csv(p) for p in sorted(Path(reference_dir).glob("paper_*.csv"))}


def paper_value(ref: pd.DataFrame, **where) -> float:
    """The paper's value in a reference frame at the row matching ``where`` (NaN if none)."""
    sel = ref
    for key, value in where.items():
        sel = sel[sel[key].astype(str) == str(value)]
    return float(sel["value"].iloc[0]) if len(sel) else float("nan")


def setting(protocol: str, turns, edits) -> str:
    """A cell's size as the tables print it: edits (batch) or turns×edits (sequential)."""
    return f"{int(edits)}" if protocol == "batch" else f"{int(turns)}×{int(edits)}"


# --- aggregation ----------------------------------------------------------------------------------


class RecordError(ValueError):
    """A result record that is malformed, non-finite, or not the cell its path names."""


class NoPerRequestScores(RecordError):
    """A record written before records carried per-request scores."""


def _check_record(record: dict, cell: dict, path: str, validator) -> None:
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(map(str, errors[0].absolute_path))
        raise RecordError(f"{path}: does not match the result schema at {where or '(top)'}: {errors[0].message}")
    if record["kind"] != "run" or "post" not in record["metrics"]:
        raise RecordError(f"{path}: expected a 'run' record with metrics.post")
    cfg = record["config"]
    expected = {
        "editor": (cfg.get("editor") or {}).get("name") if isinstance(cfg.get("editor"), dict) else cfg.get("editor"),
        "protocol": cfg.get("protocol"), "steps": cfg.get("steps"), "loss": cfg.get("loss"), "seed": cfg.get("seed"),
    }
    for key, got in expected.items():
        if got is not None and str(got) != str(cell[key]):
            raise RecordError(f"{path}: record has {key}={got!r} but its path says {cell[key]!r} (stale file?)")
    for phase in ("pre", "post"):
        for metric in METRICS:
            value = record["metrics"][phase][metric]
            if not math.isfinite(value):
                raise RecordError(f"{path}: metrics.{phase}.{metric} is not finite")


# --- per-request scores ---------------------------------------------------------------------------

# Where each view's per-request scores sit in a record, under record["metrics"][phase]: view -> metric
# -> the keys leading to a list of floats (percent, 0..100, null for a request with no prompt), one
# per edit request in edit order. The one definition every reader goes through (:func:`per_request`);
# a new view or metric is one entry here, e.g. "portability": ("portability", "per_request").
PER_REQUEST_VIEWS: dict[str, dict[str, tuple[str, ...]]] = {
    "teacher_forced": {m: ("per_request", m) for m in QUALITY},  # the official scores
    "generated": {m: ("generated", m, "per_request", "exact_match") for m in QUALITY},  # greedy answers
}
REQUIRED_VIEW = "teacher_forced"  # records without it are refused (older than per-request scores)


def per_request(record: dict, phase: str, metric: str, view: str = REQUIRED_VIEW) -> list[float] | None:
    """The per-request scores of ``metric`` in ``view`` at ``phase`` (pre/post), NaN for a request
    with none, or None when the record lacks them."""
    node = record["metrics"].get(phase)
    for key in PER_REQUEST_VIEWS[view][metric]:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if not isinstance(node, list):
        return None
    return [float("nan") if v is None else float(v) for v in node]


def request_rows(record: dict, path: str) -> list[dict]:
    """One row per (view, metric, edit request) of a run record: its pre and post score. The
    required view must be there with one value per edited request; other views when present."""
    order = record.get("edit_order") or []
    rows = []
    for view, metrics in PER_REQUEST_VIEWS.items():
        for metric in metrics:
            pre, post = per_request(record, "pre", metric, view), per_request(record, "post", metric, view)
            if pre is None or post is None:
                if view != REQUIRED_VIEW:
                    continue
                missing = ".".join(("metrics", "pre" if pre is None else "post", *PER_REQUEST_VIEWS[view][metric]))
                raise NoPerRequestScores(f"{path}: no {missing}")
            if not (len(pre) == len(post) == len(order)):
                raise RecordError(f"{path}: {view} {metric} has {len(pre)} pre and {len(post)} post per-request "
                                  f"scores for {len(order)} edited requests")
            rows += [{"path": path, "seed": record["config"]["seed"], "view": view, "metric": metric,
                      "position": i, "request": r, "pre": a, "post": b}
                     for i, (r, a, b) in enumerate(zip(order, pre, post))]
    return rows


# Where the aggregate scores of the views beyond the official metrics sit under
# record["metrics"][phase]: table column -> keys. A record without the block leaves the column out
# (so tables without a view's records show no such columns); a null score (count 0, e.g. no
# portability data) reads NaN. generated_average is the mean of the three generated quality scores.
VIEW_SCORES: dict[str, tuple[str, ...]] = {
    **{p: (p, "score") for p in PROBES},  # teacher-forced portability and locality
    **{GENERATED_PREFIX + m: ("generated", m, "exact_match") for m in QUALITY},  # greedy answers
}


def view_scores(metrics: dict) -> dict[str, float]:
    """The VIEW_SCORES columns one metric set carries (NaN for a null score)."""
    out = {}
    for column, keys in VIEW_SCORES.items():
        node = metrics
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, (int, float)):
            out[column] = float(node)
        elif isinstance(metrics.get(keys[0]), dict):  # the block is there, its score null
            out[column] = float("nan")
    generated = [out.get(GENERATED_PREFIX + m) for m in QUALITY]
    if all(v is not None for v in generated):
        out[GENERATED_PREFIX + "average"] = float(np.mean(generated))
    return out


def view_metrics(frame: pd.DataFrame, prefix: str = "post_") -> list[str]:
    """The metrics the tables report for these cells: the official METRICS, then PROBES and the
    generated view's metrics where the records carry them (column ``<prefix><metric>`` present)."""
    return [*METRICS, *(m for m in (*PROBES, *GENERATED_METRICS) if f"{prefix}{m}" in frame)]


def metric_columns(metrics: list[str], paper: bool = True) -> list[str]:
    """Each metric's mean and 95% CI columns, with the paper's value (``paper``) beside the official
    METRICS only (the paper reports teacher-forced scores)."""
    return [c for m in metrics for c in (f"{m}_mean", f"{m}_ci95", *([f"{m}_paper"] if paper and m in METRICS else []))]


def flatten_record(record: dict) -> dict:
    """The numbers of one record as flat columns: pre_*/post_* metrics (the official ones, then
    VIEW_SCORES where present), t_* timings, memory, training."""
    row = {}
    for phase in ("pre", "post"):
        for metric in METRICS:
            row[f"{phase}_{metric}"] = float(record["metrics"][phase][metric])
        row.update({f"{phase}_{k}": v for k, v in view_scores(record["metrics"][phase]).items()})
    timings = record.get("timings") or {}
    for key in TIMING_KEYS:
        row[f"t_{key}"] = float(timings[key]) if key in timings else np.nan
    row["peak_rss_mb"] = float(record["peak_rss_mb"])
    row["gpu_peak_mb"] = np.nan if record.get("gpu_peak_mb") is None else float(record["gpu_peak_mb"])
    row["code_digest"] = record.get("code_digest") or ""
    training = record.get("training") or {}
    row["optimizer_steps"] = training.get("optimizer_steps", np.nan)
    row["adam_iterations"] = training.get("adam_iterations", np.nan)
    row["skipped_nonfinite"] = training.get("skipped_nonfinite", np.nan)
    return row


def check_one_code(digests: dict[str, str | None], current: str) -> None:
    """Refuse records made by different library code (``code_digest``; None for records older than
    the field): name the records whose digest is not the current code's and the command that reruns
    them. Records that all share one digest pass, even an older one: nothing is mixed."""
    if len(set(digests.values())) <= 1:
        return
    stale = sorted(path for path, digest in digests.items() if digest != current)
    if not stale:  # mixed, but none is the current code's: rerun all but the most common digest
        common = max(set(digests.values()), key=list(digests.values()).count)
        stale = sorted(path for path, digest in digests.items() if digest != common)
    shown = {d or "none": sum(1 for v in digests.values() if v == d) for d in set(digests.values())}
    raise RecordError(
        f"records of {len(shown)} different code digests ({shown}; current code: {current}): rerun the "
        f"{len(stale)} records not made by the current code with `snakemake <your usual options> "
        f"--forcerun {' '.join(stale)}`, or set `allow_mixed_code: true` in the config to aggregate them as they are")


REQUEST_COLUMNS = ["path", "seed", "view", "metric", "position", "request", "pre", "post"]


def aggregate(membership: Iterable[dict], schema: dict, *, allow_mixed_code: bool = False) -> pd.DataFrame:
    """The ``cells`` frame of :func:`aggregate_records`."""
    return aggregate_records(membership, schema, allow_mixed_code=allow_mixed_code)[0]


def aggregate_records(membership: Iterable[dict], schema: dict, *,
                      allow_mixed_code: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read, validate and flatten every record named by the membership rows; unless
    ``allow_mixed_code``, they must all come from one library code (:func:`check_one_code`).
    Returns ``cells`` (one row per membership row) and ``requests`` (one row per record, view,
    metric and edit request: :func:`request_rows`, keyed by the record's ``path``)."""
    import jsonschema

    from emsedit.records import code_digest

    validator = jsonschema.Draft202012Validator(schema)
    cache: dict[str, dict] = {}
    digests: dict[str, str | None] = {}
    rows, requests, unscored = [], [], []
    for cell in membership:
        path = cell["path"]
        if path not in cache:
            with open(path) as fh:
                record = json.load(fh)
            _check_record(record, cell, path, validator)
            cache[path] = flatten_record(record)
            try:
                requests += request_rows(record, path)
            except NoPerRequestScores:
                unscored.append(path)
            digests[path] = record.get("code_digest")
        rows.append({**cell, **cache[path]})
    if unscored:  # the claims test request by request: refuse, naming every such file and the rerun
        raise NoPerRequestScores(
            f"{len(unscored)} records have no per-request scores (metrics.pre/post.per_request; written "
            f"before records carried them): {', '.join(unscored)}; regenerate them with "
            f"`snakemake <your usual options> --forcerun {' '.join(unscored)}`")
    if not allow_mixed_code:
        check_one_code(digests, code_digest())
    frame = pd.DataFrame(rows)
    if not frame.empty:
        if "iterations" not in frame:
            frame["iterations"] = OWN
        frame["label"] = [editor_label(e, int(s), l, i) for e, s, l, i in
                          zip(frame.editor, frame.steps, frame.loss, frame.iterations)]
    return frame, pd.DataFrame(requests, columns=REQUEST_COLUMNS)


# --- frame helpers --------------------------------------------------------------------------------


def study(cells: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of one study."""
    return cells[cells["study"] == name].copy()


def own(frame: pd.DataFrame) -> pd.DataFrame:
    """The cells that run with their own Adam iterations (no iteration-matched controls)."""
    return frame[frame["iterations"] == OWN] if "iterations" in frame else frame


def control_for(group: pd.DataFrame, base: pd.DataFrame, other: pd.DataFrame, steps: int) -> tuple[pd.DataFrame, str]:
    """The iteration-matched control of S = ``steps`` within ``group``: its control cells, or the
    S = 1 cells themselves when the records show both settings took the same Adam iterations;
    otherwise empty. The second value says which."""
    control = group[group["iterations"] == f"S{steps}"] if "iterations" in group else group.iloc[:0]
    if len(control):
        return control, "control cells"
    a, b = base.get("adam_iterations"), other.get("adam_iterations")
    if a is not None and b is not None and len(a) and len(b) and a.notna().all() and b.notna().all() \
            and set(a.astype(int)) == set(b.astype(int)):
        return base, "same iterations as S=1"
    return group.iloc[:0], "no control"
