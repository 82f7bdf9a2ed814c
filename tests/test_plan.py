"""The memory plan: model shapes from configs alone, activations counted from the model's own autograd graph, the
estimate against measured CPU peaks, refusals that name the setting to change, and paper configs that fit."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

from kalmanrl.cli import main
from kalmanrl.configuration.config import ConfigError, load_config, stage_settings, validate_config
from kalmanrl.configuration.settings import resolve_rollout
from kalmanrl.jobs import plan

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"
MODEL_CONFIGS = {"qwen3-4b": FIXTURES / "Qwen3-4B", "llama-3.2-1b-instruct": FIXTURES / "Llama-3.2-1B-Instruct",
                 "qwen2.5-0.5b-instruct": FIXTURES / "Qwen2.5-0.5B-Instruct",
                 "qwen2.5-1.5b-instruct": FIXTURES / "Qwen2.5-1.5B-Instruct"}
TINY = {"vocab_size": 512, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 512, "max_position_embeddings": 512, "tie_word_embeddings": True}


def paper_args(name: str) -> list[str]:
    config = load_config(REPO / "config" / f"{name}.yaml")
    return ["--configfile", str(REPO / "config" / f"{name}.yaml"), "--model-config",
            *(f"{model}={MODEL_CONFIGS[model]}" for model in config["models"])]


@pytest.mark.parametrize("directory, params", [
    ("Qwen3-4B", 4_022_468_096), ("Llama-3.2-1B-Instruct", 1_235_814_400),
    ("Qwen2.5-0.5B-Instruct", 494_032_768), ("Qwen2.5-1.5B-Instruct", 1_543_714_304)])
def test_shape_from_config_alone_has_the_published_parameter_count(directory, params):
    shape = plan.model_shape(plan.model_config({}, FIXTURES / directory))
    assert shape.params == params
    assert shape.serve_dtype == "bfloat16"


def test_tiny_shape_comes_from_its_spec():
    shape = plan.model_shape(plan.model_config({"source": "tiny", "tiny": TINY}), "float32")
    assert (shape.layers, shape.hidden, shape.vocab, shape.kv_heads, shape.head_dim) == (2, 128, 512, 2, 32)
    assert shape.kv_bytes_per_token("float32") == 2 * 2 * 2 * 32 * 4


def saved_bytes_on_cpu(spec: dict, rows: int, length: int) -> int:
    """Bytes autograd keeps for backward in a real CPU forward (weights excluded), by distinct storage."""
    from transformers import Qwen2ForCausalLM

    from kalmanrl.policy.model import tiny_config

    model = Qwen2ForCausalLM(tiny_config(spec, plan._VocabularyOfSpec(spec["vocab_size"]))).train()
    params = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, spec["vocab_size"], (rows, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    return sum(kept.values())


def test_activations_counted_on_meta_equal_what_a_real_cpu_forward_keeps():
    shape = plan.model_shape(plan.model_config({"source": "tiny", "tiny": TINY}), "float32")
    act = shape.activations("float32")
    rows, length = 3, 40
    expected = rows * length * (act.outside + TINY["num_layers"] * act.per_layer)
    assert saved_bytes_on_cpu(TINY, rows, length) == pytest.approx(expected, rel=0.02)


def train_settings(**train) -> dict:
    """A training job's settings as the stage gets them (every default filled), vLLM with a 2048-token context."""
    config = validate_config({"train": {"prompts_per_step": 32, "group_size": 8, "mini_batches": 4, "max_tokens": 1024,
                                        **train},
                              "rollout": {"backend": "vllm", "max_model_len": 2048}})
    return stage_settings(config, "train", model="tiny", task=config["tasks"][0], algorithm="grpo", seed="0")


def estimate(shape: plan.ModelShape, settings: dict, resources: plan.Resources, *, source: str,
             **lengths) -> plan.Estimate:
    """`plan.estimate_train` of a training job's settings, resolved as the plan resolves them for `resources`, the
    model's source taken as `source`."""
    settings = {**settings, "model": {**settings["model"], "source": source}}
    return plan.estimate_train(shape, plan.resolve_for_plan("train", settings, resources), resources, **lengths)


def qwen3() -> plan.ModelShape:
    return plan.model_shape(plan.model_config({}, FIXTURES / "Qwen3-4B"))


def test_logits_are_one_chunk_of_the_micro_batch_as_token_logprobs_cuts_it():
    """Micro-batches of 8192 tokens hold 4 rows of 2048 (1024 completion positions each); a chunk takes
    chunk_tokens // rows positions of every row, at least one, at most all of them."""
    shape = qwen3()

    def logits(chunk: int) -> float:
        return estimate(shape, train_settings(micro_batch_tokens=8192, logit_chunk_tokens=chunk),
                                   plan.Resources(gpus=1), source="hub").parts["logits"]

    copy = shape.vocab * 4 * plan.LOGIT_COPIES_UPDATE
    assert logits(1024) == 4 * 256 * copy
    assert logits(1026) == 4 * 256 * copy  # 256 positions per row: 1024 tokens, not 1026
    assert logits(2) == 4 * 1 * copy
    assert logits(10**6) == 4 * 1024 * copy


def test_rows_are_as_long_as_train_max_length_lets_them_grow():
    """KRPO's limit: train.max_length (prompt + completion) under a longer vLLM context. The trainer gives a prompt of
    P tokens at most min(max_tokens, max_length - P) completion tokens, so no row is longer than max_length: the plan
    sizes rows, micro-batches, activations and the generation's KV cache by it, not by rollout.max_model_len."""
    shape = qwen3()
    capped = estimate(shape, train_settings(max_length=1024), plan.Resources(gpus=1), source="hub")
    same = estimate(shape, train_settings(), plan.Resources(gpus=1), source="hub", prompt_len=1,
                               completion_len=1023)
    assert "256 rows x 1024 tokens; micro-batches of 16 rows" in capped.notes
    assert capped.parts == same.parts
    unlimited = estimate(shape, train_settings(), plan.Resources(gpus=1), source="hub")
    assert "256 rows x 2048 tokens; micro-batches of 8 rows" in unlimited.notes
    # Micro-batches hold micro_batch_tokens either way; a budget below one row is where the old sizing doubled.
    small = {"micro_batch_tokens": 1024}
    one_row = estimate(shape, train_settings(max_length=1024, **small), plan.Resources(gpus=1), source="hub")
    two_rows = estimate(shape, train_settings(**small), plan.Resources(gpus=1), source="hub")
    assert one_row.parts["activations"] == pytest.approx(two_rows.parts["activations"] / 2, rel=1e-3)
    assert one_row.phases["updating"] < two_rows.phases["updating"]
    # A limit above the engine's context changes nothing: the context binds.
    assert estimate(shape, train_settings(max_length=4096), plan.Resources(gpus=1),
                               source="hub").parts == unlimited.parts


@pytest.mark.parametrize("backend, max_length, expected", [
    ("vllm", None, (2048 - 1024, 1024)),  # vLLM's context: rollout.max_model_len
    ("vllm", 1024, (1, 1023)),            # max_length binds first; a prompt has at least one token
    ("hf", None, (512 - 256, 256)),       # transformers generate: the model's max_position_embeddings
    ("hf", 300, (300 - 256, 256)),
    ("auto", None, (512 - 256, 256)),     # auto on the CPU: transformers
])
def test_sequence_lengths_follow_the_trainers_length_limit(backend, max_length, expected):
    from kalmanrl.jobs.stage import length_limit

    shape = plan.model_shape(plan.model_config({"source": "tiny", "tiny": TINY}), "float32")
    section = {**validate_config({})["rollout"], "max_model_len": 2048}

    max_tokens = 1024 if backend == "vllm" else 256

    def lengths(engine: str, device: str) -> tuple[int, int]:  # `auto` resolved as the plan does for the device
        rollout = resolve_rollout({**section, "backend": engine}, vllm_installed=device == "cuda")
        return plan.sequence_lengths(max_tokens, max_length, rollout, shape)

    assert lengths(backend, "cpu") == expected
    context = 2048 if backend == "vllm" else TINY["max_position_embeddings"]
    assert sum(expected) == length_limit(context, max_length)
    assert lengths("auto", "cuda") == lengths("vllm", "cuda")


def test_sharding_divides_weights_gradients_and_optimizer_state_by_the_ranks():
    shape, settings = qwen3(), train_settings(micro_batch_tokens=8192, logit_chunk_tokens=1024)
    one = estimate(shape, settings, plan.Resources(gpus=1), source="hub")
    eight = estimate(shape, settings, plan.Resources(gpus=4, nodes=2), source="hub")
    assert eight.ranks == 8
    for part in ("weights", "gradients", "optimizer"):
        assert eight.parts[part] == pytest.approx(one.parts[part] / 8)
    assert one.parts["weights"] == shape.params * 4 and one.parts["optimizer"] == shape.params * 8
    pure = estimate(shape, train_settings(micro_batch_tokens=8192, logit_chunk_tokens=1024,
                                                     precision="bfloat16"), plan.Resources(gpus=1), source="hub")
    assert pure.parts["weights"] == shape.params * 2 and pure.parts["optimizer"] == shape.params * 4


def test_checkpointing_keeps_far_fewer_activations_and_is_on_for_hub_models_only():
    shape, settings = qwen3(), train_settings(micro_batch_tokens=8192)
    hub = estimate(shape, settings, plan.Resources(gpus=1), source="hub")
    assert hub.parts["activations"] == hub.parts["activations_ckpt"] < hub.parts["activations_full"] / 5
    tiny = estimate(shape, settings, plan.Resources(gpus=1), source="tiny")
    assert tiny.parts["activations"] == tiny.parts["activations_full"]


def test_a_small_vllm_share_is_refused_naming_gpu_memory_utilization():
    settings = train_settings(micro_batch_tokens=8192, logit_chunk_tokens=1024)
    settings["rollout"]["gpu_memory_utilization"] = 0.1  # 8 GiB: less than Qwen3-4B's bf16 weights and workspace
    est = estimate(qwen3(), settings, plan.Resources(gpus=1), source="hub")
    assert not est.fits
    assert re.search(r"raise rollout.gpu_memory_utilization from 0.1 to 0\.\d+", est.problems[0])


def test_a_kv_cache_smaller_than_a_ranks_rows_is_warned_about():
    """256 rows of up to 2048 tokens against the KV cache 30% of an 80 GB GPU leaves beside Qwen3-4B's weights
    (about 14 GiB: 55 sequences): vLLM would preempt and recompute, and the plan says so; half the GPU holds every
    512-token row."""
    settings = train_settings(micro_batch_tokens=8192, logit_chunk_tokens=1024)
    est = estimate(qwen3(), settings, plan.Resources(gpus=1), source="hub")
    warning = [n for n in est.notes if n.startswith("WARNING: vLLM's KV cache holds")]
    assert len(warning) == 1 and "fewer than the 256 rows a rank generates per step" in warning[0]
    settings["rollout"].update(max_model_len=512, gpu_memory_utilization=0.5)
    settings["train"]["max_tokens"] = 256
    est = estimate(qwen3(), settings, plan.Resources(gpus=1), source="hub")
    assert not [n for n in est.notes if n.startswith("WARNING")]


def test_an_evaluation_plans_vllm_at_the_share_the_evaluate_stage_gives_it():
    """The evaluate stage gives vLLM `rollout.eval_gpu_memory_utilization` of the GPU; the plan counts that share
    and names that key (there is no `evaluate.gpu_memory_utilization`: the schema refuses it)."""
    resources = plan.Resources(gpus=1, gpu_mem_gb=80)

    def evaluation(utilization: float) -> plan.Estimate:
        config = validate_config({"evaluate": {"batch_size": 64, "k": 16, "max_tokens": 1024},
                                  "rollout": {"backend": "vllm", "max_model_len": 2048,
                                              "eval_gpu_memory_utilization": utilization}})
        settings = stage_settings(config, "evaluate", model="tiny", task=config["tasks"][0], algorithm="sft",
                                  benchmark=config["benchmarks"][0])
        return plan.estimate_evaluate(qwen3(), plan.resolve_for_plan("evaluate", settings, resources), resources)

    est = evaluation(0.5)
    assert est.parts["total"] == 0.5 * 80 * plan.GIB + plan.CUDA_OVERHEAD
    # the printed rows add up to the peak (vLLM's workspace is a row of its own)
    assert sum(est.parts[key] for key in plan.part_names(est) if key in est.parts) == est.parts["total"]
    est = evaluation(0.05)  # 4 GiB: less than Qwen3-4B's bf16 weights
    assert not est.fits and "rollout.eval_gpu_memory_utilization" in est.problems[0]


def test_cpu_jobs_are_estimated_but_never_refused():
    est = estimate(qwen3(), train_settings(), plan.Resources(gpus=0), source="hub")
    assert est.device == "cpu" and est.total > est.static > 40 * plan.GIB and est.fits  # far over any GPU asked for


def test_jobs_are_the_workflows_jobs():
    """The plan covers exactly the train and evaluate jobs `snakemake -n` schedules (keep_every included)."""
    config = load_config(REPO / "config" / "smoke.yaml")
    counted = {"train": 0, "evaluate": 0}
    for stage, wildcards in plan.jobs(config):
        counted[stage] += 1
        stage_settings(config, stage, **wildcards)
    result = subprocess.run(["snakemake", "-n", "--configfile", "config/smoke.yaml", "--config",
                             "results_dir=/nonexistent/plan-test"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("Job stats:", 1)[1]
    scheduled = {rule: int(n) for rule, n in re.findall(r"^(train|evaluate)\s+(\d+)$", table, re.M)}
    assert counted == scheduled


def test_plan_refuses_qwen3_4b_on_one_gpu_and_names_the_settings(capsys):
    code = main(["plan", *paper_args("paper-kpo"), "--config", "resources.train.gpus=1",
                 "train.micro_batch_tokens=131072", "train.logit_chunk_tokens=65536"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "DOES NOT FIT" in out and "weights" in out and "vLLM KV cache" in out
    assert re.search(r"raise resources\.train\.gpus to \d+ and set train\.logit_chunk_tokens: 4096, "
                     r"train\.micro_batch_tokens <= \d+", err), err


@pytest.mark.parametrize("precision", ["float32", "autocast_bf16", "bfloat16"])
def test_the_hf_engines_kv_cache_is_planned_in_the_dtype_generation_stores_it_in(precision):
    """The plan counts transformers' KV cache in the dtype a policy of `precision` fills it with under the trainer's
    autocast. Under autocast_bf16 that is float32, not bf16: planned at bf16, a GPU job's generation held twice the
    cache it was planned with."""
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

    from kalmanrl.configuration.settings import resolve_precision

    mode = resolve_precision(precision, "cpu")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64)).to(mode.weights_dtype).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), mode.autocast():
        model(input_ids=torch.arange(6)[None], past_key_values=cache, use_cache=True)  # prefill
        model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True)  # a decoding step
    stored = {tensor.dtype for layer in cache.layers for tensor in (layer.keys, layer.values)}
    assert stored == {getattr(torch, plan.generation_cache_dtype(precision))}


def test_the_hf_engines_generation_is_planned_at_rollout_hf_batch_size_rows_per_call():
    """transformers generate holds the KV cache and step tensors of one call of `rollout.hf_batch_size` rows (at most
    the rows there are), in training and in evaluation: the plan's generation grows with it, and was 256 rows
    whatever the config said."""
    shape, resources = qwen3(), plan.Resources(gpus=1)

    def train(batch_size: int) -> float:  # 256 rows of 2,048 tokens
        settings = train_settings(max_length=2048)
        settings["rollout"].update(backend="hf", hf_batch_size=batch_size)
        return estimate(shape, settings, resources, source="hub").parts["kv_cache"]

    def evaluate(batch_size: int) -> float:  # 8 prompts x 4 samples = 32 rows
        config = validate_config({"evaluate": {"batch_size": 8, "k": 4, "max_length": 2048},
                                  "rollout": {"backend": "hf", "hf_batch_size": batch_size}})
        settings = stage_settings(config, "evaluate", model="tiny", task=config["tasks"][0], algorithm="sft",
                                  benchmark=config["benchmarks"][0])
        return plan.estimate_evaluate(shape, plan.resolve_for_plan("evaluate", settings, resources),
                                      resources).parts["kv_cache"]

    assert train(16) == plan.hf_generate_bytes(shape, 256, 2048, "float32", batch_size=16)  # autocast_bf16
    assert train(16) == train(32) / 2 == train(64) / 4 == train(256) / 16
    assert train(512) == train(256)  # a call holds the rows there are
    two_ranks = train_settings(max_length=2048)
    two_ranks["rollout"].update(backend="hf", hf_batch_size=256)
    assert estimate(shape, two_ranks, plan.Resources(gpus=2), source="hub").parts["kv_cache"] == train(128)  # a share
    assert evaluate(8) == plan.hf_generate_bytes(shape, 32, 2048, "float32", batch_size=8)
    assert evaluate(8) == evaluate(16) / 2 == evaluate(32) / 4 == evaluate(256) / 4


def applied(stage: str, fix: str) -> list[str]:
    """A plan's suggestion (`raise resources.<stage>.gpus to N and set key: value, key <= value`) as --config
    overrides, each setting at the value it names."""
    overrides = []
    if gpus := re.match(rf"raise resources\.{stage}\.gpus to (\d+)", fix):
        overrides.append(f"resources.{stage}.gpus={gpus.group(1)}")
    if changes := re.search(r"(?:^|and )set (.*)$", fix):
        overrides += [re.sub(r": | <= ", "=", change, count=1) for change in changes.group(1).split(", ")]
    return overrides


def hf_paper_kpo(*overrides: str) -> tuple[dict, dict[str, plan.PlannedGroup]]:
    """paper-kpo with transformers generate at its own lengths (5,120-token rows), planned: the config and its one
    group per stage."""
    config = plan.load_configs([REPO / "config" / "paper-kpo.yaml"], ["rollout.backend=hf", "train.max_length=5120",
                                                                      "evaluate.max_length=5120", *overrides])
    groups = plan.plan_config(config, plan.shapes_of(config, {"qwen3-4b": MODEL_CONFIGS["qwen3-4b"]}))
    assert sorted(g.stage for g in groups) == ["evaluate", "train"]
    return config, {g.stage: g for g in groups}


def test_an_hf_generation_too_big_for_the_gpu_gets_the_largest_rollout_hf_batch_size_that_fits():
    """Qwen3-4B with rollout.backend: hf on 80 GB GPUs (a machine without vLLM) at paper-kpo's 5,120-token rows:
    each rank's 128 rows (one generate call) hold a 181 GiB KV cache and logits in training (float32 under
    autocast_bf16), and 256 rows 363 GiB in evaluation (float32), and no setting could shrink it. Each stage is
    offered the largest power of two of rows per call at which it fits, and with it the plan says it fits (with twice
    as many, it does not)."""
    config, groups = hf_paper_kpo()
    for stage, group in groups.items():
        assert not group.estimate.fits and group.estimate.parts["kv_cache"] > 80 * plan.GIB, stage
        (fix,) = [fix for fix in group.fixes if "hf_batch_size" in fix]  # training may also be offered more GPUs
        size = int(re.fullmatch(r"set rollout\.hf_batch_size: (\d+)", fix).group(1))
        assert size & (size - 1) == 0 and size < 256, fix
        assert hf_paper_kpo(f"rollout.hf_batch_size={size}")[1][stage].estimate.fits, fix
        assert not hf_paper_kpo(f"rollout.hf_batch_size={2 * size}")[1][stage].estimate.fits, fix


def test_a_training_job_too_big_beside_its_hf_generation_gets_rollout_hf_batch_size_with_the_other_changes():
    """On one GPU without gradient checkpointing neither generation nor the update fits: the change that makes
    training fit sets the rows per generate call with the rest, and applied as written, it fits."""
    _, groups = hf_paper_kpo("resources.train.gpus=1", "train.gradient_checkpointing=false")
    fixes = groups["train"].fixes
    combined = [fix for fix in fixes if "rollout.hf_batch_size: " in fix and "train.micro_batch_tokens <= " in fix]
    assert len(combined) == 1 and "train.gradient_checkpointing: true" in combined[0], fixes
    overrides = applied("train", combined[0])
    assert hf_paper_kpo("resources.train.gpus=1", "train.gradient_checkpointing=false",
                        *overrides)[1]["train"].estimate.fits, overrides


@pytest.mark.parametrize("name", ["paper-kpo", "paper-krpo"])
def test_paper_configs_fit_80_gb_gpus(name, capsys):
    assert main(["plan", *paper_args(name)]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" not in out and out.count(": fits") >= 2
    resources = load_config(REPO / "config" / f"{name}.yaml")["resources"]
    assert resources["train"]["gpu_mem_gb"] == resources["evaluate"]["gpu_mem_gb"] == 80


def test_default_config_plans_on_the_cpu(capsys):
    assert main(["plan", "--configfile", str(REPO / "config" / "config.yaml")]) == 0
    assert "not checked" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, generation, held, absent", [
    ([], "generate's KV cache and logits", "weights, optimiser state", ["vLLM", "CUDA"]),
    (["rollout.backend=vllm"], "vLLM KV cache", "weights, optimiser state", ["CUDA", "generate's"]),
    (["rollout.backend=hf", "resources.train.gpus=1", "resources.evaluate.gpus=1"], "generate's KV cache and logits",
     "weights, optimiser state, CUDA context and slack", ["vLLM"]),
    (["rollout.backend=vllm", "resources.train.gpus=1", "resources.evaluate.gpus=1"], "vLLM KV cache",
     "weights, optimiser state, CUDA context and slack", ["generate's"]),
], ids=["cpu-hf", "cpu-vllm", "gpu-hf", "gpu-vllm"])
def test_the_plans_rows_name_what_the_jobs_device_and_backend_hold(overrides, generation, held, absent, capsys):
    """The default study on the CPU (transformers generate) printed 'vLLM KV cache / generation' and a line held
    '(weights ... CUDA context)': no vLLM there, and no CUDA context on the CPU. Each row names what its estimate
    holds, in the train and the evaluate job alike."""
    assert main(["plan", "--configfile", str(REPO / "config" / "config.yaml"), "--config", *overrides]) == 0
    out = capsys.readouterr().out
    train, evaluate = out.split("\n\n")
    for group in (train, evaluate):
        assert re.search(rf"^  {re.escape(generation)}\s+\d", group, re.M), group
        assert not [word for word in absent if word in group], group
    assert re.search(r"^  held throughout .*\((.*)\)$", train, re.M).group(1) == held
    assert ("CUDA context and slack" in evaluate) == ("GPU(s)" in evaluate)


def test_stage_check_on_the_cpu_logs_and_never_refuses(tiny_model_dir):
    config = load_config(REPO / "config" / "smoke.yaml")
    settings = stage_settings(config, "train", model="tiny", task="arithmetic_easy", algorithm="grpo", seed=0)
    est = plan.check_fits("train", {**settings, "resources": {"gpus": 1, "gpu_mem_gb": 0.001}}, tiny_model_dir)
    assert est.device == "cpu" and est.fits and est.total > 0


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_a_measured_training_step():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "benchmarks" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_case("medium", "A")
    assert 0.75 <= result["ratio"] <= 1.25, result


def test_config_files_merge_in_order_and_dotted_overrides_reach_into_sections(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train: {micro_batch_tokens: 4096}\nresources: {train: {gpus: 4}}\n")
    config = plan.load_configs([REPO / "config" / "paper-kpo.yaml", extra], ["train.logit_chunk_tokens=512"])
    assert config["train"]["micro_batch_tokens"] == 4096 and config["train"]["logit_chunk_tokens"] == 512
    assert config["train"]["max_tokens"] == 4096  # kept from the first file
    assert config["resources"]["train"]["gpus"] == 4 and config["resources"]["train"]["gpu_mem_gb"] == 80


def test_a_tensor_parallel_size_for_evaluation_plans_training_on_one_gpu_per_engine(capsys):
    """The plan resolves each job's settings as the job will (kalmanrl.configuration.settings): a config with
    rollout.tensor_parallel_size 2 (evaluation only) was refused for every training job."""
    assert main(["plan", "--config", "rollout.tensor_parallel_size=2"]) == 0


def test_a_model_config_without_a_directory_exits_2_naming_it(capsys):
    assert main(["plan", "--configfile", str(REPO / "config" / "smoke.yaml"), "--model-config", "tiny"]) == 2
    assert "--model-config tiny: expected NAME=DIR" in capsys.readouterr().err


def test_a_model_whose_config_cannot_be_read_names_it_and_the_offline_way(tmp_path):
    from kalmanrl.jobs.plan import shapes_of

    config = {"models": {"mine": {"source": "local", "path": str(tmp_path / "none"), "dtype": "bfloat16"}}}
    with pytest.raises(ConfigError, match=r"models\.mine: its config\.json cannot be read .* --model-config mine=DIR"):
        shapes_of(config, {})
    with pytest.raises(ConfigError, match=r"--model-config other: not in the config's models \(known: mine\)"):
        shapes_of(config, {"other": tmp_path})
