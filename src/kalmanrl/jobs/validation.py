"""Validation while training (train.validation): the policy's accuracy on a few held-out benchmark problems every few
steps, sampled by the engine the training job already holds, so a run shows its learning curve without an
evaluation job per checkpoint (the KPO authors validate every 10 steps on 50 MATH-500, AIME24 and AIME25 problems).

The sampling seed is the same at every validation of a run: two validations differ by the policy, not by the draw."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kalmanrl.configuration.settings import Precision, Validation
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import get_template
from kalmanrl.data.rewards import RewardFunction, get_reward
from kalmanrl.jobs.stage import completion_budgets, encode_prompts, fitting_prompts
from kalmanrl.policy.rollout import RolloutEngine, SamplingConfig


@dataclass
class Benchmark:
    """One benchmark's validation problems, encoded once, with its reward."""

    name: str
    answers: list[str]
    prompt_ids: list[list[int]]
    budgets: tuple[int, ...] | None
    reward_fn: RewardFunction


def load_benchmarks(validation: Validation, paths: Sequence[Path], tokenizer, *, limit: float, overlong: str,
                    num_workers: int) -> list[Benchmark]:
    """The first validation.max_problems test problems of each validated dataset (`paths`, in the order of
    validation.datasets), prompts encoded by the dataset's template; overlong ones dropped or refused as in training
    (`rollout.overlong_prompts`), the others given what `limit` leaves of the evaluate section's max_tokens."""
    names = list(validation.datasets)
    if len(paths) != len(names):
        raise ValueError(f"train.validation validates {names} but {len(paths)} dataset file(s) were given "
                         "(kalmanrl train --validation-data, one per dataset in that order)")
    benchmarks = []
    for name, path in zip(names, paths, strict=True):
        entry = validation.datasets[name]
        problems = read_dataset(path, split="test").to_pandas().iloc[:validation.max_problems]
        template = get_template(entry["template"], entry["chat_template_kwargs"],
                                add_special_tokens=entry["add_special_tokens"])
        prompt_ids = encode_prompts(tokenizer, template, problems["problem"])
        kept = fitting_prompts(prompt_ids, limit, overlong, f"the validation problems of {name}",
                               fix="raise rollout.max_model_len or train.max_length, or validate on other problems")
        prompt_ids = [prompt_ids[i] for i in kept]
        benchmarks.append(Benchmark(
            name, list(problems["answer"].iloc[kept]), prompt_ids,
            completion_budgets(prompt_ids, validation.sampling["max_tokens"], limit),
            get_reward(entry["reward"], **{"num_workers": num_workers, **entry["reward_params"]})))
    return benchmarks


@contextlib.contextmanager
def rewards_open(benchmarks: Sequence[Benchmark]) -> Iterator[None]:
    """Every benchmark's reward workers, for the life of the training loop."""
    with contextlib.ExitStack() as stack:
        for benchmark in benchmarks:
            stack.enter_context(benchmark.reward_fn)
        yield


def validate(benchmarks: Sequence[Benchmark], engine: RolloutEngine, validation: Validation, *, seed: int,
             precision: Precision) -> dict[str, float]:
    """Accuracy (the share of correct samples) on each benchmark (`val_accuracy_<name>`), pooled over every
    validated problem (`val_accuracy`: a larger benchmark weighs more), and the seconds it took."""
    start = time.perf_counter()
    metrics, correct, samples = {}, 0, 0
    for index, benchmark in enumerate(benchmarks):
        sampling = SamplingConfig(n=validation.k, temperature=validation.sampling["temperature"],
                                  top_p=validation.sampling["top_p"], max_tokens=validation.sampling["max_tokens"],
                                  seed=seed * 1_000_003 + (index + 1) * (1 << 42), budgets=benchmark.budgets)
        with precision.generating(engine):
            completions = engine.generate(benchmark.prompt_ids, sampling)
        texts = [c.text for group in completions for c in group]
        golds = [answer for answer in benchmark.answers for _ in range(validation.k)]
        verdicts = benchmark.reward_fn.judge(texts, golds)
        right = sum(bool(v.correct) for v in verdicts)
        metrics[f"val_accuracy_{benchmark.name}"] = right / len(verdicts)
        correct, samples = correct + right, samples + len(verdicts)
    return {**metrics, "val_accuracy": correct / samples, "time_validation": time.perf_counter() - start}


def due(validation: Validation, step: int, steps: int) -> bool:
    """Whether the policy after `step` RL steps (1-based) is validated: every validation.every steps and the last."""
    return bool(validation.every) and (step % validation.every == 0 or step == steps)

