"""Study "loss": EMSEdit with the l2 norm constraint against the KL locality loss (quality and
meta-training time), and the share of training time per phase beside the paper's pie."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aggregation import metric_columns, paper_model, setting, study, view_metrics
from paired_tests import subtest
from seed_statistics import summarize, summarize_groups
from studies import METRICS


PHASES = {
    # our timing key -> the paper's pie slice (paper_time_breakdown.csv)
    "train_cache": "Cache ∇W (forward/backward on edits, save keys/grads)",
    "train_predict_shift": "Compute ΔW (hypernet + solve)",
    "train_edit_loss": "Compute L_e and BP",
    "train_locality_loss": "Compute L_loc (KL) and BP",
    "train_hypernet_update": "Update f",
}


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
    metrics = view_metrics(cells)
    frame = study(cells, "loss").rename(columns={f"post_{m}": m for m in metrics})
    out = summarize_groups(frame, metrics + ["t_train_total"])
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
    out["setting"] = [setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "label", "loss", "n_seeds"]
    cols = metric_columns([*METRICS, "t_train_total", *metrics[len(METRICS):]], paper=False)
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


def claim_loss(cells, ref, paper, tests):
    subs, evidence = [], []
    lo, hi = tests.opts["time_reduction_band"]
    for keys, l2, kl in loss_pairs(cells):
        where = f"{keys['dataset']}/{keys['protocol']}"
        ratio = l2.set_index("seed")["t_train_total"] / kl.set_index("seed")["t_train_total"]
        reduction = 100.0 * (1.0 - ratio.dropna())
        t = tests.seed_gain(reduction, unit="%")
        low, high = t["lo"], t["hi"]
        if pd.notna(low) and pd.notna(high):
            band = "overlaps" if (low <= hi and high >= lo) else ("below" if high < lo else "above")
        else:
            band = "n/a"
        subs.append(subtest(keys["variant_label"], f"training-time cut of l2 vs KL, % ({where}; interval {band} the "
                                                   f"paper's {lo}–{hi} %)", t))
        q = tests.similar(l2, kl, "average")
        subs.append(subtest(keys["variant_label"], f"average l2 − KL within ±{tests.margin:g} ({where})", q))
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
