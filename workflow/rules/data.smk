localrules:
    data,
    decontaminate,


rule data:
    """One dataset, all its splits, as Parquet (hub or local copies; the arithmetic generator)."""
    output:
        TREE.dataset(),
    params:
        settings=lambda wc: settings("data", dataset=wc.dataset),
    container:
        image("data")
    conda:
        conda_env("data")
    log:
        TREE.log("data"),
    threads: res("data", "threads")
    resources:
        mem_mb=scaled("data", "mem_mb"),
        runtime=scaled("data", "runtime"),
    shell:
        "kalmanrl data --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"


rule decontaminate:
    """A task's train split without any problem that appears in a benchmark."""
    input:
        dataset=TREE.dataset(dataset="{task}"),
        benchmarks=lambda wc: [TREE.dataset(dataset=b) for b in config["benchmarks"]] if config["data"]["decontaminate"] else [],
    output:
        TREE.train_split(),
    params:
        # The one setting this rule reads (through its inputs): toggling it reruns the decontaminate jobs, and what
        # depends on their outputs, not the data jobs.
        decontaminate=config["data"]["decontaminate"],
    container:
        image("data")
    conda:
        conda_env("data")
    log:
        TREE.log("decontaminate"),
    threads: res("data", "threads")
    resources:
        mem_mb=scaled("data", "mem_mb"),
        runtime=scaled("data", "runtime"),
    shell:
        "kalmanrl decontaminate --dataset {input.dataset:q} --exclude {input.benchmarks:q} --out {output:q}"
        " > {log:q} 2>&1"
