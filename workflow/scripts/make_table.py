"""Rule table: one artifact's table (CSV, Markdown, LaTeX) from the aggregated cells and the paper's numbers."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from analysis import TABLES, load_reference, write_table  # noqa: E402

name = snakemake.wildcards.table
cells = pd.read_csv(snakemake.input.cells, dtype={"train_turns": str})
table = TABLES[name](cells, load_reference(snakemake.params.reference_dir), snakemake.params.paper)
note = (
    snakemake.params.description
    + " Ours: mean ± 95% t-interval over seeds; `paper` columns: the paper's value for the mapped model "
    "(config `paper`), at the paper's own scale."
)
write_table(table, snakemake.output.csv, snakemake.output.md, snakemake.output.tex, title=name.replace("_", " "), note=note)
print(f"{name}: {len(table)} rows", file=sys.stderr)
