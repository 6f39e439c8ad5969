# Stage 5: figures, drawn by the notebooks in notebooks/ from the tables (each writes PNG and PDF).
# One rule for every figure a study declares (workflow/scripts/studies.py): notebooks/<figure>.py.ipynb
# reads the figure's tables. Open one interactively with `snakemake --edit-notebook results/figures/<name>.png`.


rule figure:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs,
    output:
        png=report("results/figures/{figure}.png", caption="../report/figure.rst", category="Figures"),
        pdf="results/figures/{figure}.pdf",
    params:
        caption=figure_caption,
    log:
        notebook="logs/notebooks/{figure}.py.ipynb",
    notebook:
        "../../notebooks/{wildcards.figure}.py.ipynb"
