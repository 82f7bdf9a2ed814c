"""Every pluggable part is one kind of registry: duplicates refused, one error type listing the known names,
parameters checked when bound; and config validation binds every name and parameter a config gives, naming the key,
without loading data or starting reward worker processes."""

from __future__ import annotations

import multiprocessing

import pytest

from kalmanrl.configuration.config import ConfigError, validate_config
from kalmanrl.core.registry import DuplicateNameError, ParameterError, Registry, RegistryError, UnknownNameError
from kalmanrl.data import loaders, prompts, rewards
from kalmanrl.rl import algorithms
from kalmanrl.runtime import trackers

REGISTRIES = {
    "advantage estimator": (algorithms.ADVANTAGE_ESTIMATORS, "grpo"),
    "ratio transform": (algorithms.RATIO_TRANSFORMS, "token"),
    "surrogate": (algorithms.SURROGATES, "clipped"),
    "reward": (rewards.REWARDS, "math_verify"),
    "prompt template": (prompts.TEMPLATES, "boxed"),
    "dataset loader": (loaders.LOADERS, "math500"),
    "tracker": (trackers.TRACKERS, "tensorboard"),
}


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registry_refuses_duplicates_and_lists_known_names_alike(kind):
    registry, existing = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind
    with pytest.raises(DuplicateNameError, match=f"{kind} '{existing}' is already registered"):
        registry.register(existing, object())
    with pytest.raises(UnknownNameError) as err:
        registry.get("nope")
    assert str(err.value) == f"unknown {kind} 'nope' (known: {', '.join(registry.names())})"
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)  # both lookups' usual catches


def test_parameters_are_checked_when_bound():
    registry: Registry = Registry("thing")

    @registry.register("scaled")
    def scaled(x, *, factor, offset=0.0):
        return factor * x + offset

    assert registry.bind("scaled", {"factor": 2.0})(3.0) == 6.0
    with pytest.raises(ParameterError, match=r"thing 'scaled' got unknown parameter 'scale' \(known: factor, offset\)"):
        registry.bind("scaled", {"scale": 2.0, "factor": 1.0})
    with pytest.raises(ParameterError, match="thing 'scaled' needs parameter 'factor'"):
        registry.bind("scaled", {})
    assert issubclass(ParameterError, RegistryError) and issubclass(UnknownNameError, RegistryError)


def test_a_class_entry_takes_the_keyword_parameters_of_its_whole_init_chain():
    names, required = rewards.REWARDS.parameters("math_verify")
    assert {"after_think", "require_box", "timeout_s", "max_chars", "num_workers", "format_weight"} <= set(names)
    assert required == []
    with pytest.raises(ParameterError, match="reward 'krpo_arithmetic' got unknown parameter 'after_think'"):
        rewards.get_reward("krpo_arithmetic", after_think=True)


def test_unregister_removes_a_temporary_entry():
    registry: Registry = Registry("thing")
    registry.register("a", 1)
    assert registry.unregister("a") == 1 and "a" not in registry
    with pytest.raises(UnknownNameError):
        registry.unregister("a")


def test_traits_belong_to_their_entry_and_go_with_it():
    registry: Registry = Registry("thing")
    registry.register("a", 1, per_sequence=True)
    registry.register("b")(2)
    assert registry.trait("a", "per_sequence") is True
    assert registry.trait("b", "per_sequence") is None and registry.trait("b", "per_sequence", False) is False
    registry.unregister("a")
    registry.register("a", 3)
    assert registry.trait("a", "per_sequence") is None  # a new entry of the same name starts without traits
    with pytest.raises(UnknownNameError, match="unknown thing 'c'"):
        registry.trait("c", "per_sequence")
    assert algorithms.SURROGATES.trait("geometric_mean", "per_sequence") is True
    assert algorithms.RATIO_TRANSFORMS.trait("kpo", "needs_off_policy") is True
    assert algorithms.RATIO_TRANSFORMS.trait("token", "needs_off_policy") is False


@pytest.mark.parametrize("config, message", [
    ({"algorithms": {"foo": {"advantage": "nope", "ratio": "token"}}},
     r"config\.algorithms\.foo\.advantage: unknown advantage estimator 'nope' \(known: grpo, krpo"),
    ({"algorithms": {"foo": {"advantage_params": {"epz": 1.0}}}},
     r"config\.algorithms\.foo\.advantage_params: advantage estimator 'grpo' got unknown parameter 'epz'"),
    ({"algorithms": {"foo": {"advantage_params": {"scale": "global"}}}},
     r"config\.algorithms\.foo\.advantage_params: unknown GRPO scale 'global'"),
    ({"algorithms": {"foo": {"ratio": "gmpo"}}}, r"config\.algorithms\.foo\.ratio: unknown ratio transform 'gmpo'"),
    ({"algorithms": {"foo": {"ratio": "kpo", "ratio_params": {"Q": 1.0}}}},
     r"config\.algorithms\.foo\.ratio_params: ratio transform 'kpo' got unknown parameter 'Q'"),
    ({"algorithms": {"foo": {"surrogate": "harmonic"}}},
     r"config\.algorithms\.foo\.surrogate: unknown surrogate 'harmonic' \(known: clipped, geometric_mean\)"),
    ({"datasets": {"d": {"loader": "mmlu"}}}, r"config\.datasets\.d\.loader: unknown dataset loader 'mmlu'"),
    ({"datasets": {"d": {"loader": "arithmetic", "params": {"max_term": 2}}}},
     r"config\.datasets\.d\.params: dataset loader 'arithmetic' got unknown parameter 'max_term'"),
    ({"datasets": {"d": {"loader": "hub"}}}, r"config\.datasets\.d\.params: dataset loader 'hub' needs parameters"),
    ({"datasets": {"d": {"loader": "math500", "template": "r1"}}},
     r"config\.datasets\.d\.template: unknown prompt template 'r1' \(known: answer_tag, boxed"),
    ({"datasets": {"d": {"loader": "math500", "reward": "exact"}}},
     r"config\.datasets\.d\.reward: unknown reward 'exact' \(known: (\w+, )*krpo_arithmetic, math_verify"),
    ({"datasets": {"d": {"loader": "math500", "reward_params": {"timeout": 3}}}},
     r"config\.datasets\.d\.reward_params: reward 'math_verify' got unknown parameter 'timeout'"),
    ({"datasets": {"d": {"loader": "math500", "reward_params": {"timeout_s": -1}}}},
     r"config\.datasets\.d\.reward_params: timeout_s, max_chars and max_memory_mb must be positive"),
])
def test_validation_binds_every_name_and_parameter_naming_the_key(config, message):
    before = multiprocessing.active_children()
    with pytest.raises(ConfigError, match=message):
        validate_config(config)
    assert multiprocessing.active_children() == before  # no reward worker was started


def test_validation_of_the_whole_catalogue_starts_no_worker_and_loads_no_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data directory here: a loader that ran would fail
    before = multiprocessing.active_children()
    config = validate_config({})
    assert {"math500", "arithmetic_easy"} <= set(config["datasets"])
    assert multiprocessing.active_children() == before
