"""Study "hypernetworks": shared against step-specific hypernetworks in sequential editing."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aggregation import metric_columns, setting, study, view_metrics
from paired_tests import subtest
from seed_statistics import summarize_groups
from studies import METRICS


def table_hypernetworks(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    metrics = view_metrics(cells)
    frame = study(cells, "hypernetworks").rename(columns={f"post_{m}": m for m in metrics})
    out = summarize_groups(frame, metrics)
    for m in METRICS:
        out[f"{m}_paper"] = np.nan  # spec §10.6: not found in the paper's sources
    out["setting"] = [setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "label", "hypernetworks", "n_seeds"]
    return out[keep + metric_columns(metrics)].reset_index(drop=True)


def claim_hypernetworks(cells, ref, paper, tests):
    subs = []
    frame = study(cells, "hypernetworks")
    frame = frame[frame.protocol == "sequential"]
    keys = ["variant_label", "dataset", "model", "editor", "steps", "loss", "turns", "edits", "train_turns"]
    for key, group in frame.groupby(keys, sort=False):
        k = dict(zip(keys, key))
        per, shared = group[group.hypernetworks == "per_step"], group[group.hypernetworks == "shared"]
        if len(per) and len(shared):
            t = tests.gain(per, shared, "average")
            subs.append(subtest(k["variant_label"], f"per-step − shared, average, {k['dataset']}/sequential", t))
    return subs, ["not found in the paper's sources (method spec §10.6)"]
