"""Rule aggregate: validate every result record and write the long table results/aggregate/cells.csv."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import yaml  # noqa: E402

from aggregation import RecordError, aggregate, use_editors  # noqa: E402

use_editors(snakemake.config["config_dir"])  # editor labels: config/editors and <config_dir>/editors

with open(snakemake.input.schema) as fh:
    schema = yaml.safe_load(fh)
try:
    cells = aggregate(snakemake.params.membership, schema,
                      allow_mixed_code=bool(snakemake.config.get("allow_mixed_code", False)))
except RecordError as err:  # a user's records, not our bug: one line, and no output is written
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
cells.to_csv(snakemake.output[0], index=False)
print(f"{len(cells)} rows from {cells['path'].nunique() if len(cells) else 0} records", file=sys.stderr)
