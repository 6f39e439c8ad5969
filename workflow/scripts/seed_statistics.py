"""Statistics over seeds for the tables: mean and 95% t-interval, and differences paired by seed (a
seed fixes the edit order, so both settings saw the same edits). The claims' tests, request by
request, are in paired_tests.py.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats


def t_halfwidth(values: Iterable[float], level: float = 0.95) -> float:
    """Half-width of the two-sided t-interval of the mean (NaN with fewer than 2 values)."""
    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    if len(x) < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(values: Iterable[float]) -> dict:
    x = [float(v) for v in values if pd.notna(v)]
    return {"n": len(x), "mean": float(np.mean(x)) if x else float("nan"), "ci95": t_halfwidth(x)}


def paired_diffs(a: pd.DataFrame, b: pd.DataFrame, column: str) -> pd.Series:
    """Per-seed a[column] - b[column], on the seeds both have."""
    left, right = a.set_index("seed")[column], b.set_index("seed")[column]
    seeds = left.index.intersection(right.index, sort=False)
    return left.loc[seeds] - right.loc[seeds]


GROUP_KEYS = ["variant_label", "dataset", "model", "protocol", "editor", "label", "steps", "iterations", "loss",
              "hypernetworks", "turns", "edits", "train_turns"]


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
