"""Study "data_efficiency": quality against the amount of meta-training data."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aggregation import editor_decl, metric_columns, paper_model, study, view_metrics
from paired_tests import subtest
from seed_statistics import summarize_groups
from studies import QUALITY


def table_data_efficiency(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    metrics = view_metrics(cells)
    frame = study(cells, "data_efficiency").rename(columns={f"post_{m}": m for m in metrics})
    out = summarize_groups(frame, metrics)
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
    cols = metric_columns(metrics, paper=False)
    return out.sort_values(["source", "variant_label", "protocol", "label", "train_amount"], kind="stable")[keep + cols].reset_index(drop=True)


def claim_data_efficiency(cells, ref, paper, tests):
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
            t = tests.gain(ems[ems.train_amount == lo], b[b.train_amount == hi], "average")
            name = editor_decl(editor).label
            subs.append(subtest(key[0], f"EMSEdit at {int(lo)} train turns − {name} at {int(hi)}, average, {key[1]}/{key[3]}", t))
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
