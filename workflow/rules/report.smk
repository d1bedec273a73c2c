# The study's report: tables (CSV, Markdown, LaTeX), figures (SVG and 300 dpi PNG), statistics
# and one HTML page (docs/report.md lists the files). The report folder is also logged to
# MLflow. Categories of `snakemake --report` avoid its own "Workflow" and "Statistics" pages.


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
        plot=f"{layout.REPORT}/{layout.REPORT_PLOT}",
        plot_vector=report(
            f"{layout.REPORT}/{layout.REPORT_PLOT_VECTOR}",
            caption="../report/accuracy_plot.rst",
            category="Results",
        ),
        html=report(
            f"{layout.REPORT}/{layout.REPORT_HTML}",
            caption="../report/report_html.rst",
            category="Results",
        ),
        datasets=report(
            f"{layout.REPORT}/{layout.REPORT_DATASETS.format(ext='csv')}",
            caption="../report/datasets.rst",
            category="Tables",
        ),
        tables=[
            report(path, caption="../report/setting_table.rst", category="Tables")
            for path in layout.report_paths(
                layout.REPORT_SETTING_TABLE, STUDY.settings, ext="csv"
            )
        ],
        per_class=report(
            f"{layout.REPORT}/{layout.REPORT_PER_CLASS.format(ext='csv')}",
            caption="../report/per_class.rst",
            category="Tables",
        ),
        comparison=report(
            f"{layout.REPORT}/{layout.REPORT_COMPARISON.format(ext='csv')}",
            caption="../report/comparison.rst",
            category="Paired comparison",
        ),
        bootstrap=report(
            f"{layout.REPORT}/{layout.REPORT_BOOTSTRAP}",
            caption="../report/test_bootstrap.rst",
            category="Paired comparison",
        ),
        confusion=[
            report(
                path,
                caption="../report/confusion.rst",
                category="Figures",
                subcategory="Confusion matrices",
            )
            for path in confusion_outputs("svg")
        ],
        reliability=[
            report(
                path,
                caption="../report/reliability.rst",
                category="Figures",
                subcategory="Calibration",
            )
            for path in layout.report_paths(
                layout.REPORT_RELIABILITY, STUDY.settings, ext="svg"
            )
        ],
        figures_png=confusion_outputs("png")
        + layout.report_paths(layout.REPORT_RELIABILITY, STUDY.settings, ext="png"),
        latex=layout.report_paths(
            layout.REPORT_SETTING_TABLE, STUDY.settings, ext="tex"
        ),
        provenance=f"{layout.REPORT}/{layout.REPORT_PROVENANCE}",
    log:
        "results/logs/report/{study}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=job_memory("report"),
    params:
        cli=CLIPSVD,
        config=CONFIG_FILE,
        out_dir=lambda w, output: str(Path(output.table).parent),
        runs=lambda w, input: [str(Path(m).parent) for m in input.metrics],
    shell:
        "{params.cli} report --config {params.config:q} --out-dir {params.out_dir:q} "
        "--log {log:q} {params.runs:q}"
