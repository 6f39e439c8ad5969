# The EMSEdit reproduction workflow. `snakemake` runs the default (CPU) grid of config/config.yaml;
# `snakemake --configfile config/paper.yaml --profile profiles/slurm` submits the paper's grid; the
# workstation settings are the explicit profile profiles/workstation (`make reproduce` passes it).
# Stages live in workflow/rules/, helpers in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


# The default config, unless --configfile names another: each config is complete on its own, and
# Snakemake would otherwise deep-merge the two (mixing, e.g., the default's variants into the paper's).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/experiments.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


# Light jobs run where Snakemake runs (on a cluster: the submitting node, which has internet for
# the data download), never as cluster jobs.
localrules:
    all,
    fetch_data,
    edit_order,
    tiny_model,
    aggregate,
    tables,
    figure,
    claims,


rule all:
    default_target: True
    input:
        final_outputs(),
