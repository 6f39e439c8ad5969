# Stage 3: the unedited model's scores on each seeded edit order (computed once, shared by every
# cell with that dataset, model, number of edits, edits per turn and seed), with the activations of
# the layers no edit changes on those requests (replayed by the cells); the same activations of each
# seeded training order (shared by the cells that meta-train on a prefix of it); then one job per cell.


rule evaluate_unedited:
    conda:
        "../envs/emsedit.yaml"
    input:
        unpack(unedited_inputs),
    output:
        pre=grid.PRE_PATTERN,
        prefix=grid.PREFIX_PATTERN,
    params:
        model=model_arg,
        dataset=dataset_arg,
        prefix_mb=config["share_prefix_mb"],
        metrics=metrics_option,
    log:
        f"logs/pre/{grid.PRE_STEM}.log",
    benchmark:
        f"results/benchmarks/pre/{grid.PRE_STEM}.tsv"
    threads: config["threads"]
    resources:
        **rule_resources("evaluate_unedited", threads=config["threads"]),
    shell:
        "python -m emsedit evaluate --model {params.model} --dataset {params.dataset}"
        " --n {wildcards.n} --edits {wildcards.edits} --seed {wildcards.seed} --order {input.order}"
        " --threads {threads} --prefix-out {output.prefix} --prefix-max-mb {params.prefix_mb} {params.metrics}"
        " --out {output.pre} > {log} 2>&1"


rule share_training:
    conda:
        "../envs/emsedit.yaml"
    input:
        unpack(share_training_inputs),
    output:
        grid.TRAIN_PREFIX_PATTERN,
    params:
        model=model_arg,
        dataset=dataset_arg,
        prefix_mb=config["share_prefix_mb"],
    log:
        f"logs/pre/{grid.TRAIN_PREFIX_STEM}.train.log",
    benchmark:
        f"results/benchmarks/pre/{grid.TRAIN_PREFIX_STEM}.train.tsv"
    threads: config["threads"]
    resources:
        **rule_resources("share_training", threads=config["threads"]),
    shell:
        "python -m emsedit share-training --model {params.model} --dataset {params.dataset}"
        " --seed {wildcards.seed} --edits {wildcards.edits} --train-turns {wildcards.train_turns}"
        " --threads {threads} --prefix-max-mb {params.prefix_mb} --out {output} > {log} 2>&1"


rule run_cell:
    conda:
        "../envs/emsedit.yaml"
    input:
        unpack(run_inputs),
    output:
        grid.RUN_PATTERN,
    params:
        editor=editor_arg,
        model=model_arg,
        dataset=dataset_arg,
        options=run_options,
        checkpoints=checkpoint_dir,
        train_prefix=train_prefix_option,
        keep_graph_mb=config["keep_graph_mb"],
    log:
        f"logs/runs/{grid.CELL_STEM}.log",
    benchmark:
        f"results/benchmarks/runs/{grid.CELL_STEM}.tsv"
    threads: config["threads"]
    resources:
        **rule_resources("run_cell", threads=config["threads"]),
    shell:
        "python -m emsedit run --editor {params.editor} --model {params.model}"
        " --dataset {params.dataset} --protocol {wildcards.protocol} --turns {wildcards.turns}"
        " --edits {wildcards.edits} --steps {wildcards.steps} --loss {wildcards.loss}"
        " --seed {wildcards.seed} --order {input.order} --pre {input.pre} --prefix-in {input.prefix}"
        " {params.train_prefix}"
        " --threads {threads} --keep-graph-mb {params.keep_graph_mb}"
        " --checkpoint-dir {params.checkpoints} {params.options} --out {output} > {log} 2>&1"
