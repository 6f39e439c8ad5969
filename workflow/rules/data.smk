# Stage 1: obtain each dataset's train and eval files (local copy -> mirror -> download, sha256-checked
# by the library) and record their checksums; every later rule depends on that manifest.


rule fetch_data:
    conda:
        "../envs/emsedit.yaml"
    output:
        "results/data/{dataset}/manifest.sha256",
    params:
        dataset=dataset_arg,
        mirror=mirror_option,
        files=dataset_files,
    log:
        "logs/data/{dataset}.log",
    retries: 2
    shell:
        "python -m emsedit fetch --dataset {params.dataset} {params.mirror} > {log} 2>&1"
        " && sha256sum {params.files} > {output} 2>> {log}"


rule edit_order:
    conda:
        "../envs/emsedit.yaml"
    input:
        data=dataset_manifest,
    output:
        grid.ORDER_PATTERN,
    params:
        dataset=dataset_arg,
    log:
        "logs/orders/{dataset}/n{n}_seed{seed}.log",
    shell:
        "python -m emsedit order --dataset {params.dataset} --n {wildcards.n} --seed {wildcards.seed}"
        " --out {output} > {log} 2>&1"
