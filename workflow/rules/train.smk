rule train:
    """RL from the warm start. Killed jobs resume from <run>/checkpoints (not an output, so Snakemake keeps it). With
    resources.train.gpus x nodes above 1, `kalmanrl train` starts that many ranks itself (torchrun; srun torchrun on
    several nodes, one per node); without GPUs, cpu_ranks x nodes CPU ranks (under SLURM one task each)."""
    input:
        model=f"{R}/models/{{model}}/{{task}}/sft",
        dataset=train_split_file("{task}"),
    output:
        final=directory(f"{R}/runs/{{model}}/{{task}}/{{algorithm}}/seed{{seed}}/final"),
        metrics=f"{R}/runs/{{model}}/{{task}}/{{algorithm}}/seed{{seed}}/metrics.parquet",
    params:
        settings=lambda wc: settings("train", **wc),
        run_dir=lambda wc, output: os.path.dirname(output.metrics),
        gpus=res("train", "gpus"),
        cpu_ranks=res("train", "cpu_ranks"),
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
        # tasks_per_gpu=0: one SLURM task for the whole job (the executor's default is one task per GPU, which would
        # start the command once per GPU); kalmanrl starts the ranks itself. One node: `gpu` (Snakemake's local GPU
        # count; `--gpus` under SLURM). Several nodes: each node's GPUs as a per-node GRES. Without GPUs: one task
        # per CPU rank (`--ntasks`), which kalmanrl fills with srun.
        nodes=res("train", "nodes"),
        tasks_per_gpu=0,
        **({"gpu": res("train", "gpus")} if res("train", "nodes") == 1 or not res("train", "gpus")
           else {"gres": f"gpu:{res('train', 'gpus')}"}),
        **({} if res("train", "gpus") else {"tasks": res("train", "cpu_ranks") * res("train", "nodes")}),
    shell:
        "kalmanrl train --settings {params.settings:q} --model {input.model:q} --dataset {input.dataset:q}"
        " --out {params.run_dir:q} --threads {threads} --gpus {params.gpus} --nodes {resources.nodes}"
        " --cpu-ranks {params.cpu_ranks} > {log:q} 2>&1"
