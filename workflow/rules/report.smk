localrules:
    report,


rule report:
    """Every summary and training curve in one Parquet, an HTML and a Markdown report with figures."""
    input:
        summaries=SUMMARIES,
        metrics=METRICS,
    output:
        html=f"{R}/report/report.html",
        markdown=f"{R}/report/report.md",
        summary=f"{R}/report/summary.parquet",
    params:
        settings=lambda wc: settings("report"),
        out_dir=lambda wc, output: os.path.dirname(output.html),
    log:
        f"{LOGS}/report.log",
    shell:
        "kalmanrl report --settings {params.settings:q} --summaries {input.summaries:q} --metrics {input.metrics:q}"
        " --out {params.out_dir:q} > {log:q} 2>&1"
