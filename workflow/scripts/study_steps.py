"""Study "steps": the number of backprop steps S, beside the paper's S = 1..4 figure."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aggregation import (OWN, control_for, editor_decl, metric_columns, own, paper_model, paper_value, setting, study,
                         view_metrics)
from rendering import fmt
from paired_tests import subtest
from seed_statistics import summarize_groups
from studies import METRICS, QUALITY


# The family behind each panel of the paper's S = 1..4 figure (method spec §10.5).
PAPER_STEPS_FAMILY = {"batch": "malmen", "sequential": "rledit"}


def _paper_steps(ref: dict, protocol: str, model: str, steps: int, metric: str) -> float:
    config = "step=1" if protocol == "batch" else "step=1 | 100"
    table = ref["steps_ablation"].rename(columns={"config": "cfg"})
    if metric == "average":
        vals = [paper_value(table, protocol=protocol, model=model, cfg=config, steps=steps, metric=m) for m in QUALITY]
        return float(np.mean(vals))
    return paper_value(table, protocol=protocol, model=model, cfg=config, steps=steps, metric=metric)


def table_steps(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    metrics = view_metrics(cells)
    frame = study(cells, "steps").rename(columns={f"post_{m}": m for m in metrics})
    out = summarize_groups(frame, metrics)
    # the paper's numbers sit beside the family it ran (MALMEN batch, RLEdit sequential) only
    for m in METRICS:
        out[f"{m}_paper"] = [
            _paper_steps(ref, r.protocol, paper_model(r.model, paper), int(r.steps), m)
            if r.editor == PAPER_STEPS_FAMILY.get(r.protocol) and r.iterations == OWN else np.nan
            for r in out.itertuples()]
    out["setting"] = [setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    out["matched_to"] = [np.nan if i == OWN else int(str(i).removeprefix("S")) for i in out["iterations"]]
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "editor", "label", "steps", "matched_to", "n_seeds"]
    return out.sort_values(["variant_label", "dataset", "protocol", "editor", "matched_to", "steps"], kind="stable",
                           na_position="first")[keep + metric_columns(metrics)].reset_index(drop=True)


def claim_steps(cells, ref, paper, tests):
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
            t = tests.gain(s2, other, "average")
            subs.append(subtest(k["variant_label"], f"S=2 − S={s}, average, {where}", t))
            if s >= 3:
                t = tests.gain(s2, other, "specificity")
                subs.append(subtest(k["variant_label"], f"S=2 − S={s}, specificity, {where}", t))
        # S = 2 against S = 1 trained with S = 2's Adam iterations: the gain MSBP keeps once the
        # number of optimiser iterations is matched
        control, kind = control_for(group, mine[mine.steps == 1], s2, 2)
        if kind == "control cells":
            t = tests.gain(s2, control, "average")
            subs.append(subtest(k["variant_label"], f"S=2 − S=1 with S=2's Adam iterations, average, {where}", t))
        if k["editor"] == PAPER_STEPS_FAMILY.get(k["protocol"]):
            pm = paper_model(k["model"], paper)
            vals = [_paper_steps(ref, k["protocol"], pm, s, "average") for s in (1, 2, 3, 4)]
            if not all(pd.isna(vals)):
                evidence.append(f"{k['protocol']} ({pm}, {name} family) average S=1..4: " + " / ".join(fmt(v) for v in vals))
    return subs, sorted(set(evidence))
