# Stage 4: validate and collect every record into two long tables (cells; per-request scores, which
# the claims test), then compute each artifact's table (CSV, Markdown, LaTeX) with the paper's
# numbers beside ours.


rule aggregate:
    conda:
        "../envs/analysis.yaml"
    input:
        records=all_run_records(),
        schema=RESULT_SCHEMA,
    output:
        cells="results/aggregate/cells.csv",
        requests="results/aggregate/requests.csv.gz",
    params:
        membership=membership_table(),
    log:
        "logs/aggregate/cells.log",
    script:
        "../scripts/aggregate.py"


rule tables:
    conda:
        "../envs/analysis.yaml"
    input:
        cells="results/aggregate/cells.csv",
        reference=REFERENCE_FILES,
    output:
        table_report_outputs(),
    params:
        tables=enabled_tables(),
        descriptions=TABLE_DESCRIPTIONS,
        paper=config["paper"],
    log:
        "logs/tables/tables.log",
    script:
        "../scripts/make_tables.py"
