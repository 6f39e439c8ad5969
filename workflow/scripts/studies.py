"""Every study's artifacts, declared once: its tables, its figures and their captions, its claims.

Read by the rules (which tables and figures to build, the figure captions of the HTML report) and by
the analysis: the table X of study S is computed by ``table_X`` and the claim Y by ``claim_Y``, both
in ``workflow/scripts/study_S.py`` (see ``functions``); the figure X is drawn by
``notebooks/X.py.ipynb``. A new study is its entry here, its grid in the config
(``studies.<name>``), its ``study_<name>.py`` and its notebook; nothing else names it. Standard
library only, so that the Snakefile can import it cheaply.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


# The metrics every table and figure reports (the records' metrics.pre/post keys; "average" is the
# mean of the three quality metrics, as the paper's Avg.).
QUALITY = ["efficacy", "generalization", "specificity"]
METRICS = [*QUALITY, "average"]
# The metric views (issue 12). Tables report the official teacher-forced METRICS (the paper's numbers
# sit beside them), then PROBES (teacher-forced portability and locality against the unedited model)
# and the generated view's METRICS (greedy answers, exact match; column prefix GENERATED_PREFIX), each
# where the records carry them; the claims are tested on every view the records carry.
PROBES = ["portability", "locality"]
GENERATED_PREFIX = "generated_"
GENERATED_METRICS = [GENERATED_PREFIX + m for m in METRICS]
VIEWS = {"teacher_forced": "teacher-forced", "generated": "generated"}  # view -> its name in tables and reports
NO_GENERATED = ("teacher-forced view only: the records carry no generated scores (config `eval_metrics` "
                "without `generated`)")


@dataclass(frozen=True)
class Figure:
    tables: tuple[str, ...]  # the tables its notebook reads (results/tables/<name>.csv)
    caption: str  # the HTML report's caption


@dataclass(frozen=True)
class Study:
    tables: dict[str, str]  # table name -> one-line description (the Markdown table's first line)
    figures: dict[str, Figure] = field(default_factory=dict)
    claims: dict[str, str] = field(default_factory=dict)  # claim id -> the paper's claim, in words


STUDIES: dict[str, Study] = {
    "main": Study(
        tables={
            "main": "Main results: efficacy, generalization, specificity and their average after editing (mean "
                    "and 95% t-interval over seeds), beside the paper's.",
            "msbp": "MSBP plugged into baselines: X-squared minus X per metric, paired over seeds, beside the "
                    "paper's gains.",
        },
        figures={
            "main": Figure(("main",), "Main results: efficacy, generalization, specificity and average after "
                           "editing per method (bars: ours, mean ± 95 % t-interval over seeds; black ticks: the "
                           "paper's numbers for the mapped model)."),
            "msbp": Figure(("msbp",), "MSBP plugged into baselines: the gain X² − X per metric, paired over "
                           "seeds (black ticks: the paper's gains)."),
            "efficacy_views": Figure(("main",), "Efficacy after editing per method, teacher-forced (the official "
                                     "token accuracy; black ticks: the paper's numbers) beside generated (greedy "
                                     "answers, exact match; ours only), mean ± 95 % t-interval over seeds."),
        },
        claims={
            "main": "EMSEdit beats the baselines (average score).",
            "msbp": "MSBP improves meta-learning editors (X² beats X on the average score).",
        },
    ),
    "steps": Study(
        tables={"steps": "Number of backprop steps S = 1..4: MALMEN (batch) and RLEdit (sequential), the families "
                         "of the paper's figure, beside EMSEdit; iteration-matched controls dashed."},
        figures={"steps": Figure(("steps",), "Scores against the number of backprop steps S, one panel per editor: "
                                 "MALMEN (batch) and RLEdit (sequential), the families of the paper's S ablation, "
                                 "and EMSEdit (dashed: the paper's numbers for that family; hollow: the S = 1 "
                                 "control with the Adam iterations of S = k).")},
        claims={"steps": "S = 2 backprop steps is best, and S ≥ 3 hurts specificity."},
    ),
    "loss": Study(
        tables={
            "loss": "MSBP+KL vs MSBP+Norm (EMSEdit with loss=kl vs loss=l2): quality and meta-training time.",
            "time_breakdown": "Share of meta-training time per phase (the paper's pie), per loss and protocol.",
        },
        figures={"loss": Figure(("loss", "time_breakdown"), "MSBP+KL vs MSBP+Norm: EMSEdit's meta-training time "
                                "and average score with loss=kl vs loss=l2, and the share of training time per "
                                "phase (ours per loss; the paper's pie for KL-trained editors).")},
        claims={"loss": "The l2 norm constraint cuts meta-training time by 30–40 % against the KL locality loss, "
                        "at similar quality."},
    ),
    "hypernetworks": Study(
        tables={"hypernetworks": "Shared vs step-specific hypernetworks in sequential editing."},
        figures={"hypernetworks": Figure(("hypernetworks",), "Shared vs step-specific hypernetworks in sequential "
                                         "editing (the paper's numbers were not found).")},
        claims={"hypernetworks": "Step-specific hypernetworks beat a shared hypernetwork in sequential editing."},
    ),
    "data_efficiency": Study(
        tables={"data_efficiency": "Quality vs amount of meta-training data (train turns)."},
        figures={"data_efficiency": Figure(("data_efficiency",), "Average score against the amount of "
                                           "meta-training data: EMSEdit vs RLEdit (sequential) and vs MALMEN "
                                           "(batch); ours and the paper's (in its own units).")},
        claims={"data_efficiency": "EMSEdit needs less meta-training data: with the least data it beats the "
                                   "baseline trained on the most."},
    ),
    "scaling": Study(
        tables={"scaling": "Time and peak memory vs edits per batch and vs number of turns."},
        figures={"scaling": Figure(("scaling",), "Meta-training time and peak memory against edits per batch and "
                                   "number of turns (ours: wall seconds and peak RSS; the paper's: GPU seconds and "
                                   "peak GPU memory).")},
    ),
}

# Derived views (nothing below is declared twice).
TABLES = {table: study for study, s in STUDIES.items() for table in s.tables}  # table -> its study
TABLE_DESCRIPTIONS = {table: text for s in STUDIES.values() for table, text in s.tables.items()}
FIGURES = {name: fig for s in STUDIES.values() for name, fig in s.figures.items()}  # figure -> Figure
CLAIMS = {cid: (study, text) for study, s in STUDIES.items() for cid, text in s.claims.items()}  # report order


def functions(kind: str) -> dict:
    """Each declared table (``kind="table"``) or claim (``kind="claim"``) -> its function
    ``<kind>_<name>`` in its study's module ``study_<study>`` (imported here, on call)."""
    found = {}
    for name, s in STUDIES.items():
        module = importlib.import_module(f"study_{name}")
        for item in {"table": s.tables, "claim": s.claims}[kind]:
            try:
                found[item] = getattr(module, f"{kind}_{item}")
            except AttributeError:
                raise LookupError(f"workflow/scripts/study_{name}.py has no function {kind}_{item} "
                                  f"(studies.py declares the {kind} {item!r} for the study {name!r})") from None
    return found
