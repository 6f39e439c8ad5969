"""Statistics over seeds: mean and 95% t-interval, paired differences, the one-sample and TOST
tests behind the claims' sub-tests, and how sub-test verdicts combine into a claim's.

Differences are paired by seed: a seed fixes the edit order, so both settings saw the same edits.
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


def subtest(variant, what, test, **extra):
    """One sub-test of a claim (a row of results/claims.csv): what was compared and the test's result."""
    return {"variant": variant, "test": what, "n": test["n"], "mean_diff": test["mean"], "ci95": test["ci95"],
            "p": test["p"], "verdict": test["verdict"], "why": test["why"], **extra}


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
