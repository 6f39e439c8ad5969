# Stage 6: the claims report - each claim of the paper, the paper's evidence, ours, and a verdict
# per variant from paired tests request by request with seeds as clusters (docs/statistics.md), as
# Markdown and as HTML. `snakemake --report results/report.html` then bundles tables, figures and
# this report (the HTML version shown inline) into one self-contained HTML file.


rule claims:
    conda:
        "../envs/analysis.yaml"
    input:
        cells="results/aggregate/cells.csv",
        requests="results/aggregate/requests.csv.gz",
        reference=REFERENCE_FILES,
    output:
        html=report("results/claims.html", caption="../report/claims.rst", category="Claims"),
        md=report("results/claims.md", caption="../report/claims.rst", category="Claims"),
        csv="results/claims.csv",
    params:
        paper=config["paper"],
        claims=config["claims"],
    log:
        "logs/report/claims.log",
    script:
        "../scripts/claims.py"
