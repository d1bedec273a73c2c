# Data: the demo dataset, the prepared store of each dataset, the few-shot split files.


rule demo_data:
    output:
        directory(layout.RAW),
    log:
        "results/logs/demo_data/{dataset}.log",
    conda:
        CONDA_ENV
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
    shell:
        "{params.cli} demo-data --config {params.config:q} --dataset {wildcards.dataset} "
        "--out {output:q} --log {log:q}"


rule prepare:
    input:
        prepare_inputs,
    output:
        images=f"{layout.STORE}/images.npy",
        index=f"{layout.STORE}/index.csv",
        classes=f"{layout.STORE}/classes.json",
        provenance=f"{layout.STORE}/provenance.json",
    log:
        "results/logs/prepare/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare/{dataset}.tsv"
    conda:
        CONDA_ENV
    threads: STUDY.threads
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        store=lambda w: layout.STORE.format(dataset=w.dataset),
        preparation=preparation_hash,
        images=image_listing,
    shell:
        "{params.cli} prepare --config {params.config:q} --dataset {wildcards.dataset} "
        "--out {params.store:q} --threads {threads} --log {log:q}"


rule sample:
    input:
        store_files,
    output:
        layout.SPLIT,
    log:
        "results/logs/sample/{dataset}/{setting}/shots{shots}_seed{seed}.log",
    conda:
        CONDA_ENV
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        store=lambda w: layout.STORE.format(dataset=w.dataset),
        sampling=sampling_hash,
    shell:
        "{params.cli} sample --config {params.config:q} --dataset {wildcards.dataset} "
        "--store {params.store:q} --setting {wildcards.setting} --shots {wildcards.shots} "
        "--seed {wildcards.seed} --out {output:q} --log {log:q}"
