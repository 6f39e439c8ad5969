"""Rule tables: every artifact's table (CSV, Markdown, LaTeX) from the aggregated cells and the paper's numbers."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

import studies  # noqa: E402
from aggregation import load_reference, use_editors  # noqa: E402
from rendering import write_table  # noqa: E402

use_editors(snakemake.config["config_dir"])  # editor labels: config/editors and <config_dir>/editors

cells = pd.read_csv(snakemake.input.cells, dtype={"train_turns": str})
tables = studies.functions("table")
reference = load_reference(Path(snakemake.input.reference[0]).parent)
for name in snakemake.params.tables:
    table = tables[name](cells, reference, snakemake.params.paper)
    note = (
        snakemake.params.descriptions[name]
        + " Ours: mean ± 95% t-interval over seeds; `*_paper` columns: the paper's value for the mapped"
        " model (config `paper`), at the paper's own scale."
    )
    stem = f"results/tables/{name}"
    write_table(table, f"{stem}.csv", f"{stem}.md", f"{stem}.tex", title=name.replace("_", " "), note=note)
    print(f"{name}: {len(table)} rows", file=sys.stderr)
