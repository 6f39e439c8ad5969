# Stage 4: validate and collect every record into one long table, then compute each artifact's
# table (CSV, Markdown, LaTeX) with the paper's numbers beside ours.


rule aggregate:
    input:
        records=all_run_records(),
        schema=RESULT_SCHEMA,
    output:
        "results/aggregate/cells.csv",
    params:
        membership=membership_table(),
    log:
        "logs/aggregate/cells.log",
    script:
        "../scripts/aggregate.py"


rule table:
    input:
        cells="results/aggregate/cells.csv",
        reference=REFERENCE_FILES,
    output:
        csv=report(
            "results/tables/{table}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
        md="results/tables/{table}.md",
        tex="results/tables/{table}.tex",
    params:
        reference_dir=str(REFERENCE_DIR),
        paper=config["paper"],
        description=table_description,
    log:
        "logs/tables/{table}.log",
    script:
        "../scripts/make_table.py"
