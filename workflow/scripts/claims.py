"""Rule claims: each claim of the paper, the paper's evidence, ours, and a verdict from a paired test."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from aggregation import load_reference, use_editors  # noqa: E402
from rendering import evaluate_claims  # noqa: E402

use_editors(snakemake.config["config_dir"])  # editor labels: config/editors and <config_dir>/editors

cells = pd.read_csv(snakemake.input.cells, dtype={"train_turns": str})
rows, markdown = evaluate_claims(cells, load_reference(Path(snakemake.input.reference[0]).parent), snakemake.params.paper,
                                 snakemake.params.claims)
rows.to_csv(snakemake.output.csv, index=False)
with open(snakemake.output.md, "w") as fh:
    fh.write(markdown)
print(f"{len(rows)} sub-tests", file=sys.stderr)
