"""Rule claims: each claim of the paper, the paper's evidence, ours, and a verdict from paired tests
request by request, seeds as clusters (docs/statistics.md); the report as Markdown and as HTML."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from aggregation import load_reference, use_editors  # noqa: E402
from rendering import evaluate_claims  # noqa: E402

use_editors(snakemake.config["config_dir"])  # editor labels: config/editors and <config_dir>/editors

cells = pd.read_csv(snakemake.input.cells, dtype={"train_turns": str})
requests = pd.read_csv(snakemake.input.requests)
rows, markdown, html = evaluate_claims(cells, requests, load_reference(Path(snakemake.input.reference[0]).parent),
                                       snakemake.params.paper, snakemake.params.claims)
rows.to_csv(snakemake.output.csv, index=False)
for path, text in ((snakemake.output.md, markdown), (snakemake.output.html, html)):
    with open(path, "w") as fh:
        fh.write(text)
print(f"{len(rows)} sub-tests", file=sys.stderr)
