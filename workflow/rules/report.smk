localrules:
    report,


rule report:
    """Every summary and training curve in one Parquet, an HTML and a Markdown report with figures
    (also collected by `snakemake --report`)."""
    input:
        summaries=SUMMARIES,
        metrics=METRICS,
    output:
        html=report(TREE.report_file("html"), caption="../report/report.rst", category="Report"),
        markdown=TREE.report_file("markdown"),
        summary=TREE.report_file("summary"),
        accuracy=TREE.report_file("accuracy"),
        comparisons=TREE.report_file("comparisons"),
        **{
            kind: report(directory(TREE.figure_dir(kind)), patterns=["{name}.png"],
                         caption=f"../report/{kind}.rst", category="Figures", subcategory=title)
            for kind, title in FIGURES.items()
        },
    params:
        settings=lambda wc: report_settings(),
        out_dir=lambda wc: TREE.report_dir(),
    container:
        image("report")
    conda:
        conda_env("report")
    log:
        TREE.log("report"),
    threads: res("report", "threads")
    resources:
        mem_mb=scaled("report", "mem_mb"),
        runtime=scaled("report", "runtime"),
    shell:
        "kalmanrl report --settings {params.settings:q} --summaries {input.summaries:q} --metrics {input.metrics:q}"
        " --out {params.out_dir:q} > {log:q} 2>&1"
