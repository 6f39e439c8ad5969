"""Writing the results: a table as CSV, Markdown and LaTeX (ours as 'mean ± 95% CI'), and the
claims' sub-tests as CSV rows and a Markdown report."""

from __future__ import annotations

import numpy as np
import pandas as pd

import studies
from seed_statistics import combine


# --- tables ---------------------------------------------------------------------------------------


def fmt(x, digits=2) -> str:
    """A number rounded for display; empty for NaN."""
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable columns: 'mean ± ci' for each *_mean/*_ci95 pair, other numbers rounded."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col.endswith("_ci95"):
            continue
        if col.endswith("_mean"):
            base = col[: -len("_mean")]
            ci = table.get(f"{base}_ci95")
            out[base] = [
                (fmt(m) + (f" ± {fmt(c)}" if ci is not None and pd.notna(c) else "")) if pd.notna(m) else ""
                for m, c in zip(table[col], ci if ci is not None else [np.nan] * len(table))
            ]
        elif pd.api.types.is_float_dtype(table[col]):
            out[col] = [fmt(v, 3 if "per_edit" in col or "ratio" in col else 2) for v in table[col]]
        else:
            out[col] = table[col].astype(str).replace({"nan": ""})
    return out


def _latex_unicode(text: str) -> str:
    for a, b in {"²": r"\textsuperscript{2}", "³": r"\textsuperscript{3}", "⁴": r"\textsuperscript{4}",
                 "±": r"$\pm$", "→": r"$\to$", "×": r"$\times$", "∇": r"$\nabla$", "Δ": r"$\Delta$"}.items():
        text = text.replace(a, b)
    return text


def write_table(table: pd.DataFrame, csv: str, md: str, tex: str, title: str, note: str = "") -> None:
    """One table as CSV (all numbers), Markdown and LaTeX (formatted 'mean ± 95% CI')."""
    table.to_csv(csv, index=False)
    shown = display_frame(table)
    with open(md, "w") as fh:
        fh.write(f"# {title}\n\n")
        if note:
            fh.write(note + "\n\n")
        fh.write(shown.to_markdown(index=False) if len(shown) else "_no rows_")
        fh.write("\n")
    latex = shown.to_latex(index=False, escape=True, caption=title, longtable=False) if len(shown) else "% no rows\n"
    with open(tex, "w") as fh:
        fh.write(_latex_unicode(latex))


# --- claims ---------------------------------------------------------------------------------------


def evaluate_claims(cells: pd.DataFrame, ref: dict, paper: dict, opts: dict) -> tuple[pd.DataFrame, str]:
    """Every claim's sub-tests (CSV rows) and the Markdown report."""
    rows, lines = [], []
    alpha, margin = opts["alpha"], opts["equivalence_margin"]
    variants = sorted(set(cells.variant_label)) if len(cells) else []
    lines += [
        "# Claims of the paper, tested at this scale", "",
        "Each claim is split into sub-tests. A sub-test compares two settings on the same seeds (a seed fixes "
        "the edit order) with a two-sided one-sample t-test on the per-seed differences "
        f"(scipy.stats.ttest_1samp, α = {alpha}): **holds** when the difference is significant in the claimed "
        "direction, **does not hold** when it is significant against it, **inconclusive** when it is not "
        "significant or there are fewer than 2 seeds. \"Similar quality\" is a two one-sided tests (TOST) "
        f"equivalence test with margin ±{margin} points. A claim holds when all its sub-tests hold, does not hold "
        "when any does not, and is inconclusive otherwise; verdicts are given per variant.", "",
        "Variants: " + ", ".join(f"`{v}`" for v in variants) + ".", "",
        "| claim | " + " | ".join(variants) + " |", "| --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    sections, summary = [], []
    claim_functions = studies.functions("claim")
    for cid, (claim_study, text) in studies.CLAIMS.items():
        if claim_study not in set(cells.study):
            continue
        subs, evidence = claim_functions[cid](cells, ref, paper, opts)
        verdicts = {v: combine(s["verdict"] for s in subs if s["variant"] == v) for v in variants}
        summary.append(f"| {text} | " + " | ".join(verdicts[v] for v in variants) + " |")
        for s in subs:
            rows.append({"claim": cid, **s, "claim_verdict": verdicts[s["variant"]]})
        sec = [f"## {text}", "", "**Paper's evidence** (resources/reference): " + ("; ".join(evidence) or "none found") + ".", ""]
        for v in variants:
            vs = [s for s in subs if s["variant"] == v]
            sec += [f"### Variant `{v}`: **{verdicts[v]}**", ""]
            if not vs:
                sec += ["_no cells for this claim in this variant_", ""]
                continue
            sec += ["| sub-test | seeds | mean difference ± 95% CI | p | verdict |", "| --- | --- | --- | --- | --- |"]
            for s in vs:
                ci = f" ± {fmt(s['ci95'])}" if pd.notna(s["ci95"]) else ""
                sec.append(f"| {s['test']} | {s['n']} | {fmt(s['mean_diff'])}{ci} | {fmt(s['p'], 4)} | {s['verdict']} ({s['why']}) |")
            sec.append("")
        sections += sec
    lines += summary + [""] + sections
    return pd.DataFrame(rows), "\n".join(lines) + "\n"
