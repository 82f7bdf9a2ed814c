rule train:
    """RL from the warm start. Killed jobs resume from <run>/checkpoints (not an output, so Snakemake keeps it). With
    resources.train.gpus x nodes above 1, `kalmanrl train` starts that many ranks itself (torchrun; srun torchrun on
    several nodes, one per node); without GPUs, cpu_ranks x nodes CPU ranks (under SLURM one task each)."""
    input:
        model=TREE.warm_start_model(),
        dataset=TREE.train_split(),
        # train.validation: the benchmarks the job validates on while it trains (none when it does not)
        validation=[TREE.dataset(dataset=name) for name in validation_benchmarks(config)],
    output:
        final=directory(TREE.final_model()),
        metrics=TREE.metrics(),
    params:
        settings=lambda wc: settings("train", **wc),
        run_dir=lambda wc: TREE.run_dir(**wc),
    container:
        image("train")
    conda:
        conda_env("train")
    log:
        TREE.log("train"),
    benchmark:
        TREE.benchmark("train")
    threads: res("train", "threads")
    resources:
        mem_mb=scaled("train", "mem_mb"),
        runtime=scaled("train", "runtime"),
        # tasks_per_gpu=0: one SLURM task for the whole job (the executor's default is one task per GPU, which would
        # start the command once per GPU); kalmanrl starts the ranks itself. One node: `gpu` (Snakemake's local GPU
        # count; `--gpus` under SLURM). Several nodes: each node's GPUs as a per-node GRES. Without GPUs: one task
        # per CPU rank (`--ntasks`), which kalmanrl fills with srun.
        nodes=res("train", "nodes"),
        # The rank counts for the command: resources, not params, since N ranks train like one (a param would rerun
        # every finished run, and all its evaluations, when a job is given more GPUs).
        gpus_per_node=res("train", "gpus"),
        cpu_ranks=res("train", "cpu_ranks"),
        tasks_per_gpu=0,
        **({"gpu": res("train", "gpus")} if res("train", "nodes") == 1 or not res("train", "gpus")
           else {"gres": f"gpu:{res('train', 'gpus')}"}),
        **({} if res("train", "gpus") else {"tasks": res("train", "cpu_ranks") * res("train", "nodes")}),
    shell:
        "kalmanrl train --settings {params.settings:q} --model {input.model:q} --dataset {input.dataset:q}"
        " --out {params.run_dir:q} --threads {threads} --gpus {resources.gpus_per_node} --nodes {resources.nodes}"
        " --cpu-ranks {resources.cpu_ranks} --validation-data {input.validation:q} > {log:q} 2>&1"
