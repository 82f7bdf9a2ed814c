rule evaluate:
    """k samples per benchmark problem from the warm start ("sft"), a trained policy ("<algorithm>/seed<n>") or one
    of its kept checkpoints ("<algorithm>/seed<n>/step<k>", train.keep_every)."""
    input:
        model=eval_model,
        dataset=TREE.dataset(dataset="{benchmark}"),
    output:
        details=TREE.evaluation("details"),
        summary=TREE.evaluation("summary"),
    params:
        settings=lambda wc: settings("evaluate", **run_ident(wc)),
        model=eval_model_dir,
    container:
        image("evaluate")
    conda:
        conda_env("evaluate")
    log:
        TREE.log("evaluate"),
    benchmark:
        TREE.benchmark("evaluate")
    threads: res("evaluate", "threads")
    resources:
        mem_mb=scaled("evaluate", "mem_mb"),
        runtime=scaled("evaluate", "runtime"),
        gpu=res("evaluate", "gpus"),
        tasks_per_gpu=0,  # one SLURM task: vLLM spreads itself over the GPUs (rollout.tensor_parallel_size)
    shell:
        "kalmanrl evaluate --settings {params.settings:q} --model {params.model:q} --dataset {input.dataset:q}"
        " --details {output.details:q} --summary {output.summary:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
