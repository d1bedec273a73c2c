# The study's report: tables and the accuracy-versus-shots figure.


rule report:
    input:
        metrics=[f"{run}/{layout.METRICS}" for run in study_run_dirs()],
    output:
        table=report(
            f"{layout.REPORT}/{layout.REPORT_TABLE}",
            caption="../report/accuracy_table.rst",
            category="Results",
        ),
        markdown=f"{layout.REPORT}/{layout.REPORT_TABLE_MD}",
        plot=report(
            f"{layout.REPORT}/{layout.REPORT_PLOT}",
            caption="../report/accuracy_plot.rst",
            category="Results",
        ),
    log:
        "results/logs/report/{study}.log",
    conda:
        CONDA_ENV
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        out_dir=lambda w, output: str(Path(output.table).parent),
        runs=lambda w, input: [str(Path(m).parent) for m in input.metrics],
    shell:
        "{params.cli} report --config {params.config:q} --out-dir {params.out_dir:q} "
        "--log {log:q} {params.runs:q}"
