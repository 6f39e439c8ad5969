"""Rule aggregate: validate every result record and write the long tables results/aggregate/cells.csv
(one row per study, variant and cell) and requests.csv.gz (per-request pre/post scores per record)."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import yaml  # noqa: E402

from aggregation import RecordError, aggregate_records, use_editors  # noqa: E402

use_editors(snakemake.config["config_dir"])  # editor labels: config/editors and <config_dir>/editors

with open(snakemake.input.schema) as fh:
    schema = yaml.safe_load(fh)
try:
    cells, requests = aggregate_records(snakemake.params.membership, schema,
                                        allow_mixed_code=bool(snakemake.config.get("allow_mixed_code", False)))
except RecordError as err:  # a user's records, not our bug: one line, and no output is written
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
cells.to_csv(snakemake.output.cells, index=False)
requests.to_csv(snakemake.output.requests, index=False)
print(f"{len(cells)} rows from {cells['path'].nunique() if len(cells) else 0} records; {len(requests)} per-request "
      "rows", file=sys.stderr)
