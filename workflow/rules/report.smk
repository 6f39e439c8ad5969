# Stage 6: the claims report - each claim of the paper, the paper's evidence, ours, and a verdict
# decided by a stated paired test over seeds, per variant. `snakemake --report results/report.html`
# then bundles tables, figures and this report into one self-contained HTML file.


rule claims:
    conda:
        "../envs/analysis.yaml"
    input:
        cells="results/aggregate/cells.csv",
        reference=REFERENCE_FILES,
    output:
        md=report("results/claims.md", caption="../report/claims.rst", category="Claims"),
        csv="results/claims.csv",
    params:
        paper=config["paper"],
        claims=config["claims"],
    log:
        "logs/report/claims.log",
    script:
        "../scripts/claims.py"
