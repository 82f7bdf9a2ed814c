# The model rule runs where the workflow was started: copying a hub model needs the internet, which compute nodes
# often lack.
localrules:
    model,


rule model:
    """The base policy: a tiny tokenizer + random Qwen2 trained on the tasks' text, or a copy of a hub/local model."""
    input:
        texts=lambda wc: [TREE.dataset(dataset=t) for t in config["tasks"]] if config["models"][wc.model]["source"] == "tiny" else [],
    output:
        directory(TREE.base_model()),
    params:
        settings=lambda wc: settings("model", model=wc.model),
    container:
        image("model")
    conda:
        conda_env("model")
    log:
        TREE.log("model"),
    threads: res("model", "threads")
    resources:
        mem_mb=scaled("model", "mem_mb"),
        runtime=scaled("model", "runtime"),
    shell:
        "kalmanrl model --settings {params.settings:q} --texts {input.texts:q} --out {output:q} > {log:q} 2>&1"


rule sft:
    """Supervised warm start on the task's (decontaminated) train split, in the task's answer format."""
    input:
        model=TREE.base_model(),
        dataset=TREE.train_split(),
    output:
        directory(TREE.warm_start_model()),
    params:
        settings=lambda wc: settings("sft", model=wc.model, task=wc.task),
    container:
        image("sft")
    conda:
        conda_env("sft")
    log:
        TREE.log("sft"),
    benchmark:
        TREE.benchmark("sft")
    threads: res("sft", "threads")
    resources:
        mem_mb=scaled("sft", "mem_mb"),
        runtime=scaled("sft", "runtime"),
        gpu=res("sft", "gpus"),
    shell:
        "kalmanrl sft --settings {params.settings:q} --model {input.model:q} --dataset {input.dataset:q}"
        " --out {output:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
