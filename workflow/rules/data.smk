localrules:
    data,
    decontaminate,


rule data:
    """One dataset, all its splits, as Parquet (hub or local copies; the arithmetic generator)."""
    output:
        dataset_file("{dataset}"),
    params:
        settings=lambda wc: settings("data", dataset=wc.dataset),
    container:
        image("data")
    conda:
        conda_env("data")
    log:
        f"{LOGS}/data/{{dataset}}.log",
    shell:
        "kalmanrl data --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"


rule decontaminate:
    """A task's train split without any problem that appears in a benchmark."""
    input:
        dataset=dataset_file("{task}"),
        benchmarks=lambda wc: [dataset_file(b) for b in config["benchmarks"]] if config["data"]["decontaminate"] else [],
    output:
        train_split_file("{task}"),
    params:
        # The one setting this rule reads (through its inputs): toggling it reruns the decontaminate jobs, and what
        # depends on their outputs, not the data jobs.
        decontaminate=config["data"]["decontaminate"],
    container:
        image("data")
    conda:
        conda_env("data")
    log:
        f"{LOGS}/data/{{task}}.train.log",
    shell:
        "kalmanrl decontaminate --dataset {input.dataset:q} --exclude {input.benchmarks:q} --out {output:q}"
        " > {log:q} 2>&1"
