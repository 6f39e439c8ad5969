"""Study "scaling": meta-training time and peak memory against edits per batch and number of turns
(no claim)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aggregation import paper_dataset, paper_model, study
from seed_statistics import summarize_groups


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
