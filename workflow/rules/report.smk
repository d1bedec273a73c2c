# The study's report: tables (CSV, Markdown, LaTeX), figures, statistics and one HTML page
# (docs/report.md lists the files). The report folder is also logged to MLflow.


rule report:
    input:
        metrics=[f"{run}/{layout.METRICS}" for run in study_run_dirs()],
        interpretations=interpretation_outputs(),
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
        html=report(
            f"{layout.REPORT}/{layout.REPORT_HTML}",
            caption="../report/report_html.rst",
            category="Report",
        ),
        comparison=report(
            f"{layout.REPORT}/comparison.csv",
            caption="../report/comparison.rst",
            category="Statistics",
        ),
        tables=[
            report(path, caption="../report/setting_table.rst", category="Tables")
            for path in layout.report_paths(
                layout.REPORT_SETTING_TABLE, STUDY.settings, ext="csv"
            )
        ],
        confusion=[
            report(path, caption="../report/confusion.rst", category="Figures")
            for path in confusion_outputs()
        ],
        reliability=[
            report(path, caption="../report/reliability.rst", category="Figures")
            for path in layout.report_paths(layout.REPORT_RELIABILITY, STUDY.settings)
        ],
        latex=layout.report_paths(
            layout.REPORT_SETTING_TABLE, STUDY.settings, ext="tex"
        ),
        provenance=f"{layout.REPORT}/{layout.REPORT_PROVENANCE}",
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
