"""The RL loop: batches are response-aligned, log-probs ignore padding, the data order is a function of the step,
a killed run resumes to exactly the uninterrupted result, and divergence aborts with a clear error."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import digit_share  # noqa: F401  (registers the "digit_share" reward)
from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import resolve_gradient_checkpointing, resolve_train
from kalmanrl.jobs.trainer import (
    NonFiniteLossError,
    _step_problems,
    check_ranks,
    has_dropout,
    mini_batch_backward,
    mini_batch_schedule,
    sample,
    score_logprobs,
    score_rewards,
    setup,
    train,
    update,
)
from kalmanrl.policy.batch import build_batch, micro_batches
from kalmanrl.policy.logprobs import token_logprobs
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import Completion
from kalmanrl.runtime.distributed import Ranks

TIMING = {"wall_time", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout", "time_reward", "time_score",
          "time_update"}


def settings_for(algorithm: str, **train) -> dict:
    config = validate_config({
        "train": {"steps": 3, "prompts_per_step": 4, "group_size": 4, "mini_batches": 2, "max_tokens": 12,
                  "checkpoint_every": 1, "lr": 1e-3, **train},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm=algorithm, seed="0")


def completion(ids):
    return Completion(token_ids=ids, logprobs=[0.0] * len(ids), text="", finish_reason="stop")


def test_batch_is_left_padded_prompts_then_aligned_completions():
    batch = build_batch([[5, 6, 7], [8]], [[completion([1, 2]), completion([3])], [completion([4, 4, 4])] * 2],
                        torch.arange(4.0).view(2, 2), pad_id=0)
    assert batch.prompt_len == 3
    assert batch.input_ids.tolist()[1] == [5, 6, 7, 3, 0, 0]
    assert batch.input_ids.tolist()[2] == [0, 0, 8, 4, 4, 4]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert batch.position_ids.tolist()[2][2:] == [0, 1, 2, 3]
    assert batch.advantages.tolist() == [0, 1, 2, 3]


def test_token_logprobs_do_not_depend_on_padding(tiny_model_dir):
    from kalmanrl.policy.model import load_policy

    model, _ = load_policy(tiny_model_dir)
    prompts, outs = [[11, 12, 13, 14], [15]], [[completion([20, 21, 22])], [completion([23])]]
    together = token_logprobs(model, build_batch(prompts, outs, torch.zeros(2, 1), pad_id=0))
    for i in range(2):
        alone = token_logprobs(model, build_batch([prompts[i]], [outs[i]], torch.zeros(1, 1), pad_id=0))
        n = len(outs[i][0].token_ids)
        torch.testing.assert_close(together[i, :n], alone[0, :n], rtol=1e-5, atol=1e-5)


def test_prompt_order_is_a_function_of_the_step():
    first = [_step_problems(10, step, 4, seed=3) for step in range(5)]
    assert first == [_step_problems(10, step, 4, seed=3) for step in range(5)]
    epoch0 = sum(first[:2], []) + first[2][:2]
    assert sorted(epoch0) == list(range(10))
    assert first != [_step_problems(10, step, 4, seed=4) for step in range(5)]


@pytest.mark.parametrize("algorithm", ["grpo", "krpo", "kpo"])
def test_training_writes_metrics_and_a_loadable_policy(tmp_path, tiny_model_dir, arithmetic_parquet, algorithm):
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for(algorithm))
    assert list(metrics["step"]) == [1, 2, 3]
    assert metrics["grad_norm"].notna().all()
    assert (metrics["ratio_max"] >= metrics["ratio_min"]).all()
    assert pd.read_parquet(tmp_path / "metrics.parquet").equals(metrics)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "final", use_safetensors=True)


def test_the_engine_sleeps_before_the_scoring_pass_and_wakes_after_the_update(tmp_path, tiny_model_dir,
                                                                              arithmetic_parquet, monkeypatch):
    """On a GPU the colocated vLLM engine holds its weights and KV cache until it sleeps: scoring the old log-probs
    beside it would need both at once (what `kalmanrl plan` does not count). Each step must run sample, sleep,
    score, update, sync in that order (recorded here through the hf engine, whose sleep is a no-op on the CPU)."""
    from kalmanrl.jobs import trainer
    from kalmanrl.policy import rollout

    calls: list[str] = []
    for name in ("generate", "sleep", "sync_weights"):
        original = getattr(rollout.HFEngine, name)
        monkeypatch.setattr(rollout.HFEngine, name, lambda self, *a, _f=original, _n=name, **k:
                            (calls.append(_n), _f(self, *a, **k))[1])
    monkeypatch.setattr(trainer, "score_logprobs", lambda *a, _f=trainer.score_logprobs: (calls.append("score"),
                                                                                           _f(*a))[1])
    monkeypatch.setattr(trainer, "update", lambda *a, _f=trainer.update: (calls.append("update"), _f(*a))[1])
    train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for("grpo", steps=2))
    assert calls == ["generate", "sleep", "score", "update", "sync_weights"] * 2


@pytest.mark.parametrize("precision, autocast", [("autocast_bf16", True), ("float32", False)])
def test_the_hf_engine_samples_under_the_precision_that_scores(tmp_path, tiny_model_dir, arithmetic_parquet,
                                                               monkeypatch, precision, autocast):
    """Under autocast_bf16 the old log-probs come from the bf16-autocast forward: the hf engine, which runs the policy
    module itself, must sample from that same function, not from the float32 one."""
    from kalmanrl.policy import rollout

    seen: list[bool] = []
    original = rollout.HFEngine.generate
    monkeypatch.setattr(rollout.HFEngine, "generate", lambda self, *a, **k: (
        seen.append(torch.is_autocast_enabled("cpu")), original(self, *a, **k))[1])
    train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for("grpo", steps=1, precision=precision))
    assert seen == [autocast]


def test_policy_moves_off_policy_within_a_rollout_batch(tmp_path, tiny_model_dir, arithmetic_parquet):
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for("grpo"))
    assert (metrics["ratio_max"] > metrics["ratio_min"]).any(), "ratios never left 1: updates were not off-policy"


def rollout_batch(run, step: int):
    """The trainer's phases up to the update for one step: (the batch with its advantages, its mini-batch schedule)."""
    rollout = sample(run, step)
    _, rewards = score_rewards(run, rollout)
    batch = build_batch(rollout.prompt_ids, rollout.completions, run.settings.algorithm.estimator(rewards),
                        run.tokenizer.pad_token_id)
    return batch, mini_batch_schedule(len(batch.advantages), run.settings.train, run.seed, step)


@pytest.mark.parametrize("algorithm", ["grpo", "kpo"])
def test_the_first_mini_batch_takes_its_old_logprobs_from_its_update_forward(tmp_path, tiny_model_dir,
                                                                             arithmetic_parquet, algorithm):
    """Leaving the first mini-batch's old log-probs to its own update forward (the policy is still the sampling one)
    changes no number: the same old log-probs, update statistics and weights as scoring every mini-batch first (two
    epochs, several micro-batches per mini-batch)."""
    results = []
    for fused in (False, True):
        run = setup(tiny_model_dir, arithmetic_parquet, tmp_path / str(fused),
                    settings_for(algorithm, ppo_epochs=2, micro_batch_tokens=150), threads=1)
        assert run.old_from_update
        run.old_from_update = fused
        with run.engine, run.reward_fn:
            batch, schedule = rollout_batch(run, 0)
            score_logprobs(run, batch, schedule[0])
            assert (batch.old_logp[schedule[0][0]] == 0).all() == fused
            stats = update(run, batch, schedule)
        results.append((batch.old_logp, stats, {n: p.detach().clone() for n, p in run.policy.named_parameters()}))
    (old_logp, stats, weights), (fused_old_logp, fused_stats, fused_weights) = results
    assert torch.equal(fused_old_logp, old_logp)
    assert fused_stats.keys() == stats.keys()
    assert all(fused_stats[k] == stats[k] or fused_stats[k] != fused_stats[k] and stats[k] != stats[k] for k in stats)
    assert all(torch.equal(fused_weights[n], weights[n]) for n in weights)


def test_a_policy_with_dropout_scores_every_mini_batch_before_updating(tiny_model_dir):
    """With dropout the update's forward is not the sampling policy's, so it cannot provide the old log-probs."""
    policy, _ = load_policy(tiny_model_dir)
    assert not has_dropout(policy)
    policy.config.attention_dropout = 0.1
    assert has_dropout(policy)
    policy.config.attention_dropout = 0.0
    policy.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert has_dropout(policy)


def _run_cli(out: Path, model: Path, data: Path, settings: dict) -> subprocess.Popen:
    """`kalmanrl train` in a subprocess that also registers the test reward."""
    code = "import sys, digit_share; from kalmanrl.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "train", "--settings", json.dumps(settings),
                             "--model", str(model), "--dataset", str(data), "--out", str(out)],
                            cwd=Path(__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, arithmetic_parquet):
    settings = settings_for("kpo", steps=8)
    whole = tmp_path / "whole"
    assert _run_cli(whole, tiny_model_dir, arithmetic_parquet, settings).wait() == 0

    cut = tmp_path / "cut"
    proc = _run_cli(cut, tiny_model_dir, arithmetic_parquet, settings)
    deadline = time.time() + 300
    while not list((cut / "checkpoints").glob("step_000002")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.parquet").exists(), "the run finished before it could be killed"
    assert _run_cli(cut, tiny_model_dir, arithmetic_parquet, settings).wait() == 0

    expected, got = (pd.read_parquet(d / "metrics.parquet").drop(columns=list(TIMING)) for d in (whole, cut))
    pd.testing.assert_frame_equal(expected, got)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The final policy says where it was trained: the cut run once from step 0 and once from its checkpoint.
    whole_env, cut_env = (json.loads((d / "final" / "provenance.json").read_text())["environments"]
                          for d in (whole, cut))
    assert [e["from_step"] for e in whole_env] == [0]
    assert len(cut_env) == 2 and cut_env[0]["from_step"] == 0 and cut_env[1]["from_step"] >= 2
    assert all(e["git_commit"] == whole_env[0]["git_commit"] and e["lock"] and e["cpu_model"] for e in cut_env)


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, tiny_model_dir, arithmetic_parquet):
    train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for("grpo", steps=2))
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for("grpo", steps=2, lr=5e-4))
    assert list(metrics["step"]) == [1, 2] and (metrics["lr"] == 5e-4).all()


def test_keep_every_keeps_those_checkpoints_loadable_and_drops_the_others(tmp_path, tiny_model_dir,
                                                                          arithmetic_parquet):
    train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for("grpo", steps=5, keep_every=2))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_000002", "step_000004", "step_000005"]  # every 2nd step, and the newest for a resume
    assert load_policy(tmp_path / "checkpoints" / "step_000002" / "model")[0].config.model_type == "qwen2"


def test_non_finite_losses_skip_updates_then_abort(tmp_path, tiny_model_dir, arithmetic_parquet):
    settings = settings_for("grpo", max_nonfinite=1, steps=3, lr=1e30)  # the first step's weights overflow
    with pytest.raises(NonFiniteLossError, match="non-finite losses"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings)


def test_a_non_finite_gradient_of_a_finite_loss_skips_the_update(tmp_path, tiny_model_dir, arithmetic_parquet):
    run = setup(tiny_model_dir, arithmetic_parquet, tmp_path, settings_for("grpo"), threads=1)
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    with run.engine, run.reward_fn:
        batch, schedule = rollout_batch(run, 0)
        score_logprobs(run, batch, schedule[0])
        run.policy.get_input_embeddings().weight.register_hook(lambda grad: grad * math.inf)
        stats = update(run, batch, schedule)
    assert stats["nonfinite_skipped"] == run.settings.train.optimizer_steps and math.isfinite(stats["pg_loss"])
    assert all(torch.equal(before[n], p) for n, p in run.policy.named_parameters())


def test_kpo_with_one_optimiser_step_per_batch_is_refused(tmp_path, tiny_model_dir, arithmetic_parquet):
    settings = settings_for("kpo")
    settings["train"]["mini_batches"] = 1
    with pytest.raises(ValueError, match="identically 1"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings)


@pytest.mark.parametrize("algorithm", ["grpo", "krpo", "kpo"])
def test_rl_learns_what_it_is_rewarded_for(tmp_path, tiny_model_dir, arithmetic_parquet, algorithm):
    """From random weights, every algorithm raises the reward (the share of digits in a completion) within a few
    steps: the loop, the advantages and the ratio transforms push the policy the right way."""
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path,
                    settings=settings_for(algorithm, steps=20, lr=3e-3, checkpoint_every=100))
    first, last = metrics["reward_mean"].iloc[:3].mean(), metrics["reward_mean"].iloc[-3:].mean()
    assert last > first + 0.1, (first, last)


def test_padded_micro_batches_respect_the_token_budget_and_group_rows_by_length():
    # prompts of 3 and 1 tokens, completions of 2, 1, 3, 3: real tokens 5, 4, 4, 4, longest first 0, 1, 2, 3
    batch = build_batch([[5, 6, 7], [8]], [[completion([1, 2]), completion([3])], [completion([4, 4, 4])] * 2],
                        torch.zeros(2, 2), pad_id=0)
    index = torch.tensor([3, 0, 2, 1])
    assert [m.tolist() for m in micro_batches(batch, index, 100)] == [[0, 1, 2, 3]]
    # [0, 1] costs 2 x (3 + 2) = 10; [0, 1, 2] 3 x (3 + 3) = 18 > 12; [2, 3] costs 2 x (1 + 3)
    assert [m.tolist() for m in micro_batches(batch, index, 10)] == [[0, 1], [2, 3]]
    assert [m.tolist() for m in micro_batches(batch, index, 12)] == [[0, 1], [2, 3]]
    assert [m.tolist() for m in micro_batches(batch, index, 1)] == [[0], [1], [2], [3]]  # a row never splits
    # completions of 1, 8, 1, 8 tokens: in sampling order two rows a micro-batch would be half padding
    mixed = build_batch([[5]], [[completion([1]), completion([2] * 8), completion([3]), completion([4] * 8)]],
                        torch.zeros(1, 4), pad_id=0)
    assert [m.tolist() for m in micro_batches(mixed, torch.arange(4), 18)] == [[1, 3], [0, 2]]
    assert micro_batches(batch, index[:0], 10) == []


@pytest.mark.parametrize("empty_row", [False, True])
@pytest.mark.parametrize(("surrogate", "aggregate"), [("clipped", "grpo"), ("clipped", "bnpo"),
                                                      ("clipped", "dr_grpo"), ("clipped", "dapo"),
                                                      ("geometric_mean", "grpo")])
def test_a_mini_batch_gradient_does_not_depend_on_its_micro_batches(tiny_model_dir, surrogate, aggregate,
                                                                    empty_row):
    """The weighted micro-batch losses sum to the whole mini-batch's loss, so the gradient is the same for every
    split (clipping active, the KL term on), also when a row has no trained token (left out of grpo's mean and of a
    per-sequence surrogate's)."""
    policy, _ = load_policy(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[int]:
        return torch.randint(3, policy.config.vocab_size, (n,), generator=generator).tolist()

    groups = [[completion(draw(n)) for n in lens] for lens in ([7, 3, 1], [11, 2, 6])]
    batch = build_batch([draw(4), draw(9)], groups, torch.randn(2, 3, generator=generator), pad_id=0)
    with torch.no_grad():
        exact = token_logprobs(policy, batch)
    batch.old_logp = exact + 0.3 * torch.randn(exact.shape, generator=generator)
    batch.ref_logp = exact + 0.1 * torch.randn(exact.shape, generator=generator)
    if empty_row:  # as a rollout correction's mask rejecting row 2
        batch.loss_mask = batch.completion_mask.clone()
        batch.loss_mask[2] = 0
    raw = settings_for("grpo", logit_chunk_tokens=7)
    raw["algorithm"] = {**raw["algorithm"], "beta": 0.05, "aggregate": aggregate, "surrogate": surrogate}
    settings = resolve_train(raw, "cpu", vllm_installed=False)
    mini = torch.tensor([4, 0, 5, 2, 1])

    def gradient(budget):
        policy.zero_grad(set_to_none=True)
        losses = mini_batch_backward(policy, batch, mini, settings.with_train(micro_batch_tokens=budget),
                                     defaultdict(list))
        return torch.stack(losses).sum(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    whole_loss, whole = gradient(10**6)
    for budget in (1, 30, 45):
        loss, split = gradient(budget)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-7)
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_is_on_for_hub_and_local_models_unless_set():
    settings = settings_for("grpo")
    assert settings["model"]["source"] == "tiny" and not resolve_train(settings, "cpu").train.gradient_checkpointing
    for source in ("hub", "local"):
        assert resolve_gradient_checkpointing(None, source)
        assert not resolve_gradient_checkpointing(False, source)
    assert resolve_gradient_checkpointing(True, "tiny")


def test_training_with_small_micro_batches_and_checkpointing_matches_one_micro_batch(tmp_path, tiny_model_dir,
                                                                                       arithmetic_parquet):
    whole = train(tiny_model_dir, arithmetic_parquet, tmp_path / "whole", settings=settings_for("kpo", steps=2))
    split = train(tiny_model_dir, arithmetic_parquet, tmp_path / "split", settings=settings_for(
        "kpo", steps=2, micro_batch_tokens=40, logit_chunk_tokens=3, gradient_checkpointing=True))
    for key in ("reward_mean", "loss", "grad_norm", "pg_loss", "ratio_mean", "ratio_max", "clip_frac"):
        assert split[key].tolist() == pytest.approx(whole[key].tolist(), rel=1e-4, abs=1e-6), key
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("whole", "split"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_default_study_keeps_one_micro_batch_per_mini_batch(repo_root, tiny_model_dir):
    """config/config.yaml's mini-batch (rows x (prompt + max_tokens)) fits train.micro_batch_tokens; a rendered
    prompt's length in bytes bounds its byte-level BPE token count."""
    from kalmanrl.configuration.config import load_config
    from kalmanrl.data.loaders import build_dataset
    from kalmanrl.data.prompts import get_template

    config = load_config(repo_root / "config" / "config.yaml")
    cfg, tokenizer = config["train"], load_policy(tiny_model_dir)[1]
    rows = cfg["prompts_per_step"] * cfg["group_size"] // cfg["mini_batches"]
    for task in config["tasks"]:
        dataset = config["datasets"][task]
        table, _ = build_dataset(dataset, local_dir=repo_root, seed=config["data"]["seed"],
                                 arithmetic_presets=config["data"]["arithmetic_presets"])
        template = get_template(dataset["template"])
        longest = max(len(template.render(tokenizer, p).encode()) for p in table.column("problem").to_pylist())
        assert rows * (longest + cfg["max_tokens"]) <= cfg["micro_batch_tokens"], (task, longest)


def test_an_untrained_final_stop_token_leaves_the_completion_mask():
    eos, end_of_text = 9, 8
    stopped, cut, early = completion([1, 2, eos]), completion([3, 4, 5]), completion([eos, 6])
    batch = build_batch([[5], [6]], [[stopped, cut], [early, completion([end_of_text])]], torch.zeros(2, 2), pad_id=0,
                        untrained_stops=(end_of_text, eos))
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert batch.attention_mask[:, 1:].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert build_batch([[5]], [[stopped]], torch.zeros(1, 1), pad_id=0).completion_mask.tolist() == [[1, 1, 1]]


def test_warmup_in_rollout_batches_and_no_loss_on_eos_train(tmp_path, tiny_model_dir, arithmetic_parquet):
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings_for(
        "grpo", steps=4, warmup_ratio=0.5, loss_on_eos=False, weight_decay=0.1))
    assert metrics["lr"].tolist() == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    assert metrics["grad_norm"].notna().all()


def test_ranks_that_cannot_share_the_batch_are_refused_before_loading_anything():
    cfg = resolve_train(settings_for("grpo", prompts_per_step=4, group_size=2, mini_batches=2), "cpu").train
    check_ranks(cfg, Ranks(rank=1, world_size=4))  # 4 rows per mini-batch, one for each rank
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        check_ranks(cfg, Ranks(rank=1, world_size=3))
    with pytest.raises(ValueError, match="a mini-batch holds 2 completions .* fewer than the 4 ranks"):
        check_ranks(resolve_train(settings_for("grpo", prompts_per_step=4, group_size=2, mini_batches=4), "cpu").train,
                    Ranks(rank=1, world_size=4))


def test_mini_batches_are_shuffled_per_epoch_or_contiguous_as_verl_cuts_them():
    shuffled = resolve_train(settings_for("grpo", ppo_epochs=2, mini_batches=2), "cpu").train
    contiguous = resolve_train(settings_for("grpo", ppo_epochs=2, mini_batches=2, mini_batch_order="contiguous"),
                               "cpu").train
    epochs = mini_batch_schedule(8, shuffled, seed=0, step=3)
    assert [sorted(torch.cat(minis).tolist()) for minis in epochs] == [list(range(8))] * 2
    assert torch.cat(epochs[0]).tolist() != torch.cat(epochs[1]).tolist()  # a fresh permutation per epoch
    again = mini_batch_schedule(8, shuffled, seed=0, step=3)  # a function of the step
    assert [[m.tolist() for m in minis] for minis in again] == [[m.tolist() for m in minis] for minis in epochs]
    assert [[m.tolist() for m in minis] for minis in mini_batch_schedule(8, contiguous, seed=0, step=3)] == [
        [[0, 1, 2, 3], [4, 5, 6, 7]]] * 2
