"""Aggregation, statistics, tables and claims for the EMSEdit workflow.

Pure functions over pandas frames; the rule scripts (aggregate.py, make_table.py, claims.py) are
thin wrappers, and the tests call these directly. Conventions:
- `cells` is the long table the aggregate rule writes: one row per (study, variant label, cell),
  with the cell's keys, its seed, and the record's metrics and timings flattened.
- Our numbers are mean and 95% t-interval half-width over seeds; differences are paired by seed
  (a seed fixes the edit order, so both methods saw the same edits).
- The paper's numbers come from resources/reference/*.csv, mapped from our model and dataset names
  through config `paper`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats

import studies
from emsedit.registry import REPO_CONFIG_DIR, workflow_declarations

METRICS = ["efficacy", "generalization", "specificity", "average"]
QUALITY = ["efficacy", "generalization", "specificity"]
PHASES = {
    # our timing key -> the paper's pie slice (paper_time_breakdown.csv)
    "train_cache": "Cache ∇W (forward/backward on edits, save keys/grads)",
    "train_predict_shift": "Compute ΔW (hypernet + solve)",
    "train_edit_loss": "Compute L_e and BP",
    "train_locality_loss": "Compute L_loc (KL) and BP",
    "train_hypernet_update": "Update f",
}
TIMING_KEYS = [
    "load_model", "train_cache", "train_predict_shift", "train_edit_loss", "train_locality_loss",
    "train_hypernet_update", "train_total", "edit_cache", "edit_predict_shift", "edit_apply",
    "edit_total", "evaluate_pre", "evaluate_post", "total",
]
# The editors' declarations (label, own S and loss: config/editors/<name>.yaml, emsedit/registry.py),
# read on first use from the repository's config/ or, after use_editors(config_dir), the workflow's.
_EDITORS: dict = {}
SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
OWN = "own"  # a cell's own Adam iterations; "S<k>" marks an S = 1 control with the iterations of S = k
CELL_COLUMNS = ["dataset", "model", "protocol", "editor", "steps", "iterations", "loss", "hypernetworks",
                "turns", "edits", "train_turns", "variant"]


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


# --- aggregation ---------------------------------------------------------------------------------


class RecordError(ValueError):
    """A result record that is malformed, non-finite, or not the cell its path names."""


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


def flatten_record(record: dict) -> dict:
    """The numbers of one record as flat columns: pre_*/post_* metrics, t_* timings, memory, training."""
    row = {}
    for phase in ("pre", "post"):
        for metric in METRICS:
            row[f"{phase}_{metric}"] = float(record["metrics"][phase][metric])
    timings = record.get("timings") or {}
    for key in TIMING_KEYS:
        row[f"t_{key}"] = float(timings[key]) if key in timings else np.nan
    row["peak_rss_mb"] = float(record["peak_rss_mb"])
    training = record.get("training") or {}
    row["optimizer_steps"] = training.get("optimizer_steps", np.nan)
    row["adam_iterations"] = training.get("adam_iterations", np.nan)
    row["skipped_nonfinite"] = training.get("skipped_nonfinite", np.nan)
    return row


def aggregate(membership: Iterable[dict], schema: dict) -> pd.DataFrame:
    """Read, validate and flatten every record named by the membership rows."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    cache: dict[str, dict] = {}
    rows = []
    for cell in membership:
        path = cell["path"]
        if path not in cache:
            with open(path) as fh:
                record = json.load(fh)
            _check_record(record, cell, path, validator)
            cache[path] = flatten_record(record)
        rows.append({**cell, **cache[path]})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        if "iterations" not in frame:
            frame["iterations"] = OWN
        frame["label"] = [editor_label(e, int(s), l, i) for e, s, l, i in
                          zip(frame.editor, frame.steps, frame.loss, frame.iterations)]
    return frame


# --- statistics ----------------------------------------------------------------------------------


def t_halfwidth(values: Iterable[float], level: float = 0.95) -> float:
    """Half-width of the two-sided t-interval of the mean (NaN with fewer than 2 values)."""
    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    if len(x) < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(values: Iterable[float]) -> dict:
    x = [float(v) for v in values if pd.notna(v)]
    return {"n": len(x), "mean": float(np.mean(x)) if x else float("nan"), "ci95": t_halfwidth(x)}


def one_sample_test(diffs: Iterable[float], alpha: float, margin: float = 0.0) -> dict:
    """Two-sided one-sample t-test of mean(diffs) = margin, and the verdict on 'mean > margin'.

    holds: significant and above; does not hold: significant and below; inconclusive: not
    significant or fewer than 2 values. Zero spread with a non-zero mean counts as significant.
    """
    d = np.asarray([v for v in diffs if pd.notna(v)], dtype=float)
    out = {"n": int(len(d)), "mean": float(d.mean()) if len(d) else float("nan"), "ci95": t_halfwidth(d), "p": float("nan")}
    if len(d) < 2:
        out["verdict"] = "inconclusive"
        out["why"] = "fewer than 2 seeds"
        return out
    shifted = d - margin
    if np.allclose(shifted, shifted[0]) and shifted.std(ddof=1) == 0:
        out["p"] = 0.0 if shifted[0] != 0 else 1.0
    else:
        out["p"] = float(stats.ttest_1samp(shifted, 0.0).pvalue)
    if out["p"] < alpha:
        out["verdict"] = "holds" if shifted.mean() > 0 else "does not hold"
    else:
        out["verdict"] = "inconclusive"
    out["why"] = f"p = {out['p']:.3g} {'<' if out['p'] < alpha else '>='} {alpha}"
    return out


def equivalence_test(diffs: Iterable[float], alpha: float, margin: float) -> dict:
    """Two one-sided t-tests (TOST): 'holds' when |mean diff| < margin at level alpha;
    'does not hold' when the diff is significantly outside the margin; else inconclusive."""
    d = np.asarray([v for v in diffs if pd.notna(v)], dtype=float)
    out = {"n": int(len(d)), "mean": float(d.mean()) if len(d) else float("nan"), "ci95": t_halfwidth(d), "p": float("nan")}
    if len(d) < 2:
        return {**out, "verdict": "inconclusive", "why": "fewer than 2 seeds"}
    lower = one_sample_test(d, alpha, -margin)   # mean > -margin
    upper = one_sample_test(-d, alpha, -margin)  # mean < +margin
    out["p"] = max(lower["p"], upper["p"])
    outside_hi = one_sample_test(d, alpha, margin)    # mean > +margin
    outside_lo = one_sample_test(-d, alpha, margin)   # mean < -margin
    if lower["verdict"] == "holds" and upper["verdict"] == "holds":
        out["verdict"] = "holds"
    elif outside_hi["verdict"] == "holds" or outside_lo["verdict"] == "holds":
        out["verdict"] = "does not hold"
    else:
        out["verdict"] = "inconclusive"
    out["why"] = f"TOST p = {out['p']:.3g}, margin ±{margin}"
    return out


def paired_diffs(a: pd.DataFrame, b: pd.DataFrame, column: str) -> pd.Series:
    """Per-seed a[column] - b[column], on the seeds both have."""
    joined = a.set_index("seed")[[column]].join(b.set_index("seed")[[column]], how="inner", lsuffix="_a", rsuffix="_b")
    return joined[f"{column}_a"] - joined[f"{column}_b"]


def combine(verdicts: Iterable[str]) -> str:
    """A claim holds when every sub-test holds, does not hold when any does not; else inconclusive."""
    v = list(verdicts)
    if not v:
        return "inconclusive"
    if any(x == "does not hold" for x in v):
        return "does not hold"
    return "holds" if all(x == "holds" for x in v) else "inconclusive"


# --- table helpers -------------------------------------------------------------------------------

GROUP_KEYS = ["variant_label", "dataset", "model", "protocol", "editor", "label", "steps", "iterations", "loss",
              "hypernetworks", "turns", "edits", "train_turns"]


def study(cells: pd.DataFrame, name: str) -> pd.DataFrame:
    return cells[cells["study"] == name].copy()


def summarize_groups(frame: pd.DataFrame, columns: list[str], keys: list[str] = GROUP_KEYS) -> pd.DataFrame:
    """Mean, 95% CI half-width and n over seeds for each group of cells that differ only by seed."""
    rows = []
    for key, group in frame.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key))
        row["n_seeds"] = int(group["seed"].nunique())
        for col in columns:
            s = summarize(group[col])
            row[f"{col}_mean"], row[f"{col}_ci95"] = s["mean"], s["ci95"]
        rows.append(row)
    return pd.DataFrame(rows)


def _paper_value(ref: pd.DataFrame, **where) -> float:
    sel = ref
    for key, value in where.items():
        sel = sel[sel[key].astype(str) == str(value)]
    return float(sel["value"].iloc[0]) if len(sel) else float("nan")


def _setting(protocol: str, turns, edits) -> str:
    return f"{int(edits)}" if protocol == "batch" else f"{int(turns)}×{int(edits)}"


# --- the tables ----------------------------------------------------------------------------------


def table_main(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "main")
    frame = frame.rename(columns={f"post_{m}": m for m in METRICS})
    out = summarize_groups(frame, METRICS)
    # the unedited model on the same edits, once per dataset/protocol/setting
    pre = cells[cells["study"] == "main"].rename(columns={f"pre_{m}": m for m in METRICS})
    pre = pre.drop_duplicates(["variant_label", "dataset", "model", "protocol", "turns", "edits", "seed"])
    pre_rows = summarize_groups(pre.assign(editor="", label="Unedited", steps=0, iterations=OWN, loss="", hypernetworks="",
                                           train_turns=""),
                                METRICS)
    out = pd.concat([pre_rows, out], ignore_index=True)
    main_ref = ref["main"]
    for m in METRICS:
        out[f"{m}_paper"] = [
            _paper_value(main_ref, protocol=r.protocol, model=paper_model(r.model, paper),
                         dataset=paper_dataset(r.dataset, paper), editor=r.label, metric=m)
            for r in out.itertuples()
        ]
    out["setting"] = [_setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    out["paper_model"] = [paper_model(m, paper) for m in out["model"]]
    order = {"sequential": 0, "batch": 1}
    out = out.sort_values(["variant_label", "dataset", "protocol"], key=lambda s: s.map(order) if s.name == "protocol" else s, kind="stable")
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "label", "train_turns", "n_seeds"]
    cols = [c for m in METRICS for c in (f"{m}_mean", f"{m}_ci95", f"{m}_paper")]
    return out[keep + cols + ["paper_model"]].reset_index(drop=True)


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


def msbp_pairs(cells: pd.DataFrame) -> list[tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame, str]]:
    """(keys, X cells, X² cells, control cells, control kind) for every editor run with S = 1 and
    S = 2 in the main study; the control is X at S = 1 with X²'s Adam iterations (see control_for)."""
    frame = study(cells, "main")
    keys = ["variant_label", "dataset", "model", "protocol", "editor", "loss", "hypernetworks", "turns", "edits", "train_turns"]
    pairs = []
    for key, group in frame.groupby(keys, sort=False):
        if editor_decl(key[4]).steps != 1:
            continue
        mine = own(group)
        s1, s2 = mine[mine.steps == 1], mine[mine.steps == 2]
        if len(s1) and len(s2):
            control, kind = control_for(group, s1, s2, 2)
            pairs.append((dict(zip(keys, key)), s1, s2, control, kind))
    return pairs


def table_msbp(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    rows = []
    for keys, s1, s2, control, kind in msbp_pairs(cells):
        base = editor_label(keys["editor"], 1, keys["loss"])
        row = {k: keys[k] for k in ("variant_label", "dataset", "model", "protocol")}
        row["setting"] = _setting(keys["protocol"], keys["turns"], keys["edits"])
        row["pair"] = f"{base} → {base}²"
        row["control"] = kind
        for m in METRICS:
            d = paired_diffs(s2, s1, f"post_{m}")
            s = summarize(d)
            row["n_seeds"] = s["n"]
            row[f"{m}_gain_mean"], row[f"{m}_gain_ci95"] = s["mean"], s["ci95"]
            c = summarize(paired_diffs(s2, control, f"post_{m}")) if len(control) else {"mean": np.nan, "ci95": np.nan}
            row[f"{m}_gain_over_control_mean"], row[f"{m}_gain_over_control_ci95"] = c["mean"], c["ci95"]
            kw = dict(protocol=keys["protocol"], model=paper_model(keys["model"], paper),
                      dataset=paper_dataset(keys["dataset"], paper), metric=m)
            row[f"{m}_gain_paper"] = _paper_value(ref["main"], editor=base + "²", **kw) - _paper_value(ref["main"], editor=base, **kw)
        rows.append(row)
    return pd.DataFrame(rows)


# The family behind each panel of the paper's S = 1..4 figure (method spec §10.5).
PAPER_STEPS_FAMILY = {"batch": "malmen", "sequential": "rledit"}


def _paper_steps(ref: dict, protocol: str, model: str, steps: int, metric: str) -> float:
    config = "step=1" if protocol == "batch" else "step=1 | 100"
    table = ref["steps_ablation"].rename(columns={"config": "cfg"})
    if metric == "average":
        vals = [_paper_value(table, protocol=protocol, model=model, cfg=config, steps=steps, metric=m) for m in QUALITY]
        return float(np.mean(vals))
    return _paper_value(table, protocol=protocol, model=model, cfg=config, steps=steps, metric=metric)


def table_steps(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "steps").rename(columns={f"post_{m}": m for m in METRICS})
    out = summarize_groups(frame, METRICS)
    # the paper's numbers sit beside the family it ran (MALMEN batch, RLEdit sequential) only
    for m in METRICS:
        out[f"{m}_paper"] = [
            _paper_steps(ref, r.protocol, paper_model(r.model, paper), int(r.steps), m)
            if r.editor == PAPER_STEPS_FAMILY.get(r.protocol) and r.iterations == OWN else np.nan
            for r in out.itertuples()]
    out["setting"] = [_setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    out["matched_to"] = [np.nan if i == OWN else int(str(i).removeprefix("S")) for i in out["iterations"]]
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "editor", "label", "steps", "matched_to", "n_seeds"]
    cols = [c for m in METRICS for c in (f"{m}_mean", f"{m}_ci95", f"{m}_paper")]
    return out.sort_values(["variant_label", "dataset", "protocol", "editor", "matched_to", "steps"], kind="stable",
                           na_position="first")[keep + cols].reset_index(drop=True)


def _paper_time_ratio(ref: dict, protocol: str, model: str) -> float:
    """The paper's EMSEdit / (MSBP+KL twin) training time: MALMEN² (batch) or RLEdit² (sequential)."""
    sweeps = ref["sweeps"]
    metric = "train_seconds" if protocol == "batch" else "train_seconds_per_edit"
    twin = "MALMEN²" if protocol == "batch" else "RLEdit²"
    sel = sweeps[(sweeps.protocol == protocol) & (sweeps.model == model) & (sweeps.metric == metric)]
    wide = sel.pivot_table(index=["dataset", "edits_per_turn", "turns"], columns="editor", values="value")
    if "EMSEdit" not in wide or twin not in wide:
        return float("nan")
    return float((wide["EMSEdit"] / wide[twin]).mean())


def loss_pairs(cells: pd.DataFrame):
    """(keys, l2 cells, kl cells) for each EMSEdit setting run with both losses in the loss study."""
    frame = study(cells, "loss")
    keys = ["variant_label", "dataset", "model", "protocol", "editor", "steps", "hypernetworks", "turns", "edits", "train_turns"]
    for key, group in frame.groupby(keys, sort=False):
        l2, kl = group[group.loss == "l2"], group[group.loss == "kl"]
        if len(l2) and len(kl):
            yield dict(zip(keys, key)), l2, kl


def table_loss(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "loss").rename(columns={f"post_{m}": m for m in METRICS})
    out = summarize_groups(frame, METRICS + ["t_train_total"])
    ratios = {}
    for keys, l2, kl in loss_pairs(cells):
        r = l2.set_index("seed")["t_train_total"] / kl.set_index("seed")["t_train_total"]
        ratios[(keys["variant_label"], keys["dataset"], keys["protocol"])] = summarize(r.dropna())
    out["train_time_ratio_l2_over_kl_mean"] = [
        ratios.get((r.variant_label, r.dataset, r.protocol), {}).get("mean", np.nan) if r.loss == "l2" else np.nan
        for r in out.itertuples()]
    out["train_time_ratio_l2_over_kl_ci95"] = [
        ratios.get((r.variant_label, r.dataset, r.protocol), {}).get("ci95", np.nan) if r.loss == "l2" else np.nan
        for r in out.itertuples()]
    out["train_time_ratio_paper"] = [
        _paper_time_ratio(ref, r.protocol, paper_model(r.model, paper)) if r.loss == "l2" else np.nan for r in out.itertuples()]
    out["setting"] = [_setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "label", "loss", "n_seeds"]
    cols = [c for m in METRICS + ["t_train_total"] for c in (f"{m}_mean", f"{m}_ci95")]
    cols += ["train_time_ratio_l2_over_kl_mean", "train_time_ratio_l2_over_kl_ci95", "train_time_ratio_paper"]
    return out[keep + cols].reset_index(drop=True)


def table_time_breakdown(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "loss").copy()
    phase_cols = [f"t_{p}" for p in PHASES]
    total = frame[phase_cols].sum(axis=1)
    for p in PHASES:
        frame[f"share_{p}"] = 100.0 * frame[f"t_{p}"] / total.replace(0, np.nan)
    pie = ref["time_breakdown"]
    rows = []
    for key, group in frame.groupby(["variant_label", "dataset", "model", "protocol", "label", "loss"], sort=False):
        for p, component in PHASES.items():
            s = summarize(group[f"share_{p}"])
            sel = pie[(pie.protocol == key[3]) & (pie.component == component)]
            rows.append({
                "variant_label": key[0], "dataset": key[1], "model": key[2], "protocol": key[3], "label": key[4],
                "loss": key[5], "phase": p.removeprefix("train_"), "paper_component": component, "n_seeds": s["n"],
                "share_mean": s["mean"], "share_ci95": s["ci95"], "seconds_mean": summarize(group[f"t_{p}"])["mean"],
                # the paper's pie is for KL-trained editors (MALMEN batch, RLEdit sequential)
                "share_paper": float(sel["percent_of_training_time"].iloc[0]) if (len(sel) and key[5] == "kl") else np.nan,
            })
    return pd.DataFrame(rows)


def table_hypernetworks(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "hypernetworks").rename(columns={f"post_{m}": m for m in METRICS})
    out = summarize_groups(frame, METRICS)
    for m in METRICS:
        out[f"{m}_paper"] = np.nan  # spec §10.6: not found in the paper's sources
    out["setting"] = [_setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "label", "hypernetworks", "n_seeds"]
    cols = [c for m in METRICS for c in (f"{m}_mean", f"{m}_ci95", f"{m}_paper")]
    return out[keep + cols].reset_index(drop=True)


def table_data_efficiency(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "data_efficiency").rename(columns={f"post_{m}": m for m in METRICS})
    out = summarize_groups(frame, METRICS)
    out["source"] = "ours"
    out["train_amount"] = pd.to_numeric(out["train_turns"], errors="coerce")
    out["unit"] = ["train turns" if p == "sequential" else "train batches" for p in out["protocol"]]
    rows = [out]
    de = ref["data_efficiency"]
    models = {paper_model(m, paper) for m in out["model"]}
    for (protocol, model, editor, units, unit), g in de.groupby(["protocol", "model", "editor", "training_units", "unit"]):
        if model not in models or protocol not in set(out["protocol"]):
            continue
        row = {"source": "paper", "variant_label": "paper", "dataset": g["dataset"].iloc[0], "model": model,
               "protocol": protocol, "label": editor, "train_amount": units, "unit": unit, "n_seeds": 1}
        vals = {m: float(g[g.metric == m]["value"].iloc[0]) for m in QUALITY if (g.metric == m).any()}
        for m in QUALITY:
            row[f"{m}_mean"] = vals.get(m, np.nan)
        row["average_mean"] = float(np.mean([vals[m] for m in QUALITY])) if len(vals) == 3 else np.nan
        rows.append(pd.DataFrame([row]))
    out = pd.concat(rows, ignore_index=True)
    keep = ["source", "variant_label", "dataset", "model", "protocol", "label", "train_amount", "unit", "n_seeds"]
    cols = [c for m in METRICS for c in (f"{m}_mean", f"{m}_ci95")]
    return out.sort_values(["source", "variant_label", "protocol", "label", "train_amount"], kind="stable")[keep + cols].reset_index(drop=True)


def table_scaling(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    frame = study(cells, "scaling").copy()
    frame["eval_seconds"] = frame["t_edit_total"] + frame["t_evaluate_post"]
    frame["axis"] = ["edits" if p == "batch" else "turns" for p in frame["protocol"]]
    cols = ["t_train_total", "t_edit_total", "eval_seconds", "t_total", "peak_rss_mb"]
    out = summarize_groups(frame, cols)
    out = out.rename(columns={"t_train_total_mean": "train_seconds_mean", "t_train_total_ci95": "train_seconds_ci95",
                              "t_edit_total_mean": "edit_seconds_mean", "t_edit_total_ci95": "edit_seconds_ci95",
                              "t_total_mean": "total_seconds_mean", "t_total_ci95": "total_seconds_ci95",
                              "peak_rss_mb_mean": "peak_memory_mean", "peak_rss_mb_ci95": "peak_memory_ci95"})
    out["source"], out["memory_unit"] = "ours", "RSS MiB"
    out["axis"] = ["edits" if p == "batch" else "turns" for p in out["protocol"]]
    out["x"] = [int(r.edits) if r.protocol == "batch" else int(r.turns) for r in out.itertuples()]
    out["n_edits"] = out["turns"].astype(int) * out["edits"].astype(int)
    out["train_seconds_per_edit"] = out["train_seconds_mean"] / out["n_edits"]
    parts = [out]
    models = {paper_model(m, paper) for m in out["model"]}
    datasets = {paper_dataset(d, paper) for d in out["dataset"]}
    sweeps, memory = ref["sweeps"], ref["memory"]
    sel = sweeps[sweeps.model.isin(models) & sweeps.dataset.isin(datasets)
                 & sweeps.metric.isin(["train_seconds", "eval_seconds", "train_seconds_per_edit", "eval_seconds_per_edit"])]
    wide = sel.pivot_table(index=["protocol", "model", "dataset", "editor", "edits_per_turn", "turns"], columns="metric",
                           values="value").reset_index()
    if len(wide):
        n = wide["edits_per_turn"] * wide["turns"]
        if "train_seconds" not in wide:
            wide["train_seconds"] = np.nan
        if "eval_seconds" not in wide:
            wide["eval_seconds"] = np.nan
        if "train_seconds_per_edit" in wide:
            wide["train_seconds"] = wide["train_seconds"].fillna(wide["train_seconds_per_edit"] * n)
            wide["train_seconds_per_edit"] = wide["train_seconds_per_edit"].fillna(wide["train_seconds"] / n)
        else:
            wide["train_seconds_per_edit"] = wide["train_seconds"] / n
        if "eval_seconds_per_edit" in wide:
            wide["eval_seconds"] = wide["eval_seconds"].fillna(wide["eval_seconds_per_edit"] * n)
        mem = memory.rename(columns={"peak_gpu_memory_gb": "peak_memory_mean"})
        wide = wide.merge(mem[["protocol", "model", "dataset", "editor", "edits_per_turn", "turns", "peak_memory_mean"]],
                          how="left", on=["protocol", "model", "dataset", "editor", "edits_per_turn", "turns"])
        parts.append(pd.DataFrame({
            "source": "paper", "variant_label": "paper", "dataset": wide["dataset"], "model": wide["model"],
            "protocol": wide["protocol"], "label": wide["editor"], "turns": wide["turns"], "edits": wide["edits_per_turn"],
            "axis": ["edits" if p == "batch" else "turns" for p in wide["protocol"]],
            "x": [int(e) if p == "batch" else int(t) for p, e, t in zip(wide["protocol"], wide["edits_per_turn"], wide["turns"])],
            "n_seeds": 1, "train_seconds_mean": wide["train_seconds"], "eval_seconds_mean": wide["eval_seconds"],
            "train_seconds_per_edit": wide["train_seconds_per_edit"], "peak_memory_mean": wide["peak_memory_mean"],
            "memory_unit": "GPU GB",
        }))
    out = pd.concat(parts, ignore_index=True)
    keep = ["source", "variant_label", "dataset", "model", "protocol", "label", "axis", "x", "turns", "edits", "n_seeds",
            "train_seconds_mean", "train_seconds_ci95", "train_seconds_per_edit", "edit_seconds_mean", "eval_seconds_mean",
            "eval_seconds_ci95", "total_seconds_mean", "peak_memory_mean", "peak_memory_ci95", "memory_unit"]
    return out.sort_values(["source", "protocol", "dataset", "model", "label", "x"], kind="stable")[keep].reset_index(drop=True)


# Each declared table (workflow/scripts/studies.py) is computed by the function table_<name> above.
TABLES = {name: globals()[f"table_{name}"] for name in studies.TABLES}


# --- rendering -----------------------------------------------------------------------------------


def _fmt(x, digits=2) -> str:
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable columns: 'mean ± ci' for each *_mean/*_ci95 pair, other numbers rounded."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col.endswith("_ci95"):
            continue
        if col.endswith("_mean"):
            base = col[: -len("_mean")]
            ci = table.get(f"{base}_ci95")
            out[base] = [
                (_fmt(m) + (f" ± {_fmt(c)}" if ci is not None and pd.notna(c) else "")) if pd.notna(m) else ""
                for m, c in zip(table[col], ci if ci is not None else [np.nan] * len(table))
            ]
        elif pd.api.types.is_float_dtype(table[col]):
            out[col] = [_fmt(v, 3 if "per_edit" in col or "ratio" in col else 2) for v in table[col]]
        else:
            out[col] = table[col].astype(str).replace({"nan": ""})
    return out


def _latex_unicode(text: str) -> str:
    for a, b in {"²": r"\textsuperscript{2}", "³": r"\textsuperscript{3}", "⁴": r"\textsuperscript{4}",
                 "±": r"$\pm$", "→": r"$\to$", "×": r"$\times$", "∇": r"$\nabla$", "Δ": r"$\Delta$"}.items():
        text = text.replace(a, b)
    return text


def write_table(table: pd.DataFrame, csv: str, md: str, tex: str, title: str, note: str = "") -> None:
    """One table as CSV (all numbers), Markdown and LaTeX (formatted 'mean ± 95% CI')."""
    table.to_csv(csv, index=False)
    shown = display_frame(table)
    with open(md, "w") as fh:
        fh.write(f"# {title}\n\n")
        if note:
            fh.write(note + "\n\n")
        fh.write(shown.to_markdown(index=False) if len(shown) else "_no rows_")
        fh.write("\n")
    latex = shown.to_latex(index=False, escape=True, caption=title, longtable=False) if len(shown) else "% no rows\n"
    with open(tex, "w") as fh:
        fh.write(_latex_unicode(latex))


# --- claims --------------------------------------------------------------------------------------



def _subtest(variant, what, test, **extra):
    return {"variant": variant, "test": what, "n": test["n"], "mean_diff": test["mean"], "ci95": test["ci95"],
            "p": test["p"], "verdict": test["verdict"], "why": test["why"], **extra}


def _ref_avg(ref, paper, model, dataset, protocol, editor):
    return _paper_value(ref["main"], protocol=protocol, model=paper_model(model, paper),
                        dataset=paper_dataset(dataset, paper), editor=editor, metric="average")


def claim_msbp(cells, ref, paper, opts):
    subs, evidence = [], []
    for keys, s1, s2, control, kind in msbp_pairs(cells):
        base = editor_label(keys["editor"], 1, keys["loss"])
        t = one_sample_test(paired_diffs(s2, s1, "post_average"), opts["alpha"])
        where = f"{keys['dataset']}/{keys['protocol']}"
        subs.append(_subtest(keys["variant_label"], f"{base}² − {base}, average, {where}", t))
        if kind == "control cells":  # MSBP beyond the extra Adam iterations it brings (quirk 22)
            t = one_sample_test(paired_diffs(s2, control, "post_average"), opts["alpha"])
            subs.append(_subtest(keys["variant_label"],
                                 f"{base}² − {base} with {base}²'s Adam iterations, average, {where}", t))
        p = _ref_avg(ref, paper, keys["model"], keys["dataset"], keys["protocol"], base + "²") - \
            _ref_avg(ref, paper, keys["model"], keys["dataset"], keys["protocol"], base)
        if pd.notna(p):
            evidence.append(f"{base}→{base}² {paper_dataset(keys['dataset'], paper)}/{keys['protocol']} "
                            f"({paper_model(keys['model'], paper)}): {p:+.2f}")
    return subs, sorted(set(evidence))


def claim_steps(cells, ref, paper, opts):
    subs, evidence = [], []
    frame = study(cells, "steps")
    keys = ["variant_label", "dataset", "model", "protocol", "editor", "loss", "hypernetworks", "turns", "edits", "train_turns"]
    for key, group in frame.groupby(keys, sort=False):
        k = dict(zip(keys, key))
        mine = own(group)
        s2 = mine[mine.steps == 2]
        if not len(s2):
            continue
        name = editor_decl(k["editor"]).label
        where = f"{name}, {k['dataset']}/{k['protocol']}"
        for s in sorted(set(mine.steps) - {2}):
            other = mine[mine.steps == s]
            t = one_sample_test(paired_diffs(s2, other, "post_average"), opts["alpha"])
            subs.append(_subtest(k["variant_label"], f"S=2 − S={s}, average, {where}", t))
            if s >= 3:
                t = one_sample_test(paired_diffs(s2, other, "post_specificity"), opts["alpha"])
                subs.append(_subtest(k["variant_label"], f"S=2 − S={s}, specificity, {where}", t))
        # S = 2 against S = 1 trained with S = 2's Adam iterations: the gain MSBP keeps once the
        # number of optimiser iterations is matched
        control, kind = control_for(group, mine[mine.steps == 1], s2, 2)
        if kind == "control cells":
            t = one_sample_test(paired_diffs(s2, control, "post_average"), opts["alpha"])
            subs.append(_subtest(k["variant_label"], f"S=2 − S=1 with S=2's Adam iterations, average, {where}", t))
        if k["editor"] == PAPER_STEPS_FAMILY.get(k["protocol"]):
            pm = paper_model(k["model"], paper)
            vals = [_paper_steps(ref, k["protocol"], pm, s, "average") for s in (1, 2, 3, 4)]
            if not all(pd.isna(vals)):
                evidence.append(f"{k['protocol']} ({pm}, {name} family) average S=1..4: " + " / ".join(_fmt(v) for v in vals))
    return subs, sorted(set(evidence))


def claim_loss(cells, ref, paper, opts):
    subs, evidence = [], []
    lo, hi = opts["time_reduction_band"]
    for keys, l2, kl in loss_pairs(cells):
        where = f"{keys['dataset']}/{keys['protocol']}"
        ratio = l2.set_index("seed")["t_train_total"] / kl.set_index("seed")["t_train_total"]
        reduction = 100.0 * (1.0 - ratio.dropna())
        t = one_sample_test(reduction, opts["alpha"])
        s = summarize(reduction)
        if s["n"] >= 2 and pd.notna(s["ci95"]):
            low, high = s["mean"] - s["ci95"], s["mean"] + s["ci95"]
            band = "overlaps" if (low <= hi and high >= lo) else ("below" if high < lo else "above")
        else:
            band = "n/a"
        subs.append(_subtest(keys["variant_label"], f"training-time cut of l2 vs KL, % ({where}; 95% CI {band} the paper's {lo}–{hi} %)", t))
        q = equivalence_test(paired_diffs(l2, kl, "post_average"), opts["alpha"], opts["equivalence_margin"])
        subs.append(_subtest(keys["variant_label"], f"average l2 − KL within ±{opts['equivalence_margin']} ({where})", q))
    pie = ref["time_breakdown"]
    kl_share = pie[pie.component.str.startswith("Compute L_loc")]
    evidence.append("KL locality takes " + ", ".join(f"{r.percent_of_training_time} % ({r.protocol})" for r in kl_share.itertuples())
                    + " of training time")
    for protocol in sorted(set(study(cells, "loss").protocol)):
        for model in sorted({paper_model(m, paper) for m in study(cells, "loss").model}):
            r = _paper_time_ratio(ref, protocol, model)
            if pd.notna(r):
                twin = "MALMEN²" if protocol == "batch" else "RLEdit²"
                evidence.append(f"{protocol} ({model}): EMSEdit / {twin} training time = {r:.2f} (sweep mean)")
    return subs, evidence


def claim_hypernetworks(cells, ref, paper, opts):
    subs = []
    frame = study(cells, "hypernetworks")
    frame = frame[frame.protocol == "sequential"]
    keys = ["variant_label", "dataset", "model", "editor", "steps", "loss", "turns", "edits", "train_turns"]
    for key, group in frame.groupby(keys, sort=False):
        k = dict(zip(keys, key))
        per, shared = group[group.hypernetworks == "per_step"], group[group.hypernetworks == "shared"]
        if len(per) and len(shared):
            t = one_sample_test(paired_diffs(per, shared, "post_average"), opts["alpha"])
            subs.append(_subtest(k["variant_label"], f"per-step − shared, average, {k['dataset']}/sequential", t))
    return subs, ["not found in the paper's sources (method spec §10.6)"]


def claim_data_efficiency(cells, ref, paper, opts):
    subs, evidence = [], []
    frame = study(cells, "data_efficiency")
    frame = frame.assign(train_amount=pd.to_numeric(frame.train_turns, errors="coerce"))
    for key, group in frame.groupby(["variant_label", "dataset", "model", "protocol"], sort=False):
        ems = group[group.editor == "emsedit"]
        base = group[group.editor != "emsedit"]
        if not len(ems) or not len(base):
            continue
        for editor, b in base.groupby("editor"):
            lo, hi = ems.train_amount.min(), b.train_amount.max()
            t = one_sample_test(paired_diffs(ems[ems.train_amount == lo], b[b.train_amount == hi], "post_average"), opts["alpha"])
            name = editor_decl(editor).label
            subs.append(_subtest(key[0], f"EMSEdit at {int(lo)} train turns − {name} at {int(hi)}, average, {key[1]}/{key[3]}", t))
    de = ref["data_efficiency"]
    for (protocol, model), g in de.groupby(["protocol", "model"]):
        ems = g[g.editor == "EMSEdit"]
        base = g[g.editor != "EMSEdit"]
        if len(ems) and len(base):
            lo, hi = ems.training_units.min(), base.training_units.max()
            e = ems[(ems.training_units == lo) & (ems.metric == "efficacy")]["value"].iloc[0]
            b = base[(base.training_units == hi) & (base.metric == "efficacy")]["value"].iloc[0]
            evidence.append(f"{protocol} ({model}): efficacy EMSEdit at {lo} {g.unit.iloc[0]} = {e} vs "
                            f"{base.editor.iloc[0]} at {hi} = {b}")
    return subs, evidence


def claim_main(cells, ref, paper, opts):
    subs, evidence = [], []
    frame = study(cells, "main")
    for key, group in frame.groupby(["variant_label", "dataset", "model", "protocol"], sort=False):
        ems = group[(group.editor == "emsedit") & (group.steps == 2) & (group.loss == "l2")]
        if not len(ems):
            continue
        base = own(group)
        for (editor, steps), b in base[(base.editor != "emsedit") & (base.steps == 1)].groupby(["editor", "steps"]):
            t = one_sample_test(paired_diffs(ems, b, "post_average"), opts["alpha"])
            name = editor_decl(editor).label
            subs.append(_subtest(key[0], f"EMSEdit − {name}, average, {key[1]}/{key[3]}", t))
            p = _ref_avg(ref, paper, key[2], key[1], key[3], "EMSEdit") - _ref_avg(ref, paper, key[2], key[1], key[3], name)
            if pd.notna(p):
                evidence.append(f"EMSEdit − {name} {paper_dataset(key[1], paper)}/{key[3]} "
                                f"({paper_model(key[2], paper)}): {p:+.2f}")
    return subs, sorted(set(evidence))


# Each declared claim (workflow/scripts/studies.py: its study and its words) is tested by claim_<id> above.
CLAIM_FUNCS = {cid: globals()[f"claim_{cid}"] for cid in studies.CLAIMS}


def evaluate_claims(cells: pd.DataFrame, ref: dict, paper: dict, opts: dict) -> tuple[pd.DataFrame, str]:
    """Every claim's sub-tests (CSV rows) and the Markdown report."""
    rows, lines = [], []
    alpha, margin = opts["alpha"], opts["equivalence_margin"]
    variants = sorted(set(cells.variant_label)) if len(cells) else []
    lines += [
        "# Claims of the paper, tested at this scale", "",
        "Each claim is split into sub-tests. A sub-test compares two settings on the same seeds (a seed fixes "
        "the edit order) with a two-sided one-sample t-test on the per-seed differences "
        f"(scipy.stats.ttest_1samp, α = {alpha}): **holds** when the difference is significant in the claimed "
        "direction, **does not hold** when it is significant against it, **inconclusive** when it is not "
        "significant or there are fewer than 2 seeds. \"Similar quality\" is a two one-sided tests (TOST) "
        f"equivalence test with margin ±{margin} points. A claim holds when all its sub-tests hold, does not hold "
        "when any does not, and is inconclusive otherwise; verdicts are given per variant.", "",
        "Variants: " + ", ".join(f"`{v}`" for v in variants) + ".", "",
        "| claim | " + " | ".join(variants) + " |", "| --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    sections, summary = [], []
    for cid, (claim_study, text) in studies.CLAIMS.items():
        if claim_study not in set(cells.study):
            continue
        subs, evidence = CLAIM_FUNCS[cid](cells, ref, paper, opts)
        verdicts = {v: combine(s["verdict"] for s in subs if s["variant"] == v) for v in variants}
        summary.append(f"| {text} | " + " | ".join(verdicts[v] for v in variants) + " |")
        for s in subs:
            rows.append({"claim": cid, **s, "claim_verdict": verdicts[s["variant"]]})
        sec = [f"## {text}", "", "**Paper's evidence** (resources/reference): " + ("; ".join(evidence) or "none found") + ".", ""]
        for v in variants:
            vs = [s for s in subs if s["variant"] == v]
            sec += [f"### Variant `{v}`: **{verdicts[v]}**", ""]
            if not vs:
                sec += ["_no cells for this claim in this variant_", ""]
                continue
            sec += ["| sub-test | seeds | mean difference ± 95% CI | p | verdict |", "| --- | --- | --- | --- | --- |"]
            for s in vs:
                ci = f" ± {_fmt(s['ci95'])}" if pd.notna(s["ci95"]) else ""
                sec.append(f"| {s['test']} | {s['n']} | {_fmt(s['mean_diff'])}{ci} | {_fmt(s['p'], 4)} | {s['verdict']} ({s['why']}) |")
            sec.append("")
        sections += sec
    lines += summary + [""] + sections
    return pd.DataFrame(rows), "\n".join(lines) + "\n"
