"""Study "main": the main results table and EMSEdit against the baselines; MSBP plugged into the
baselines (X² against X, and against X with X²'s Adam iterations)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aggregation import (OWN, control_for, editor_decl, editor_label, metric_columns, own, paper_dataset, paper_model,
                         paper_value, setting, study, view_metrics)
from paired_tests import subtest
from seed_statistics import paired_diffs, summarize, summarize_groups
from studies import METRICS


def table_main(cells: pd.DataFrame, ref: dict, paper: dict) -> pd.DataFrame:
    metrics = view_metrics(cells)
    frame = study(cells, "main")
    frame = frame.rename(columns={f"post_{m}": m for m in metrics})
    out = summarize_groups(frame, metrics)
    # the unedited model on the same edits, once per dataset/protocol/setting
    pre = cells[cells["study"] == "main"].rename(columns={f"pre_{m}": m for m in metrics})
    pre = pre.drop_duplicates(["variant_label", "dataset", "model", "protocol", "turns", "edits", "seed"])
    pre_rows = summarize_groups(pre.assign(editor="", label="Unedited", steps=0, iterations=OWN, loss="", hypernetworks="",
                                           train_turns=""),
                                metrics)
    out = pd.concat([pre_rows, out], ignore_index=True)
    main_ref = ref["main"]
    for m in METRICS:
        out[f"{m}_paper"] = [
            paper_value(main_ref, protocol=r.protocol, model=paper_model(r.model, paper),
                         dataset=paper_dataset(r.dataset, paper), editor=r.label, metric=m)
            for r in out.itertuples()
        ]
    out["setting"] = [setting(r.protocol, r.turns, r.edits) for r in out.itertuples()]
    out["paper_model"] = [paper_model(m, paper) for m in out["model"]]
    order = {"sequential": 0, "batch": 1}
    out = out.sort_values(["variant_label", "dataset", "protocol"], key=lambda s: s.map(order) if s.name == "protocol" else s, kind="stable")
    keep = ["variant_label", "dataset", "model", "protocol", "setting", "label", "train_turns", "n_seeds"]
    return out[keep + metric_columns(metrics) + ["paper_model"]].reset_index(drop=True)


def _ref_avg(ref, paper, model, dataset, protocol, editor):
    return paper_value(ref["main"], protocol=protocol, model=paper_model(model, paper),
                        dataset=paper_dataset(dataset, paper), editor=editor, metric="average")


def claim_main(cells, ref, paper, tests):
    subs, evidence = [], []
    frame = study(cells, "main")
    for key, group in frame.groupby(["variant_label", "dataset", "model", "protocol"], sort=False):
        ems = group[(group.editor == "emsedit") & (group.steps == 2) & (group.loss == "l2")]
        if not len(ems):
            continue
        base = own(group)
        for (editor, steps), b in base[(base.editor != "emsedit") & (base.steps == 1)].groupby(["editor", "steps"]):
            t = tests.gain(ems, b, "average")
            name = editor_decl(editor).label
            subs.append(subtest(key[0], f"EMSEdit − {name}, average, {key[1]}/{key[3]}", t))
            p = _ref_avg(ref, paper, key[2], key[1], key[3], "EMSEdit") - _ref_avg(ref, paper, key[2], key[1], key[3], name)
            if pd.notna(p):
                evidence.append(f"EMSEdit − {name} {paper_dataset(key[1], paper)}/{key[3]} "
                                f"({paper_model(key[2], paper)}): {p:+.2f}")
    return subs, sorted(set(evidence))


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
    metrics = view_metrics(cells)
    for keys, s1, s2, control, kind in msbp_pairs(cells):
        base = editor_label(keys["editor"], 1, keys["loss"])
        row = {k: keys[k] for k in ("variant_label", "dataset", "model", "protocol")}
        row["setting"] = setting(keys["protocol"], keys["turns"], keys["edits"])
        row["pair"] = f"{base} → {base}²"
        row["control"] = kind
        for m in metrics:
            d = paired_diffs(s2, s1, f"post_{m}")
            s = summarize(d)
            row["n_seeds"] = s["n"]
            row[f"{m}_gain_mean"], row[f"{m}_gain_ci95"] = s["mean"], s["ci95"]
            c = summarize(paired_diffs(s2, control, f"post_{m}")) if len(control) else {"mean": np.nan, "ci95": np.nan}
            row[f"{m}_gain_over_control_mean"], row[f"{m}_gain_over_control_ci95"] = c["mean"], c["ci95"]
            if m not in METRICS:  # the paper's gains are teacher-forced, beside the official metrics only
                continue
            kw = dict(protocol=keys["protocol"], model=paper_model(keys["model"], paper),
                      dataset=paper_dataset(keys["dataset"], paper), metric=m)
            row[f"{m}_gain_paper"] = paper_value(ref["main"], editor=base + "²", **kw) - paper_value(ref["main"], editor=base, **kw)
        rows.append(row)
    return pd.DataFrame(rows)


def claim_msbp(cells, ref, paper, tests):
    subs, evidence = [], []
    for keys, s1, s2, control, kind in msbp_pairs(cells):
        base = editor_label(keys["editor"], 1, keys["loss"])
        t = tests.gain(s2, s1, "average")
        where = f"{keys['dataset']}/{keys['protocol']}"
        subs.append(subtest(keys["variant_label"], f"{base}² − {base}, average, {where}", t))
        if kind == "control cells":  # MSBP beyond the extra Adam iterations it brings (quirk 22)
            t = tests.gain(s2, control, "average")
            subs.append(subtest(keys["variant_label"],
                                 f"{base}² − {base} with {base}²'s Adam iterations, average, {where}", t))
        p = _ref_avg(ref, paper, keys["model"], keys["dataset"], keys["protocol"], base + "²") - \
            _ref_avg(ref, paper, keys["model"], keys["dataset"], keys["protocol"], base)
        if pd.notna(p):
            evidence.append(f"{base}→{base}² {paper_dataset(keys['dataset'], paper)}/{keys['protocol']} "
                            f"({paper_model(keys['model'], paper)}): {p:+.2f}")
    return subs, sorted(set(evidence))
