# The model rule runs where the workflow was started: copying a hub model needs the internet, which compute nodes
# often lack.
localrules:
    model,


rule model:
    """The base policy: a tiny tokenizer + random Qwen2 trained on the tasks' text, or a copy of a hub/local model."""
    input:
        texts=lambda wc: [dataset_file(t) for t in config["tasks"]] if config["models"][wc.model]["source"] == "tiny" else [],
    output:
        directory(f"{R}/models/{{model}}/base"),
    params:
        settings=lambda wc: settings("model", model=wc.model),
    container:
        image("model")
    conda:
        conda_env("model")
    log:
        f"{LOGS}/model/{{model}}.log",
    threads: res("model", "threads")
    resources:
        mem_mb=scaled("model", "mem_mb"),
        runtime=scaled("model", "runtime"),
    shell:
        "kalmanrl model --settings {params.settings:q} --texts {input.texts:q} --out {output:q} > {log:q} 2>&1"


rule sft:
    """Supervised warm start on the task's (decontaminated) train split, in the task's answer format."""
    input:
        model=f"{R}/models/{{model}}/base",
        dataset=train_split_file("{task}"),
    output:
        directory(f"{R}/models/{{model}}/{{task}}/sft"),
    params:
        settings=lambda wc: settings("sft", model=wc.model, task=wc.task),
    container:
        image("sft")
    conda:
        conda_env("sft")
    log:
        f"{LOGS}/sft/{{model}}/{{task}}.log",
    benchmark:
        f"{BENCH}/sft/{{model}}/{{task}}.tsv"
    threads: res("sft", "threads")
    resources:
        mem_mb=scaled("sft", "mem_mb"),
        runtime=scaled("sft", "runtime"),
        gpu=res("sft", "gpus"),
    shell:
        "kalmanrl sft --settings {params.settings:q} --model {input.model:q} --dataset {input.dataset:q}"
        " --out {output:q} --threads {threads} --gpus {resources.gpu} > {log:q} 2>&1"
