# Data: the demo dataset, the prepared store of each dataset, the few-shot split files.
# Their paths are keyed by what decides them (clipsvd.layout), so every study that asks for the
# same store or split finds it made, and a study never rewrites another study's file.


rule demo_data:
    output:
        directory(layout.RAW),
    log:
        "results/logs/demo_data/{dataset}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=job_memory("demo_data"),
    params:
        cli=CLIPSVD,
        config=shared_config(layout.DEMO_CONFIG),
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
        "results/logs/prepare/{dataset}/{preparation}.log",
    benchmark:
        "results/benchmarks/prepare/{dataset}/{preparation}.tsv"
    conda:
        CONDA_ENV
    threads: STUDY.threads
    resources:
        mem_mb=job_memory("prepare"),
        runtime=60,
    params:
        cli=CLIPSVD,
        config=shared_config(layout.PREPARE_CONFIG),
        store=lambda w, output: str(Path(output.images).parent),
        image_size=image_size_option,
        images=image_listing,
    shell:
        "{params.cli} prepare --config {params.config:q} --dataset {wildcards.dataset} "
        "--out {params.store:q} {params.image_size} --threads {threads} --log {log:q}"


rule sample:
    input:
        store_files,
    output:
        layout.SPLIT,
    log:
        "results/logs/sample/{dataset}/{preparation}/{sampling}/{setting}/shots{shots}_seed{seed}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=job_memory("sample"),
    params:
        cli=CLIPSVD,
        config=shared_config(layout.SAMPLE_CONFIG),
        store=lambda w, input: str(Path(input[0]).parent),
    shell:
        "{params.cli} sample --config {params.config:q} --dataset {wildcards.dataset} "
        "--store {params.store:q} --setting {wildcards.setting} --shots {wildcards.shots} "
        "--seed {wildcards.seed} --out {output:q} --log {log:q}"
