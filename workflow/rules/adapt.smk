# Frozen features (shared by every study with the same store, model and batch size: keyed by
# them, clipsvd.layout), adaptation (GPU when there is one) and evaluation of every run.


rule features:
    input:
        store_files,
    output:
        layout.FEATURES,
    log:
        "results/logs/features/{dataset}/{preparation}/{model}_batch{batch}.log",
    benchmark:
        "results/benchmarks/features/{dataset}/{preparation}/{model}_batch{batch}.tsv"
    conda:
        CONDA_ENV
    threads: STUDY.threads
    resources:
        gpu=1,
        mem_mb=job_memory("features"),
        runtime=60,
    params:
        cli=CLIPSVD,
        config=shared_config(layout.FEATURES_CONFIG),
        store=lambda w, input: str(Path(input[0]).parent),
    shell:
        "{params.cli} features --config {params.config:q} --store {params.store:q} "
        "--out {output:q} --threads {threads} --log {log:q}"


rule adapt:
    input:
        split=split_file,
        store=store_files,
    output:
        adapter=f"{layout.RUN}/{layout.ADAPTER}",
        history=f"{layout.RUN}/{layout.TRAIN_HISTORY}",
        summary=f"{layout.RUN}/{layout.TRAIN_SUMMARY}",
    log:
        f"{layout.RUN}/adapt.log",
    benchmark:
        f"{layout.RUN}/adapt.benchmark.tsv"
    wildcard_constraints:
        method="|".join(ADAPTER_METHODS),
    conda:
        CONDA_ENV
    threads: STUDY.threads
    resources:
        gpu=1,
        mem_mb=job_memory("adapt"),
        runtime=120,
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        store=lambda w, input: str(Path(input.store[0]).parent),
        run_dir=lambda w, output: str(Path(output.adapter).parent),
        training=training_hash,
    shell:
        "{params.cli} adapt --config {params.config:q} --dataset {wildcards.dataset} "
        "--method {wildcards.method} --split {input.split:q} --store {params.store:q} --run-dir {params.run_dir:q} "
        "--threads {threads} --log {log:q}"


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics=f"{layout.RUN}/{layout.METRICS}",
        predictions=f"{layout.RUN}/{layout.PREDICTIONS}",
        confusion=f"{layout.RUN}/{layout.CONFUSION}",
        record=f"{layout.RUN}/{layout.RUN_RECORD}",
        tracking=f"{layout.RUN}/{layout.TRACKING_RECORD}",
    log:
        f"{layout.RUN}/evaluate.log",
    benchmark:
        f"{layout.RUN}/evaluate.benchmark.tsv"
    conda:
        CONDA_ENV
    threads: STUDY.threads
    resources:
        gpu=1,
        mem_mb=job_memory("evaluate"),
        runtime=60,
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        store=lambda w, input: str(Path(input.store[0]).parent),
        run_dir=lambda w, output: str(Path(output.metrics).parent),
        features=lambda w, input: (
            f"--features {shlex.quote(input.features)}"
            if "features" in input.keys()
            else ""
        ),
        evaluation=evaluation_hash,
    shell:
        "{params.cli} evaluate --config {params.config:q} --dataset {wildcards.dataset} "
        "--method {wildcards.method} --split {input.split:q} --store {params.store:q} "
        "--run-dir {params.run_dir:q} {params.features} --threads {threads} --log {log:q}"


rule interpret:
    input:
        adapter=f"{layout.RUN}/{layout.ADAPTER}",
        split=split_file,
        store=store_files,
    output:
        f"{layout.RUN}/interpret/interpret.json",
    log:
        f"{layout.RUN}/interpret.log",
    benchmark:
        f"{layout.RUN}/interpret.benchmark.tsv"
    wildcard_constraints:
        method="clip_svd",
    conda:
        CONDA_ENV
    threads: STUDY.threads
    resources:
        gpu=1,
        mem_mb=job_memory("interpret"),
        runtime=60,
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        store=lambda w, input: str(Path(input.store[0]).parent),
        run_dir=lambda w, input: str(Path(input.adapter).parent),
        settings=lambda w: STUDY.interpret,
    shell:
        "{params.cli} interpret --config {params.config:q} --split {input.split:q} "
        "--store {params.store:q} --run-dir {params.run_dir:q} --threads {threads} --log {log:q}"
