localrules:
    report,


rule report:
    """Every summary and training curve in one Parquet, an HTML and a Markdown report with figures
    (also collected by `snakemake --report`)."""
    input:
        summaries=SUMMARIES,
        metrics=METRICS,
    output:
        html=report(f"{R}/report/report.html", caption="../report/report.rst", category="Report"),
        markdown=f"{R}/report/report.md",
        summary=f"{R}/report/summary.parquet",
        **{
            kind: report(directory(f"{R}/report/figures/{kind}"), patterns=["{name}.png"],
                         caption=f"../report/{kind}.rst", category="Figures", subcategory=title)
            for kind, title in FIGURES.items()
        },
    params:
        settings=lambda wc: report_settings(),
        out_dir=lambda wc, output: os.path.dirname(output.html),
    container:
        image("report")
    conda:
        conda_env("report")
    log:
        f"{LOGS}/report.log",
    shell:
        "kalmanrl report --settings {params.settings:q} --summaries {input.summaries:q} --metrics {input.metrics:q}"
        " --out {params.out_dir:q} > {log:q} 2>&1"
