"""The claims' verdict logic on synthetic per-request scores with a known truth (docs/statistics.md):
no effect, a real effect, a reversed effect, similarity, and edits that changed nothing.

The generator mimics teacher-forced token accuracy: each request has a difficulty (its token hit
probability, shared by both cells, since a seed fixes the edit order), each seed shifts every
request's probability by a seed offset (sd 10 points, shared by both cells), and a request's score
is 100 × the share of its ``TOKENS`` answer tokens hit (Bernoulli). Many draws are generated at once
(vectorised); each is tested as the claims rule tests a comparison. Fast: a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

import paired_tests  # noqa: E402
from paired_tests import CONTRADICTED, HOLDS, INCONCLUSIVE, NO_EFFECT, Comparisons, paired_test  # noqa: E402

ALPHA, MARGIN, DRAWS, RESAMPLES = 0.05, 2.0, 200, 1000
SEEDS, REQUESTS, TOKENS = 3, 20, 4  # the default run's scale: 3 seeds, 16-20 edits each


def scores(rng, effect: float, *, draws=DRAWS, seeds=SEEDS, requests=REQUESTS, seed_sd=10.0):
    """(A, B) per-request scores in 0..100, shape (draws, seeds, requests); A's token probability is
    B's plus ``effect`` points."""
    difficulty = rng.uniform(0.15, 0.85, size=(draws, seeds, requests))
    p = difficulty + rng.normal(0.0, seed_sd / 100, size=(draws, seeds, 1))
    a = 100 * rng.binomial(TOKENS, np.clip(p + effect / 100, 0, 1)) / TOKENS
    b = 100 * rng.binomial(TOKENS, np.clip(p, 0, 1)) / TOKENS
    return a, b


def verdicts(effect: float, claim: str = "gain", seed: int = 0, **kw) -> tuple[list[str], list[dict]]:
    a, b = scores(np.random.default_rng(seed), effect, **kw)
    tests = [paired_test(list(d), claim=claim, alpha=ALPHA, margin=MARGIN, n_boot=RESAMPLES,
                         rng=np.random.default_rng([seed, i])) for i, d in enumerate(a - b)]
    return [t["verdict"] for t in tests], tests


def binomial_ceiling(p: float, n: int = DRAWS) -> int:
    """The most rejections a level-p test may show in n draws before we call it miscalibrated (one-sided 0.1 %)."""
    return int(stats.binom.ppf(0.999, n, p))


@pytest.fixture(scope="module")
def null_draws():
    return verdicts(0.0)


def test_no_effect_false_positive_rate_is_at_most_alpha(null_draws):
    v, tests = null_draws
    holds, against = v.count(HOLDS), sum(t["verdict"] == CONTRADICTED and t["hi"] < 0 for t in tests)
    print(f"false-positive rate: {holds / DRAWS:.3f} claimed direction, {against / DRAWS:.3f} reversed")
    assert holds <= binomial_ceiling(ALPHA), f"{holds} of {DRAWS} null draws 'hold'"
    assert against <= binomial_ceiling(ALPHA), f"{against} of {DRAWS} null draws significant the other way"
    assert v.count(INCONCLUSIVE) >= 0.8 * DRAWS
    assert all(np.isfinite(t["mde"]) and t["mde"] > 0 for t in tests)


def test_real_effect_of_twice_the_mde_holds(null_draws):
    mde = float(np.median([t["mde"] for t in null_draws[1]]))
    v, _ = verdicts(2 * mde, seed=1)
    print(f"MDE {mde:.2f} points; power at 2 × MDE: {v.count(HOLDS) / DRAWS:.3f}")
    assert v.count(HOLDS) >= 0.8 * DRAWS
    assert v.count(CONTRADICTED) == 0
    v, _ = verdicts(mde, seed=2)  # at the MDE itself, about the stated 80 % (bootstrap, 3 seeds: loosely)
    print(f"power at 1 × MDE: {v.count(HOLDS) / DRAWS:.3f}")
    assert 0.6 * DRAWS <= v.count(HOLDS)


def test_reversed_effect_is_contradicted(null_draws):
    mde = float(np.median([t["mde"] for t in null_draws[1]]))
    v, tests = verdicts(-2 * mde, seed=3)
    assert v.count(HOLDS) == 0
    assert sum(t["verdict"] == CONTRADICTED and t["hi"] < 0 for t in tests) >= 0.8 * DRAWS


def test_equivalence_both_ways():
    """Many requests: no effect is 'similar' (and contradicts a claimed gain); a large one is not similar."""
    big = dict(draws=40, requests=2000)
    v, _ = verdicts(0.0, "similar", seed=4, **big)
    assert v.count(HOLDS) >= 0.8 * 40
    v, tests = verdicts(0.0, "gain", seed=5, **big)
    assert sum(t["verdict"] == CONTRADICTED and t["hi"] > 0 for t in tests) >= 0.8 * 40  # equivalent: no gain
    v, _ = verdicts(10.0, "similar", seed=6, **big)
    assert v.count(CONTRADICTED) >= 0.8 * 40
    assert paired_test([[0.5] * 5, [0.4] * 5], claim="similar", alpha=ALPHA, margin=MARGIN, n_boot=200,
                       rng=np.random.default_rng(0))["verdict"] == HOLDS  # no spread, inside the margin


def test_one_seed_or_none_is_inconclusive_and_no_spread_decides():
    rng = np.random.default_rng(0)
    one = paired_test([[5.0, 6.0, 7.0]], claim="gain", alpha=ALPHA, margin=MARGIN, n_boot=200, rng=rng)
    assert one["verdict"] == INCONCLUSIVE and "fewer than 2 seeds" in one["why"]
    assert paired_test([], claim="gain", alpha=ALPHA, margin=MARGIN, n_boot=200, rng=rng)["verdict"] == INCONCLUSIVE
    flat = paired_test([[3.0] * 4, [3.0] * 4], claim="gain", alpha=ALPHA, margin=MARGIN, n_boot=200, rng=rng)
    assert flat["verdict"] == HOLDS and flat["se"] == 0 and flat["mean"] == 3.0


def test_mde_formula():
    z = stats.norm.ppf
    assert paired_tests.mde(1.0, 0.05) == pytest.approx(z(0.95) + z(0.8))
    assert paired_tests.mde(2.0, 0.05, equivalence=True) == pytest.approx(2 * (z(0.95) + z(0.9)))


def test_seed_level_test_for_per_cell_quantities():
    assert paired_tests.seed_test([35.0, 36.0, 34.0], alpha=ALPHA, unit="%")["verdict"] == HOLDS
    assert paired_tests.seed_test([-35.0, -36.0, -34.0], alpha=ALPHA, unit="%")["verdict"] == CONTRADICTED
    t = paired_tests.seed_test([30.0, -20.0, 5.0], alpha=ALPHA, unit="%")
    assert t["verdict"] == INCONCLUSIVE and paired_tests.verdict_text(t).startswith("inconclusive (MDE ")
    assert t["mde"] == pytest.approx((stats.t.ppf(0.95, 2) + stats.t.ppf(0.8, 2)) * t["se"])
    assert paired_tests.seed_test([35.0], alpha=ALPHA, unit="%")["verdict"] == INCONCLUSIVE


def test_combine():
    c = paired_tests.combine
    assert c([HOLDS, HOLDS]) == HOLDS
    assert c([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert c([HOLDS, CONTRADICTED, INCONCLUSIVE]) == CONTRADICTED
    assert c([HOLDS, NO_EFFECT]) == NO_EFFECT
    assert c([NO_EFFECT, INCONCLUSIVE]) == INCONCLUSIVE
    assert c([]) == INCONCLUSIVE


# --- through the requests table, as the claims rule reads it ---------------------------------------


def requests_table(cells: dict[str, tuple[int, np.ndarray, np.ndarray]], view="teacher_forced") -> pd.DataFrame:
    """The aggregate rule's per-request rows for cells path -> (seed, pre, post) (the same scores for
    every quality metric)."""
    rows = []
    for path, (seed, pre, post) in cells.items():
        for metric in ("efficacy", "generalization", "specificity"):
            rows += [{"path": path, "seed": seed, "view": view, "metric": metric, "position": i, "request": 100 + i,
                      "pre": a, "post": b} for i, (a, b) in enumerate(zip(pre, post))]
    return pd.DataFrame(rows)


def frame(*paths_seeds) -> pd.DataFrame:
    return pd.DataFrame([{"path": p, "seed": s} for p, s in paths_seeds])


OPTS = {"alpha": ALPHA, "equivalence_margin": MARGIN, "bootstrap_resamples": 500, "bootstrap_seed": 7}


def test_comparisons_pair_by_request_and_flag_edits_without_effect():
    rng = np.random.default_rng(11)
    a, b = scores(rng, 30.0, draws=1, seeds=3, requests=40)
    pre = np.full((3, 40), 20.0)
    cells = {f"a{s}": (s, pre[s], a[0, s]) for s in range(3)} | {f"b{s}": (s, pre[s], b[0, s]) for s in range(3)}
    tests = Comparisons(requests_table(cells), OPTS)
    A, B = frame(*((f"a{s}", s) for s in range(3))), frame(*((f"b{s}", s) for s in range(3)))
    t = tests.gain(A, B, "average")
    assert t["verdict"] == HOLDS and t["n"] == 3 and t["requests"] == 120
    assert t["mean"] == pytest.approx((a - b).mean())  # equal seeds: the mean of the paired differences
    assert tests.gain(B, A, "efficacy")["verdict"] == CONTRADICTED
    assert tests.gain(A, B) == Comparisons(requests_table(cells), OPTS).gain(A, B)  # seeded: reproducible
    # a third cell on other seeds pairs only on the seeds in common
    assert tests.gain(A, frame(("b0", 0), ("b1", 1)), "average")["n"] == 2
    # edits that changed nothing, in both cells: flagged, not evidence
    same = {f"u{s}": (s, pre[s], pre[s]) for s in range(3)} | {f"v{s}": (s, pre[s], pre[s]) for s in range(3)}
    tests = Comparisons(requests_table(same), OPTS)
    U, V = frame(*((f"u{s}", s) for s in range(3))), frame(*((f"v{s}", s) for s in range(3)))
    for verdict in (tests.gain(U, V)["verdict"], tests.similar(U, V)["verdict"]):
        assert verdict == NO_EFFECT
    # another view is read by name, and only that view
    other = Comparisons(pd.concat([requests_table(cells), requests_table(same, view="generated")]),
                        {**OPTS, "view": "generated"})
    assert other.gain(U, V)["verdict"] == NO_EFFECT
    with pytest.raises(KeyError, match="no per-request scores of view 'generated'"):
        other.gain(A, B)


def test_seeds_that_disagree_fall_back_to_a_t_test_over_seeds():
    """A seed × comparison interaction far beyond request noise makes the seeds the units."""
    rng = np.random.default_rng(12)
    diffs = [rng.normal(mu, 1.0, 50) for mu in (2.0, 12.0, 22.0)]
    t = paired_test(diffs, claim="gain", alpha=ALPHA, margin=MARGIN, n_boot=500, rng=rng)
    assert t["method"] == "t over seeds" and t["heterogeneity_p"] < 1e-6 and "seeds disagree" in t["why"]
    assert t["verdict"] == INCONCLUSIVE  # 3 seed means 2, 12, 22: t with 2 df does not exclude 0
    calm = paired_test([rng.normal(5.0, 1.0, 50) for _ in range(3)], claim="gain", alpha=ALPHA, margin=MARGIN,
                       n_boot=500, rng=rng)
    assert calm["method"] == "two-stage bootstrap" and calm["verdict"] == HOLDS
