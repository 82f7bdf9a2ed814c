rule evaluate:
    """k samples per benchmark problem from the warm start ("sft"), a trained policy ("<algorithm>/seed<n>") or one
    of its kept checkpoints ("<algorithm>/seed<n>/step<k>", train.keep_every)."""
    input:
        model=eval_model,
        dataset=dataset_file("{benchmark}"),
    output:
        details=f"{R}/eval/{{model}}/{{task}}/{{run}}/{{benchmark}}.details.parquet",
        summary=f"{R}/eval/{{model}}/{{task}}/{{run}}/{{benchmark}}.summary.parquet",
    params:
        settings=lambda wc: settings("evaluate", **run_ident(wc)),
        model=eval_model_dir,
    container:
        image("evaluate")
    conda:
        conda_env("evaluate")
    log:
        f"{LOGS}/evaluate/{{model}}/{{task}}/{{run}}/{{benchmark}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{task}}/{{run}}/{{benchmark}}.tsv"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=scaled("evaluate", "mem_mb"),
        runtime=scaled("evaluate", "runtime"),
        gpu=res("evaluate", "gpus"),
        tasks_per_gpu=0,  # one SLURM task: vLLM spreads itself over the GPUs (rollout.tensor_parallel_size)
    shell:
        "kalmanrl evaluate --settings {params.settings:q} --model {params.model:q} --dataset {input.dataset:q}"
        " --details {output.details:q} --summary {output.summary:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
