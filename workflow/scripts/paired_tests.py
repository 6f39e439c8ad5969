"""The claims' tests: two cells compared request by request, seeds as clusters (docs/statistics.md).

Both cells of a comparison ran on the same seeds, and a seed fixes the edit order, so on a seed both
edited the same requests: each request gives a paired difference ``A − B`` of its scores. The effect is
the mean over seeds of each seed's mean difference; its sampling distribution comes from a two-stage
(hierarchical) bootstrap — seeds with replacement, then requests with replacement within each drawn
seed — with a seeded generator, so a report is reproducible. Verdicts:

* a claimed gain (A > B): **holds** when the one-sided (1 − α) lower bound is above 0; **contradicted**
  when the upper bound is below 0, or when the (1 − 2α) interval lies inside ±margin (equivalence:
  no gain worth the name); else **inconclusive**, with the minimum detectable effect;
* a claimed similarity (|A − B| < margin): **holds** when the (1 − 2α) interval lies inside ±margin
  (two one-sided tests); **contradicted** when it lies wholly beyond one side; else inconclusive;
* **edits had no effect** when, in both cells, every per-request score after editing equals the one
  before: a null that is no evidence either way.

Quantities measured once per cell (training time) have no requests: they get a one-sided t-test over
seeds (:meth:`Comparisons.seed_gain`), in the same vocabulary.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from studies import QUALITY

HOLDS, CONTRADICTED, INCONCLUSIVE, NO_EFFECT = "holds", "contradicted", "inconclusive", "edits had no effect"
NO_EFFECT_WHY = "every per-request score after editing equals the one before, in both cells"
POWER = 0.8  # the power the minimum detectable effect is stated at
CHUNK = 4_000_000  # bootstrap indices drawn at once (memory bound for cells of many thousand edits)


def mde(se: float, alpha: float, power: float = POWER, *, equivalence: bool = False) -> float:
    """Minimum detectable effect of a one-sided level-``alpha`` test with standard error ``se``:
    ``(z_{1-α} + z_{power}) · se``. For an equivalence test, the smallest margin shown with that power
    when the true difference is 0: ``(z_{1-α} + z_{(1+power)/2}) · se``."""
    z_power = stats.norm.ppf((1 + power) / 2 if equivalence else power)
    return float((stats.norm.ppf(1 - alpha) + z_power) * se)


def hierarchical_bootstrap(diffs: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` draws of the mean over seeds of each seed's mean difference: each draw picks as many
    seeds as there are, with replacement, then within each picked seed as many requests as it has,
    with replacement."""
    n_seeds = len(diffs)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    means = np.empty((n_boot, n_seeds))
    for s, d in enumerate(diffs):
        slots = np.flatnonzero(picks.ravel() == s)
        step = max(1, CHUNK // len(d))
        for start in range(0, len(slots), step):
            part = slots[start:start + step]
            means.ravel()[part] = d[rng.integers(0, len(d), size=(len(part), len(d)))].mean(axis=1)
    return means.mean(axis=1)


def _result(n_seeds, n_requests, estimate, lo, hi, se, m, p, verdict, why, unit="points", seed_means=(),
            method="") -> dict:
    return {"n": int(n_seeds), "requests": int(n_requests), "mean": float(estimate), "lo": float(lo), "hi": float(hi),
            "se": float(se), "mde": float(m), "p": float(p), "verdict": verdict, "why": why, "unit": unit,
            "seed_means": [float(x) for x in seed_means], "method": method, "heterogeneity_p": float("nan")}


def _too_few(n_seeds: int, n_requests: int, estimate: float, unit: str = "points") -> dict | None:
    if n_seeds >= 2:
        return None
    nan = float("nan")
    why = "fewer than 2 seeds in common" if n_seeds else "no seeds in common"
    return _result(n_seeds, n_requests, estimate, nan, nan, nan, nan, nan, INCONCLUSIVE, why, unit)


def decide(estimate: float, lo: float, hi: float, *, claim: str, margin: float | None, alpha: float) -> tuple[str, str]:
    """The verdict from the (1 − 2α) interval [lo, hi] (each end a one-sided level-α bound)."""
    level = f"{100 * (1 - 2 * alpha):g}% interval"
    inside = margin is not None and -margin < lo and hi < margin
    if claim == "gain":
        if lo > 0:
            return HOLDS, f"{level} above 0"
        if hi < 0:
            return CONTRADICTED, f"{level} below 0"
        if inside:
            return CONTRADICTED, f"{level} inside ±{margin:g}: equivalent, no gain"
        return INCONCLUSIVE, f"{level} includes 0"
    if claim == "similar":
        if inside:
            return HOLDS, f"{level} inside ±{margin:g}"
        if lo > margin or hi < -margin:
            return CONTRADICTED, f"{level} beyond ±{margin:g}"
        return INCONCLUSIVE, f"{level} crosses ±{margin:g}"
    raise ValueError(f"unknown claim kind {claim!r}")


def paired_test(diffs: Sequence[Iterable[float]], *, claim: str, alpha: float, margin: float | None, n_boot: int,
                rng: np.random.Generator, no_effect: bool = False) -> dict:
    """The test of one comparison from its per-seed arrays of per-request differences A − B."""
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    diffs = [d[np.isfinite(d)] for d in diffs]
    diffs = [d for d in diffs if len(d)]
    seed_means = [float(d.mean()) for d in diffs]
    estimate = float(np.mean(seed_means)) if diffs else float("nan")
    n_requests = sum(len(d) for d in diffs)
    few = _too_few(len(diffs), n_requests, estimate)
    if few is not None:
        return few
    het = heterogeneity(diffs)
    if het < alpha:  # the seeds disagree beyond request noise: the seeds are the units (t over seeds)
        out = seed_test(seed_means, alpha=alpha, unit="points", claim=claim, margin=margin)
        why = f"seeds disagree (heterogeneity p = {het:.2g}): t over seed means, {out['why']}"
        if no_effect:
            out["verdict"], why = NO_EFFECT, NO_EFFECT_WHY
        return {**out, "requests": n_requests, "why": why, "method": "t over seeds", "heterogeneity_p": het}
    boot = hierarchical_bootstrap(diffs, n_boot, rng)
    lo, hi = (float(x) for x in np.quantile(boot, [alpha, 1 - alpha]))
    se = float(boot.std(ddof=1))
    if claim == "gain":
        p = (1 + np.count_nonzero(boot <= 0)) / (n_boot + 1)
    else:
        p = (1 + max(np.count_nonzero(boot <= -margin), np.count_nonzero(boot >= margin))) / (n_boot + 1)
    m = mde(se, alpha, equivalence=claim == "similar")
    if no_effect:
        verdict, why = NO_EFFECT, NO_EFFECT_WHY
    else:
        verdict, why = decide(estimate, lo, hi, claim=claim, margin=margin, alpha=alpha)
    return {**_result(len(diffs), n_requests, estimate, lo, hi, se, m, p, verdict, why, seed_means=seed_means),
            "method": "two-stage bootstrap", "heterogeneity_p": het}


def heterogeneity(diffs: Sequence[np.ndarray]) -> float:
    """p-value of the seed × comparison interaction: one-way ANOVA of the per-request differences
    across seeds (scipy.stats.f_oneway); 1 when it cannot be computed (no spread within seeds)."""
    if len(diffs) < 2 or any(len(d) < 2 for d in diffs) or all(np.ptp(d) == 0 for d in diffs):
        return 1.0
    with np.errstate(all="ignore"):
        p = stats.f_oneway(*diffs).pvalue
    return float(p) if np.isfinite(p) else 1.0


def seed_test(values: Iterable[float], *, alpha: float, unit: str, claim: str = "gain",
              margin: float | None = None) -> dict:
    """One-sided t-test over seeds (t with seeds − 1 degrees of freedom) of a claimed gain (mean > 0)
    or, with ``claim="similar"``, two one-sided tests against ±margin: for a quantity measured once
    per cell, or per-seed means when the seeds disagree."""
    x = np.asarray([v for v in values if pd.notna(v)], dtype=float)
    estimate = float(x.mean()) if len(x) else float("nan")
    few = _too_few(len(x), 0, estimate, unit)
    if few is not None:
        return few
    df = len(x) - 1
    se = float(x.std(ddof=1) / np.sqrt(len(x)))
    half = float(stats.t.ppf(1 - alpha, df) * se)
    shifts = [0.0] if claim == "gain" else [-margin, margin]
    if se == 0:
        ps = [0.0 if (estimate - c) * (1 if c <= 0 else -1) > 0 else 1.0 for c in shifts]
    else:
        ps = [float(stats.ttest_1samp(x, c, alternative="greater" if c <= 0 else "less").pvalue) for c in shifts]
    power_q = POWER if claim == "gain" else (1 + POWER) / 2
    m = float((stats.t.ppf(1 - alpha, df) + stats.t.ppf(power_q, df)) * se)
    verdict, why = decide(estimate, estimate - half, estimate + half, claim=claim, margin=margin, alpha=alpha)
    return {**_result(len(x), 0, estimate, estimate - half, estimate + half, se, m, max(ps), verdict,
                      f"t-test over seeds: {why}", unit, seed_means=x), "method": "t over seeds",
            "heterogeneity_p": float("nan")}


def combine(verdicts: Iterable[str]) -> str:
    """A claim is contradicted when any sub-test is, holds when every sub-test holds; when the rest
    are 'edits had no effect' it says so; else inconclusive."""
    v = list(verdicts)
    if not v:
        return INCONCLUSIVE
    if CONTRADICTED in v:
        return CONTRADICTED
    if all(x == HOLDS for x in v):
        return HOLDS
    if all(x in (HOLDS, NO_EFFECT) for x in v):
        return NO_EFFECT
    return INCONCLUSIVE


def verdict_text(test: dict) -> str:
    """'inconclusive (MDE 3.1 points)', or the verdict as it is."""
    if test["verdict"] == INCONCLUSIVE and pd.notna(test["mde"]):
        return f"inconclusive (MDE {test['mde']:.2f} {test['unit']})"
    return test["verdict"]


def subtest(variant: str, what: str, test: dict, **extra) -> dict:
    """One sub-test of a claim (a row of results/claims.csv): what was compared and the test's result."""
    return {"variant": variant, "test": what, "n": test["n"], "requests": test["requests"], "mean_diff": test["mean"],
            "lo": test["lo"], "hi": test["hi"], "se": test["se"], "mde": test["mde"], "unit": test["unit"],
            "p": test["p"], "method": test["method"], "heterogeneity_p": test["heterogeneity_p"],
            "verdict": test["verdict"], "verdict_text": verdict_text(test), "why": test["why"],
            "seed_means": " ".join(f"{x:.2f}" for x in test["seed_means"]), **extra}


class Comparisons:
    """The claims' comparisons of cells on one view's per-request scores (the ``requests`` table of
    the aggregate rule), with the options of config ``claims``."""

    def __init__(self, requests: pd.DataFrame, opts: dict):
        self.opts = opts
        self.alpha = float(opts["alpha"])
        self.margin = float(opts["equivalence_margin"])
        self.n_boot = int(opts.get("bootstrap_resamples", 4000))
        self.seed = int(opts.get("bootstrap_seed", 0))
        self.view = opts.get("view", "teacher_forced")
        mine = requests[requests["view"] == self.view]
        wide = mine.pivot_table(index=["path", "seed", "request"], columns="metric", values=["pre", "post"],
                                aggfunc="first", dropna=False)
        wide.columns = [f"{phase}_{metric}" for phase, metric in wide.columns]
        for phase in ("pre", "post"):
            cols = [f"{phase}_{m}" for m in QUALITY]
            if all(c in wide for c in cols):
                wide[f"{phase}_average"] = wide[cols].mean(axis=1, skipna=False)
        self._by_path = {path: g.droplevel("path") for path, g in wide.groupby(level="path", sort=False)}

    def _scores(self, cells: pd.DataFrame, metric: str) -> dict[int, pd.DataFrame]:
        """Seed -> the per-request pre/post scores of the cell of that seed, indexed by request."""
        out = {}
        for path, seed in cells[["path", "seed"]].drop_duplicates().itertuples(index=False):
            if int(seed) in out:
                raise ValueError(f"two cells of seed {seed} in one side of a comparison: {path}")
            if path not in self._by_path:
                raise KeyError(f"{path}: no per-request scores of view {self.view!r} in the requests table")
            frame = self._by_path[path].droplevel("seed")
            out[int(seed)] = frame[[f"pre_{metric}", f"post_{metric}"]].set_axis(["pre", "post"], axis=1)
        return out

    def paired(self, a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[list[np.ndarray], bool]:
        """Per seed both sides have, the per-request differences A − B (paired on the request), and
        whether editing changed no per-request score in either cell."""
        sa, sb = self._scores(a, metric), self._scores(b, metric)
        diffs, unchanged = [], True
        for seed in sorted(set(sa) & set(sb)):
            joined = sa[seed].add_suffix("_a").join(sb[seed].add_suffix("_b"), how="inner")
            diffs.append((joined["post_a"] - joined["post_b"]).to_numpy())
            for side in "ab":
                pre, post = joined[f"pre_{side}"].to_numpy(), joined[f"post_{side}"].to_numpy()
                unchanged &= bool(np.all((pre == post) | (np.isnan(pre) & np.isnan(post))))
        return diffs, unchanged and bool(diffs)

    def rng(self, *parts) -> np.random.Generator:
        """A generator seeded by config claims.bootstrap_seed and what is compared: the same
        comparison draws the same resamples whatever else the report holds."""
        digest = hashlib.sha256("\x1f".join(map(str, (self.seed, *parts))).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def _test(self, a, b, metric, claim, margin):
        diffs, unchanged = self.paired(a, b, metric)
        rng = self.rng(claim, metric, sorted(a["path"].unique()), sorted(b["path"].unique()))
        return paired_test(diffs, claim=claim, alpha=self.alpha, margin=margin, n_boot=self.n_boot, rng=rng,
                           no_effect=unchanged)

    def gain(self, a: pd.DataFrame, b: pd.DataFrame, metric: str = "average") -> dict:
        """The paper claims cells ``a`` score higher than ``b`` on ``metric``."""
        return self._test(a, b, metric, "gain", self.margin)

    def similar(self, a: pd.DataFrame, b: pd.DataFrame, metric: str = "average") -> dict:
        """The paper claims ``a`` and ``b`` score within ±equivalence_margin on ``metric``."""
        return self._test(a, b, metric, "similar", self.margin)

    def seed_gain(self, values: pd.Series, unit: str) -> dict:
        """The paper claims a per-cell quantity (one value per seed) is above 0."""
        return seed_test(values, alpha=self.alpha, unit=unit)
