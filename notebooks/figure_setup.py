"""The shared start of every figure notebook: its input tables, the plot style and ``save``.

Run by the workflow (rule ``figure``), a notebook reads the tables its figure declares
(``workflow/scripts/studies.py``) from ``snakemake.input`` and writes ``snakemake.output``; opened by
hand from ``notebooks/`` after a run, it reads ``../results/tables/`` and writes ``../results/figures/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow" / "scripts"))
import studies  # noqa: E402  (each figure's tables, and the metrics every figure reports)

METRICS = studies.METRICS
GENERATED_PREFIX, VIEWS, NO_GENERATED = studies.GENERATED_PREFIX, studies.VIEWS, studies.NO_GENERATED  # metric views


def setup(name: str, snakemake=None):
    """(tables by name, save(fig)) for the figure ``name``; ``snakemake`` is the workflow's object,
    or None when the notebook is opened by hand."""
    names = list(studies.FIGURES[name].tables)
    if snakemake is None:
        results = HERE.parent / "results"
        snakemake = SimpleNamespace(input=[str(results / "tables" / f"{t}.csv") for t in names],
                                    output=SimpleNamespace(png=str(results / "figures" / f"{name}.png"),
                                                           pdf=str(results / "figures" / f"{name}.pdf")))
    tables = {t: pd.read_csv(p) for t, p in zip(names, snakemake.input)}
    plt.rcParams.update({"figure.dpi": 110, "font.size": 8, "axes.titlesize": 9})

    def save(fig):
        """Write the figure as PNG and PDF (the workflow's outputs)."""
        fig.tight_layout()
        fig.savefig(snakemake.output.png, dpi=150)
        fig.savefig(snakemake.output.pdf)

    return tables, save
