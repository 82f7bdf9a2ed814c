rule train:
    """RL from the warm start. Killed jobs resume from <run>/checkpoints (not an output, so Snakemake keeps it)."""
    input:
        model=f"{R}/models/{{model}}/{{task}}/sft",
        dataset=train_split_file("{task}"),
    output:
        final=directory(f"{R}/runs/{{model}}/{{task}}/{{algorithm}}/seed{{seed}}/final"),
        metrics=f"{R}/runs/{{model}}/{{task}}/{{algorithm}}/seed{{seed}}/metrics.parquet",
    params:
        settings=lambda wc: settings("train", **wc),
        run_dir=lambda wc, output: os.path.dirname(output.metrics),
    container:
        image("train")
    conda:
        conda_env("train")
    log:
        f"{LOGS}/train/{{model}}/{{task}}/{{algorithm}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train/{{model}}/{{task}}/{{algorithm}}/seed{{seed}}.tsv"
    threads: res("train", "threads")
    resources:
        mem_mb=scaled("train", "mem_mb"),
        runtime=scaled("train", "runtime"),
        gpu=res("train", "gpus"),
    shell:
        "kalmanrl train --settings {params.settings:q} --model {input.model:q} --dataset {input.dataset:q}"
        " --out {params.run_dir:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
