"""Writing the results: a table as CSV, Markdown and LaTeX (ours as 'mean ± 95% CI'; a table of
quality metrics in one block per metric view), and the claims' sub-tests, on every view the records
carry, as CSV rows and a report (Markdown, and the same as HTML for the Snakemake report)."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd

import studies
from paired_tests import HOLDS, INCONCLUSIVE, POWER, Comparisons, combine


# --- tables ---------------------------------------------------------------------------------------


NONE = "—"  # a score with nothing behind it (null, count 0: e.g. portability without portability data)


def fmt(x, digits=2) -> str:
    """A number rounded for display; empty for NaN."""
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable columns: 'mean ± ci' for each *_mean/*_ci95 pair ("—" without a mean), other
    numbers rounded."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col.endswith("_ci95"):
            continue
        if col.endswith("_mean"):
            base = col[: -len("_mean")]
            ci = table.get(f"{base}_ci95")
            out[base] = [
                (fmt(m) + (f" ± {fmt(c)}" if ci is not None and pd.notna(c) else "")) if pd.notna(m) else NONE
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


VIEW_HEADINGS = {
    "teacher_forced": "Teacher-forced view (the official protocol; `*_paper`: the paper's numbers, teacher-forced "
                      "too; portability and locality: teacher-forced, against the new answer and the unedited model)",
    "generated": "Generated view (greedy answers scored by exact match; ours only: the paper reports teacher-forced "
                 "scores)",
}


def view_blocks(table: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """A table as its Markdown and LaTeX show it: (view, frame) per metric view when it reports
    quality metrics — the teacher-forced columns, then the generated ones (``generated_*``, the
    prefix dropped) beside the table's keys, without rows that have no generated score, when any
    row has one — else the table as it is (view None)."""
    if not any(c.startswith(f"{m}_") for c in table.columns for m in studies.METRICS):
        return [(None, table)]
    generated = [c for c in table.columns if c.startswith(studies.GENERATED_PREFIX)]
    official = table.drop(columns=generated)
    blocks = [("teacher_forced", official)]
    keys = [c for c in official.columns if not c.endswith(("_mean", "_ci95")) and "paper" not in c]
    block = table.loc[table[generated].notna().any(axis=1), keys + generated]
    if len(block):  # generated scores all null (or none): the teacher-forced block says so
        blocks.append(("generated", block.rename(columns=lambda c: c.removeprefix(studies.GENERATED_PREFIX))))
    return blocks


def write_table(table: pd.DataFrame, csv: str, md: str, tex: str, title: str, note: str = "") -> None:
    """One table as CSV (all numbers, every view's columns) and as Markdown and LaTeX (formatted
    'mean ± 95% CI', one block per view: :func:`view_blocks`; without generated scores the
    teacher-forced block says so)."""
    table.to_csv(csv, index=False)
    blocks = view_blocks(table)
    md_parts, tex_parts = [f"# {title}\n\n" + (note + "\n\n" if note else "")], []
    for view, block in blocks:
        shown = display_frame(block)
        if view is not None:
            md_parts.append(f"## {VIEW_HEADINGS[view]}\n\n")
            if len(blocks) == 1:
                md_parts.append(f"_{studies.NO_GENERATED[0].upper() + studies.NO_GENERATED[1:]}._\n\n")
        md_parts.append((shown.to_markdown(index=False) if len(shown) else "_no rows_") + "\n\n")
        caption = title if view is None else f"{title} ({studies.VIEWS[view]})"
        tex_parts.append(shown.to_latex(index=False, escape=True, caption=caption, longtable=False) if len(shown)
                         else f"% {caption}: no rows\n")
    with open(md, "w") as fh:
        fh.write("".join(md_parts).rstrip("\n") + "\n")
    with open(tex, "w") as fh:
        fh.write(_latex_unicode("\n".join(tex_parts)))


# --- claims ---------------------------------------------------------------------------------------

# A report is a list of blocks, rendered once as Markdown and once as HTML (the same content):
# ("h1" | "h2" | "h3" | "p", text) or ("table", header, rows); text may hold **bold** and `code`.


def _signed(x, digits=2) -> str:
    return "" if pd.isna(x) else f"{x:+.{digits}f}"


def _brief(items: list[str], limit: int = 110) -> str:
    text = "; ".join(items) or "none found"
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _ranges(subs: list[dict], column: str, show, dash: str) -> str:
    """Per unit, the range of a column over sub-tests ("+1.00 … +3.00 points, 35.00 %")."""
    parts = []
    for unit in dict.fromkeys(s["unit"] for s in subs):
        vals = [s[column] for s in subs if s["unit"] == unit and pd.notna(s[column])]
        if vals:
            lo, hi = show(min(vals)), show(max(vals))
            parts.append(f"{lo} {unit}" if lo == hi else f"{lo}{dash}{hi} {unit}")
    return ", ".join(parts)


def _ours(subs: list[dict]) -> str:
    """A claim's effects in a line: how many sub-tests hold, and the range of effects per unit."""
    held = f"{sum(s['verdict'] == HOLDS for s in subs)}/{len(subs)} hold"
    effects = _ranges(subs, "mean_diff", _signed, " … ")
    return f"{held}; {effects}" if effects else held


def _mde_range(subs: list[dict]) -> str:
    return _ranges(subs, "mde", fmt, "–")


def _claim_verdict_text(verdict: str, subs: list[dict]) -> str:
    """The claim's verdict; an inconclusive one names the largest MDE among its inconclusive sub-tests."""
    if verdict != INCONCLUSIVE:
        return verdict
    pending = [s for s in subs if s["verdict"] == INCONCLUSIVE and pd.notna(s["mde"])]
    if not pending:
        return verdict
    worst = max(pending, key=lambda s: s["mde"])
    return f"inconclusive (MDE {fmt(worst['mde'])} {worst['unit']})"


def claim_views(cells: pd.DataFrame, requests: pd.DataFrame, primary: str) -> tuple[list[str], str]:
    """The views the claims are tested on: config ``claims.view`` first, then every other view
    whose per-request scores all the records carry; and a sentence on what is missing ("" if
    nothing). The teacher-forced view is always there (the aggregate rule refuses records without)."""
    paths = set(cells["path"])
    have = [v for v in studies.VIEWS if paths <= set(requests.loc[requests["view"] == v, "path"])]
    have = have or ["teacher_forced"]
    note = ""
    if "generated" not in have:
        note = f"Only the teacher-forced scores: {studies.NO_GENERATED.split(': ', 1)[1]}."
        if len(set(requests.loc[requests["view"] == "generated", "path"]) & paths):
            note = "Only the teacher-forced scores: some records carry no generated scores."
    if primary not in have:
        note += f" Config `claims.view: {primary}` falls back to `{have[0]}`."
    first = primary if primary in have else have[0]
    return [first, *(v for v in have if v != first)], note.strip()


def agreement(verdicts: dict[str, str]) -> str:
    """How a claim's verdicts on the views compare: 'agree', 'holds on <view> only', or 'differ'."""
    if len(set(verdicts.values())) == 1:
        return "agree"
    held = [v for v, x in verdicts.items() if x == HOLDS]
    if len(held) == 1:
        return f"holds on {studies.VIEWS[held[0]]} only"
    return "differ"


def claims_report(cells: pd.DataFrame, requests: pd.DataFrame, ref: dict, paper: dict,
                  opts: dict) -> tuple[pd.DataFrame, list]:
    """Every claim's sub-tests (CSV rows, one set per view) and the report's blocks: the one-screen
    summary (each view's effects, verdict and MDE, and whether the views agree), then the details per
    claim and variant."""
    views, missing = claim_views(cells, requests, opts.get("view", "teacher_forced")) if len(cells) else \
        (["teacher_forced"], "")
    testers = {v: Comparisons(requests, {**opts, "view": v}) for v in views}
    tests = testers[views[0]]
    alpha, margin = tests.alpha, tests.margin
    level = f"{100 * (1 - 2 * alpha):g}%"
    both = len(views) > 1
    named = lambda v: f", {studies.VIEWS[v]}" if both else ""  # noqa: E731
    variants = sorted(set(cells.variant_label)) if len(cells) else []
    rows, summary, details = [], [], []
    claim_functions = studies.functions("claim")
    for cid, (claim_study, text) in studies.CLAIMS.items():
        if claim_study not in set(cells.study):
            continue
        results = {v: claim_functions[cid](cells, ref, paper, testers[v]) for v in views}
        evidence = results[views[0]][1]
        details += [("h2", text), ("p", "**Paper's evidence** (resources/reference): "
                                  + ("; ".join(evidence) or "none found") + ".")]
        for variant in variants:
            subs = {v: [s for s in results[v][0] if s["variant"] == variant] for v in views}
            if not subs[views[0]]:  # not run in this variant: no summary row, a line in the details
                details += [("h3", f"Variant `{variant}`: not run"), ("p", "_no cells for this claim in this variant_")]
                continue
            verdicts = {v: combine(s["verdict"] for s in subs[v]) for v in views}
            shown = {v: _claim_verdict_text(verdicts[v], subs[v]) for v in views}
            rows += [{"claim": cid, "view": v, **s, "claim_verdict": verdicts[v]} for v in views for s in subs[v]]
            line = [text, f"`{variant}`", _brief(evidence)]
            for v in views:
                line += [_ours(subs[v]), f"**{shown[v]}**", _mde_range(subs[v])]
            agree = agreement(verdicts)
            if both:
                line.append(agree if agree == "agree" else f"**{agree}**")
            summary.append(line)
            details.append(("h3", f"Variant `{variant}`: " + ", ".join(f"{studies.VIEWS[v]} **{shown[v]}**"
                                                                         for v in views) if both else
                            f"Variant `{variant}`: **{shown[views[0]]}**"))
            if both and agree != "agree":
                details.append(("p", f"**The views disagree** ({agree}): "
                                      + "; ".join(f"**{shown[v]}** on the {studies.VIEWS[v]} scores" for v in views)
                                      + "."))
            for v in views:
                if both:
                    details.append(("p", f"On the **{studies.VIEWS[v]}** per-request scores:"))
                details.append(("table", ["sub-test", "seeds", "requests", f"effect [{level} interval]", "MDE", "p",
                                          "per-seed effects", "verdict"],
                                [[s["test"], str(s["n"]), str(s["requests"] or "—"),
                                  f"{_signed(s['mean_diff'])} [{_signed(s['lo'])}, {_signed(s['hi'])}] {s['unit']}",
                                  f"{fmt(s['mde'])} {s['unit']}", fmt(s["p"], 4), s["seed_means"],
                                  f"{s['verdict_text']} ({s['why']})"] for s in subs[v]]))
    header = ["claim", "variant", "paper's evidence"]
    for v in views:
        header += [f"ours{named(v)} (sub-tests, effects)", f"verdict{named(v)}", f"MDE{named(v)}"]
    if both:
        header.append("views")
    on = (f"on each view's per-request scores ({' and '.join(f'`{v}`' for v in views)}: teacher-forced, the "
          f"official token accuracy; generated, greedy answers scored by exact match)" if both else
          f"on the `{views[0]}` per-request scores")
    blocks = [
        ("h1", "Claims of the paper, tested at this scale"),
        ("p", f"Each claim is split into sub-tests, each comparing two settings on the same seeds (a seed fixes "
              f"the edit order, so both edited the same requests) request by request, {on}: the effect is the "
              f"mean over seeds of the mean per-request "
              f"difference, its {level} interval a two-stage bootstrap (seeds, then requests within each seed; "
              f"{tests.n_boot} resamples, seed {tests.seed}). A claimed gain **holds** when the interval lies "
              f"above 0 (one-sided, α = {alpha:g}) and is **contradicted** when it lies below 0 or inside "
              f"±{margin:g} points (equivalent: no gain); \"similar quality\" holds when the interval lies inside "
              f"±{margin:g} points. Otherwise the verdict is **inconclusive**, with the minimum detectable effect "
              f"(MDE: the effect this comparison would detect with {100 * POWER:g} % power). A comparison where no "
              f"edit changed any per-request score, in either cell, reads **edits had no effect**. A claim "
              f"holds when all its sub-tests hold and is contradicted when any is. Training time is measured "
              f"once per cell: a one-sided t-test over seeds. "
              + ("The `views` column says whether the views' verdicts agree, or on which view alone a claim "
                 "holds. " if both else "") + (f"{missing} " if missing else "")
              + "Method, formulas and limits: `docs/statistics.md`."),
        ("table", header, summary),
        *details,
    ]
    return pd.DataFrame(rows), blocks


def _inline_md_to_html(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"(?<![\w*])_(.+?)_(?![\w*])", r"<em>\1</em>", text)


def blocks_to_markdown(blocks: list) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "table":
            header, rows = rest
            cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
            out += ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
            out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows] + [""]
        else:
            prefix = {"h1": "# ", "h2": "## ", "h3": "### ", "p": ""}[kind]
            out += [prefix + rest[0], ""]
    return "\n".join(out)


def blocks_to_html(blocks: list, title: str) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse;"
           "margin-bottom:1em}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;text-align:left}"
           "th{background:#f3f3f3}code{background:#f6f6f6}</style>", "</head><body>"]
    for kind, *rest in blocks:
        if kind == "table":
            header, rows = rest
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline_md_to_html(h)}</th>" for h in header)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{_inline_md_to_html(str(x))}</td>" for x in r) + "</tr>" for r in rows]
            out.append("</tbody></table>")
        else:
            tag = kind
            out.append(f"<{tag}>{_inline_md_to_html(rest[0])}</{tag}>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def evaluate_claims(cells: pd.DataFrame, requests: pd.DataFrame, ref: dict, paper: dict,
                    opts: dict) -> tuple[pd.DataFrame, str, str]:
    """Every claim's sub-tests (CSV rows), and the report as Markdown and as HTML."""
    rows, blocks = claims_report(cells, requests, ref, paper, opts)
    return rows, blocks_to_markdown(blocks), blocks_to_html(blocks, "Claims of the paper, tested at this scale")
