# Stage 5: figures, drawn by the notebooks in notebooks/ from the tables (each writes PNG and PDF).
# Open one interactively with `snakemake --edit-notebook results/figures/<name>.png`.


rule figure_main:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("main"),
    output:
        png=report("results/figures/main.png", caption="../report/fig_main.rst", category="Figures"),
        pdf="results/figures/main.pdf",
    log:
        notebook="logs/notebooks/main.py.ipynb",
    notebook:
        "../../notebooks/main.py.ipynb"


rule figure_msbp:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("msbp"),
    output:
        png=report("results/figures/msbp.png", caption="../report/fig_msbp.rst", category="Figures"),
        pdf="results/figures/msbp.pdf",
    log:
        notebook="logs/notebooks/msbp.py.ipynb",
    notebook:
        "../../notebooks/msbp.py.ipynb"


rule figure_steps:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("steps"),
    output:
        png=report("results/figures/steps.png", caption="../report/fig_steps.rst", category="Figures"),
        pdf="results/figures/steps.pdf",
    log:
        notebook="logs/notebooks/steps.py.ipynb",
    notebook:
        "../../notebooks/steps.py.ipynb"


rule figure_loss:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("loss"),
    output:
        png=report("results/figures/loss.png", caption="../report/fig_loss.rst", category="Figures"),
        pdf="results/figures/loss.pdf",
    log:
        notebook="logs/notebooks/loss.py.ipynb",
    notebook:
        "../../notebooks/loss.py.ipynb"


rule figure_hypernetworks:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("hypernetworks"),
    output:
        png=report(
            "results/figures/hypernetworks.png",
            caption="../report/fig_hypernetworks.rst",
            category="Figures",
        ),
        pdf="results/figures/hypernetworks.pdf",
    log:
        notebook="logs/notebooks/hypernetworks.py.ipynb",
    notebook:
        "../../notebooks/hypernetworks.py.ipynb"


rule figure_data_efficiency:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("data_efficiency"),
    output:
        png=report(
            "results/figures/data_efficiency.png",
            caption="../report/fig_data_efficiency.rst",
            category="Figures",
        ),
        pdf="results/figures/data_efficiency.pdf",
    log:
        notebook="logs/notebooks/data_efficiency.py.ipynb",
    notebook:
        "../../notebooks/data_efficiency.py.ipynb"


rule figure_scaling:
    conda:
        "../envs/notebooks.yaml"
    input:
        figure_inputs("scaling"),
    output:
        png=report("results/figures/scaling.png", caption="../report/fig_scaling.rst", category="Figures"),
        pdf="results/figures/scaling.pdf",
    log:
        notebook="logs/notebooks/scaling.py.ipynb",
    notebook:
        "../../notebooks/scaling.py.ipynb"
