"""Settings resolved once: `kalmanrl.configuration.settings` turns a training job's settings into frozen, typed objects
and is the only module that decides a default depending on the run (precision, gradient checkpointing, backend,
context)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kalmanrl.configuration import settings
from kalmanrl.configuration.config import stage_settings, validate_config
from kalmanrl.configuration.settings import Algorithm, Rollout, Sft, Train, resolve_train
from kalmanrl.rl import algorithms

SRC = Path(settings.__file__).parent

# How the run-dependent rules were spelled where they used to be worked out again (plan.py, trainer.py, stage.py,
# rollout.py): comparing a setting with "auto", null gradient checkpointing decided by the model's source, and the
# engine's context chosen by backend.
RULES = {
    "an `auto` setting resolved": re.compile(r'(==|!=|\bin)\s*\(?[^\n#]*"auto"'),
    "null gradient checkpointing resolved": re.compile(r'source\s*!=\s*"tiny"|gradient_checkpointing[^\n#]*is None'),
    "the engine's context chosen": re.compile(r'max_model_len"?\]?\s+if\b|return\s+\w+\["max_model_len"\]\s*$'),
}


def raw_settings(algorithm: str = "kpo", **train) -> dict:
    config = validate_config({"train": {"mini_batches": 2, **train}})
    return stage_settings(config, "train", model="tiny", task=config["tasks"][0], algorithm=algorithm, seed="3")


def test_every_run_dependent_default_is_resolved_by_device_source_and_installation():
    raw = raw_settings(micro_batch_tokens=300)
    raw["rollout"] = {**raw["rollout"], "backend": "auto"}
    cpu = resolve_train(raw, "cpu", vllm_installed=False)
    gpu = resolve_train(raw, "cuda", vllm_installed=True)
    assert (cpu.train.precision.name, gpu.train.precision.name) == ("float32", "autocast_bf16")
    assert (cpu.rollout.backend, gpu.rollout.backend) == ("hf", "vllm")
    assert (cpu.rollout.context(512), gpu.rollout.context(512)) == (512, raw["rollout"]["max_model_len"])
    assert not cpu.train.gradient_checkpointing  # the tiny model
    hub = resolve_train({**raw, "model": {**raw["model"], "source": "hub"}}, "cpu", vllm_installed=False)
    assert hub.train.gradient_checkpointing
    assert cpu.train.micro_batch_tokens == 300 and cpu.train.optimizer_steps == 2 and cpu.seed == 3
    kpo = raw["algorithm"]["ratio_params"]
    assert cpu.algorithm.noise_filter == {k: v for k, v in kpo.items() if k != "clamp"}
    assert cpu.algorithm.aggregation is algorithms.AGGREGATES.get(raw["algorithm"]["aggregate"])
    assert resolve_train(raw_settings("grpo"), "cpu").algorithm.noise_filter == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.train.steps = 1  # type: ignore[misc]


def test_the_typed_sections_hold_exactly_the_schemas_keys():
    """A setting added to the schema must land in its dataclass (or resolving every job fails), and vice versa."""
    defaults = validate_config({})
    bound = {"estimator", "ratio_transform", "aggregation", "correction", "noise_filter"}
    for section, name in ((Train, "train"), (Rollout, "rollout"), (Sft, "sft")):
        assert {f.name for f in dataclasses.fields(section)} == set(defaults[name]), name
    assert {f.name for f in dataclasses.fields(Algorithm)} - bound == set(defaults["algorithms"]["grpo"])
    raw = raw_settings()
    with pytest.raises(TypeError, match="new_setting"):
        resolve_train({**raw, "train": {**raw["train"], "new_setting": 1}}, "cpu", vllm_installed=False)


def test_tensor_parallel_size_is_for_evaluation_and_training_engines_span_one_gpu():
    """The rollout section is shared: training refused a tensor_parallel_size meant for evaluation, so no workflow
    could use one (README: "evaluation only")."""
    raw = raw_settings()
    tp2 = {**raw, "rollout": {**raw["rollout"], "tensor_parallel_size": 2}}
    assert resolve_train(tp2, "cuda", vllm_installed=True).rollout.tensor_parallel_size == 1


def test_settings_a_training_job_cannot_run_are_refused_when_resolved():
    raw = raw_settings()
    with pytest.raises(ValueError, match="needs several optimiser steps"):
        resolve_train(raw_settings(mini_batches=1), "cpu", vllm_installed=False)
    with pytest.raises(ValueError, match="train.precision = 'fp8'"):
        resolve_train(raw_settings(precision="bfloat16") | {"train": {**raw["train"], "precision": "fp8"}}, "cpu")


def test_no_module_but_settings_resolves_a_run_dependent_default():
    for rule, pattern in RULES.items():  # the patterns catch the spellings they replaced
        assert any(pattern.search(line) for line in OLD_SPELLINGS[rule]), rule
    found = [f"{path.name}:{number}: {rule}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py")) if path != Path(settings.__file__)
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for rule, pattern in RULES.items() if pattern.search(line)]
    assert not found, "resolve these in kalmanrl.configuration.settings:\n" + "\n".join(found)


OLD_SPELLINGS = {
    "an `auto` setting resolved": ['    if device == "cuda" and backend in ("vllm", "auto"):',
                                   '    if value == "auto":'],
    "null gradient checkpointing resolved": ['    return source != "tiny" if value is None else bool(value)'],
    "the engine's context chosen": ['    context = rollout["max_model_len"] if vllm or not positions else positions',
                                    '        return rollout["max_model_len"]'],
}
