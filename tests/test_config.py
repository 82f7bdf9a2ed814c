"""The config schema is the single source of defaults and validation; errors name the key that is wrong."""

import copy
import json
import os
import re

import pytest
import yaml

from job_settings import job_settings
from kalmanrl.configuration.config import (
    STAGE_SETTINGS_PARTS,
    ConfigError,
    config_hash,
    fill_defaults,
    load_config,
    load_configs,
    load_schema,
    parse_settings,
    read_config_file,
    stage_settings,
    validate_config,
)
from kalmanrl.data.sources import DATA_DIR_ENV
from smoke_runs import smoke_workdir, snakemake


def test_every_shipped_config_validates(repo_root):
    for path in sorted((repo_root / "config").glob("*.yaml")):
        config = load_config(path)
        assert config["tasks"] and config["algorithms"], path


def test_empty_config_gets_every_default():
    config = validate_config({})
    assert config["train"]["group_size"] == 8
    assert config["models"]["tiny"]["tiny"]["hidden_size"] == 128
    assert set(config["algorithms"]) == {"grpo", "krpo", "kpo"}
    assert config["resources"]["train"]["threads"] == 1


def test_builtin_datasets_are_merged_under_the_config_ones():
    config = validate_config({"datasets": {"arithmetic_easy": {"loader": "arithmetic", "params": {"train_size": 5}}}})
    assert config["datasets"]["arithmetic_easy"]["params"] == {"train_size": 5}
    assert config["datasets"]["math500"]["reward"] == "math_verify"


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"unknown key 'config\.train\.lrr'"):
        validate_config({"train": {"lrr": 1e-3}})


def test_wrong_type_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"config\.train\.lr: 'fast' is not of type 'number'"):
        validate_config({"train": {"lr": "fast"}})


def test_bad_value_inside_a_named_entry_is_named():
    with pytest.raises(ConfigError, match=r"config\.algorithms\.mine\.aggregate"):
        validate_config({"algorithms": {"mine": {"aggregate": "sum"}}})


def test_unknown_dataset_in_tasks_is_refused():
    with pytest.raises(ConfigError, match=r"config\.tasks: unknown dataset 'nope'"):
        validate_config({"tasks": ["nope"]})


def test_tiny_model_head_dim_must_suit_vllm_cpu():
    with pytest.raises(ConfigError, match="must be 32 or 64"):
        validate_config({"models": {"t": {"tiny": {"hidden_size": 96, "num_heads": 6}}}})


def test_hub_model_needs_an_id():
    with pytest.raises(ConfigError, match=r"config\.models\.big: source 'hub' needs key 'id'"):
        validate_config({"models": {"big": {"source": "hub"}}})


@pytest.mark.parametrize("ratio", ["kpo", "sequence"])
def test_off_policy_ratios_are_refused_with_one_optimiser_step_per_batch(ratio):
    with pytest.raises(ConfigError, match=r"config\.algorithms\.x: .*identically 1"):
        validate_config({"algorithms": {"x": {"ratio": ratio}}, "train": {"mini_batches": 1, "ppo_epochs": 1}})
    validate_config({"algorithms": {"x": {"ratio": ratio}}, "train": {"mini_batches": 1, "ppo_epochs": 2}})


def test_mini_batches_must_divide_the_rollout_batch():
    """torch.chunk would make fewer or unequal mini-batches, so fewer optimiser steps than the config says."""
    with pytest.raises(ConfigError, match=r"config\.train\.mini_batches: 5 does not divide .* 12 completions"):
        validate_config({"train": {"prompts_per_step": 3, "group_size": 4, "mini_batches": 5}})
    validate_config({"train": {"prompts_per_step": 3, "group_size": 4, "mini_batches": 6}})


def test_pass_k_cannot_exceed_k():
    with pytest.raises(ConfigError, match=r"config\.evaluate\.pass_k"):
        validate_config({"evaluate": {"k": 2, "pass_k": [1, 4]}})


def test_no_pass_k_is_a_valid_choice():
    """metrics.summarise takes an empty pass_k (no pass@k columns); validation crashed on max([])."""
    assert validate_config({"evaluate": {"pass_k": []}})["evaluate"]["pass_k"] == []


def test_fill_defaults_does_not_touch_given_values():
    schema = load_schema()
    filled = fill_defaults({"train": {"lr": 0.5}}, schema)
    assert filled["train"]["lr"] == 0.5 and filled["train"]["steps"] == 40


def test_train_settings_of_one_algorithm_ignore_the_others():
    """A change to KRPO's parameters must not rerun GRPO's jobs: each job's params hold only what it uses."""
    config = validate_config({})
    changed = copy.deepcopy(config)
    changed["algorithms"]["krpo"]["advantage_params"] = {"q": 1e-3}
    wildcards = dict(model="tiny", task="arithmetic_easy", seed="0")
    assert stage_settings(config, "train", algorithm="grpo", **wildcards) == \
        stage_settings(changed, "train", algorithm="grpo", **wildcards)
    assert stage_settings(config, "train", algorithm="krpo", **wildcards) != \
        stage_settings(changed, "train", algorithm="krpo", **wildcards)


def test_settings_round_trip_through_the_command_line(tmp_path):
    config = validate_config({})
    settings = stage_settings(config, "train", model="tiny", task="arithmetic_easy", algorithm="kpo", seed="1")
    assert parse_settings(json.dumps(settings), "train") == settings
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**settings, "train": {"steps": 3}}))  # a part states only what differs
    parsed = parse_settings(f"@{path}", "train")
    assert parsed["train"]["steps"] == 3 and parsed["train"]["group_size"] == 8


def test_settings_with_a_bad_key_name_it():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stepz'"):
        parse_settings(job_settings("train", train={"stepz": 3}), "train")


@pytest.mark.parametrize("stage, wildcards", [
    ("data", dict(dataset="arithmetic_easy")),
    ("model", dict(model="tiny")),
    ("sft", dict(model="tiny", task="arithmetic_easy")),
    ("train", dict(model="tiny", task="arithmetic_easy", algorithm="kpo", seed="0")),
    ("evaluate", dict(model="tiny", benchmark="arithmetic_easy", algorithm="kpo", seed="0")),
    ("report", {}),
])
def test_a_stage_job_is_given_every_part_it_needs_and_only_known_parts(stage, wildcards):
    parts = STAGE_SETTINGS_PARTS[stage]
    required = {key for key, part in parts.items() if part.required}
    assert required <= set(stage_settings(validate_config({}), stage, **wildcards))
    config = validate_config({"train": {"validation": {"every": 2}}})
    config["plugins"] = ["my_plugin.py"]  # not imported here
    assert set(stage_settings(config, stage, **wildcards)) <= set(parts)


@pytest.mark.parametrize("stage, wildcards, dropped", [
    ("sft", dict(model="tiny", task="arithmetic_easy"), ["template"]),
    ("train", dict(model="tiny", task="arithmetic_easy", algorithm="kpo", seed="0"), ["algorithm", "ident"]),
    ("evaluate", dict(model="tiny", benchmark="arithmetic_easy", algorithm="kpo", seed="0"), ["model"]),
])
def test_settings_lacking_a_part_the_stage_needs_fail_naming_it(stage, wildcards, dropped):
    """A hand-written settings file without a part ended in a KeyError traceback inside the job."""
    settings = stage_settings(validate_config({}), stage, **wildcards)
    for key in dropped:
        del settings[key]
    lacking = ", ".join(map(repr, dropped))
    with pytest.raises(ConfigError, match=rf"^--settings: the {stage} stage's settings lack {lacking} \(print "
                                          rf"complete ones for a config with `kalmanrl settings {stage} \.\.\.`\)$"):
        parse_settings(json.dumps(settings), stage)


def test_an_unknown_part_of_a_jobs_settings_fails_naming_it_and_the_known_ones():
    """A misspelt part ("trian"), or another stage's ("sft" given to a training job), was silently ignored."""
    with pytest.raises(ConfigError, match=r"--settings: unknown part 'trian', 'sft' of the train stage's settings "
                                          r"\(known parts: train, model, algorithm, rollout, task, ident, validation, "
                                          r"plugins\)"):
        parse_settings('{"trian": {"steps": 3}, "train": {"steps": 2}, "sft": {}}', "train")


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_command_line_strings_are_read_as_the_types_the_schema_asks_for():
    """`snakemake --config seeds='[0,1]'` passes ['0', '1']; YAML 1.1 reads 1e-4 as a string."""
    config = validate_config({"seeds": ["0", "1"], "results_dir": "123",
                              "train": {"lr": "1e-4", "steps": "10", "schedule": "cosine"},
                              "data": {"decontaminate": "false"}, "rollout": {"backend": "vllm"}})
    assert config["seeds"] == [0, 1] and config["results_dir"] == "123"
    assert (config["train"]["lr"], config["train"]["steps"], config["train"]["schedule"]) == (1e-4, 10, "cosine")
    assert config["data"]["decontaminate"] is False and config["rollout"]["backend"] == "vllm"


def test_a_string_that_is_no_number_is_still_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"config.train.lr: 'fast' is not of type 'number'"):
        validate_config({"train": {"lr": "fast"}})


@pytest.mark.parametrize("definition, key, registry", [
    ("dataset", "template", "kalmanrl.data.prompts:TEMPLATES"),
    ("dataset", "loader", "kalmanrl.data.loaders:LOADERS"),
    ("dataset", "reward", "kalmanrl.data.rewards:REWARDS"),
    ("algorithm", "advantage", "kalmanrl.rl.algorithms:ADVANTAGE_ESTIMATORS"),
    ("algorithm", "ratio", "kalmanrl.rl.algorithms:RATIO_TRANSFORMS"),
    ("algorithm", "surrogate", "kalmanrl.rl.algorithms:SURROGATES"),
])
def test_the_schema_lists_every_built_in_name_of_a_registry(definition, key, registry):
    """The schema is the reference `kalmanrl config` prints: its lists of names must not fall behind the code. Built-in
    means registered by the package itself (other tests register their own entries, e.g. tests/digit_share.py)."""
    import importlib

    module, attribute = registry.split(":")
    found = getattr(importlib.import_module(module), attribute)
    names = [name for name in found.names() if found.get(name).__module__.startswith("kalmanrl.")]
    description = load_schema()["$defs"][definition]["properties"][key]["description"]
    missing = [name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", description)]
    assert names and not missing, f"$defs.{definition}.{key} does not list {missing}"


def test_schema_nodes_hold_only_json_schema_keywords():
    """A comma in an unquoted flow-mapping description (`{description: a (b, c).}`) silently cuts the text and adds
    a key `c).`; the validator ignores unknown keywords, so only this catches it."""
    keywords = {"$schema", "title", "description", "type", "default", "properties", "additionalProperties", "items",
                "required", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems",
                "maxItems", "minLength", "minProperties", "uniqueItems", "$ref", "$defs"}

    def stray(node, path):
        if not isinstance(node, dict):
            return []
        found = [f"{path}.{key}" for key in node if key not in keywords]
        for key, value in node.items():
            if key in ("properties", "$defs"):
                found += [bad for name, sub in value.items() for bad in stray(sub, f"{path}.{key}.{name}")]
            elif key in ("additionalProperties", "items"):
                found += stray(value, f"{path}.{key}")
        return found

    assert stray(load_schema(), "schema") == []


@pytest.mark.parametrize("algorithm, named", [
    ({"eps_low": 1.5}, r"config\.algorithms\.a\.eps_low: 1\.5 is greater than or equal to the maximum of 1"),
    ({"eps_low": -0.1}, r"config\.algorithms\.a\.eps_low: -0\.1 is less than the minimum of 0"),
    ({"eps_high": -0.1}, r"config\.algorithms\.a\.eps_high: -0\.1 is less than the minimum of 0"),
    ({"clip_ratio_c": 1}, r"config\.algorithms\.a\.clip_ratio_c: 1 is less than or equal to the minimum of 1"),
    ({"beta": -1}, r"config\.algorithms\.a\.beta: -1 is less than the minimum of 0"),
    ({"advantage_params": {"eps": -1e-8}}, r"config\.algorithms\.a\.advantage_params: eps must be >= 0"),
    ({"advantage": "krpo", "advantage_params": {"eps": 0}}, r"config\.algorithms\.a\.advantage_params: eps must be"),
    ({"advantage": "krpo", "advantage_params": {"r": 0}}, r"config\.algorithms\.a\.advantage_params: Kalman filter"),
    ({"ratio_params": {"clamp": 0}}, r"config\.algorithms\.a\.ratio_params: clamp must be > 0"),
    ({"ratio": "sequence", "ratio_params": {"clamp": -1}}, r"config\.algorithms\.a\.ratio_params: clamp must be"),
    ({"ratio": "kpo", "ratio_params": {"clamp": 0}}, r"config\.algorithms\.a\.ratio_params: clamp must be > 0"),
    ({"ratio": "kpo", "ratio_params": {"q": -1}}, r"config\.algorithms\.a\.ratio_params: Kalman filter needs"),
    ({"ratio": "kpo", "ratio_params": {"gains": "float32"}},
     r"config\.algorithms\.a\.ratio_params: unknown Kalman gains 'float32'; known: exact, authors_float32"),
])
def test_the_bounds_the_losses_assume_are_refused_naming_the_key(algorithm, named):
    with pytest.raises(ConfigError, match=named):
        validate_config({"algorithms": {"a": {"advantage": "grpo", "ratio": "token", **algorithm}}})


@pytest.mark.parametrize("section, values, environ, named", [
    ("algorithms", {"kpo": {"advantage": "grpo", "ratio": "kpo", "eps_low": 1.5}}, {},
     "config.algorithms.kpo.eps_low: 1.5 is greater than or equal to the maximum of 1"),
    ("data", {"local_dir": "no/such/dir"}, {}, "data.local_dir = 'no/such/dir': no such directory"),
    ("data", {"local_dir": None}, {DATA_DIR_ENV: "no/such/dir"}, f"${DATA_DIR_ENV} = 'no/such/dir': no such"),
])
def test_a_dry_run_refuses_a_loss_bound_or_a_missing_data_directory_naming_the_setting(tmp_path, section, values,
                                                                                        environ, named):
    workdir = smoke_workdir(tmp_path, ["kpo"])
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config[section].update(values)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "-n", check=False, env={**os.environ, **environ})
    assert result.returncode != 0
    assert named in result.stdout + result.stderr, result.stderr[-3000:]


def test_an_algorithm_may_not_take_the_warm_starts_name():
    """Its evaluations would be `eval/.../sft/...`, the warm start's: the trained policy never evaluated."""
    with pytest.raises(ConfigError, match=r"config\.algorithms\.sft: .*warm start"):
        validate_config({"algorithms": {"sft": {}}})


@pytest.mark.parametrize("config, named", [
    ({"algorithms": {"grpo/v2": {}}}, r"config\.algorithms: the name 'grpo/v2'"),
    ({"models": {"qwen/4b": {}}}, r"config\.models: the name 'qwen/4b'"),
    ({"datasets": {"arith.v2": {"loader": "arithmetic"}}, "tasks": ["arith.v2"]}, r"config\.tasks: .*'arith\.v2'"),
    ({"datasets": {"a/b": {"loader": "arithmetic"}}, "benchmarks": ["a/b"]}, r"config\.benchmarks: .*'a/b'"),
])
def test_names_the_results_trees_wildcards_cannot_match_are_refused_naming_the_key(config, named):
    """Such a name made no job (Snakemake's MissingInputException for a path it has no rule for, naming no key)."""
    with pytest.raises(ConfigError, match=named):
        validate_config(config)
    validate_config({"models": {"qwen2.5-0.5b": {}}, "algorithms": {"grpo.v2": {}}})  # dots are fine there


@pytest.mark.parametrize("key, value", [("seeds", [0, 0, 1]), ("tasks", ["arithmetic_easy", "arithmetic_easy"]),
                                        ("benchmarks", ["arithmetic_easy", "arithmetic_easy"])])
def test_a_repeated_seed_task_or_benchmark_is_refused_naming_the_key(key, value):
    """A repeat listed the same jobs twice, and the report read their summaries twice (a seed counted twice)."""
    with pytest.raises(ConfigError, match=rf"config\.{key}: .*non-unique"):
        validate_config({key: value})


@pytest.mark.parametrize("config, named", [
    ({"seeds": [0, 2**31]}, r"config\.seeds\.1: 2147483648 is greater than the maximum"),
    ({"data": {"seed": 2**64}}, r"config\.data\.seed: 18446744073709551616 is greater than the maximum"),
    ({"evaluate": {"seed": -1}}, r"config\.evaluate\.seed: -1 is less than the minimum of 0"),
])
def test_a_seed_outside_0_to_2_31_is_refused_naming_the_key(config, named):
    """Jobs derive their generators' seeds from these (seed x 1,000,003 + step): a seed of 2**64 passed validation and
    stopped the job at torch's manual_seed, a negative evaluation seed at numpy's SeedSequence."""
    with pytest.raises(ConfigError, match=named):
        validate_config(config)
    validate_config({"seeds": [0, 2**31 - 1], "data": {"seed": 2**31 - 1}, "evaluate": {"seed": 0}})


def test_an_empty_list_of_validation_benchmarks_is_refused():
    """[] validated on every benchmark, as null does; turning validation off is train.validation.every: 0."""
    with pytest.raises(ConfigError, match=r"config\.train\.validation\.benchmarks: \[\] should be non-empty"):
        validate_config({"train": {"validation": {"every": 2, "benchmarks": []}}})


@pytest.mark.parametrize("stage, key", [("evaluate", "nodes"), ("sft", "cpu_ranks"), ("model", "nodes")])
def test_nodes_and_cpu_ranks_outside_training_are_refused_naming_the_key(stage, key):
    """Only the train rule reads them: elsewhere they were silently ignored (one process on one node)."""
    with pytest.raises(ConfigError, match=rf"config\.resources\.{stage}\.{key}: 2; only training"):
        validate_config({"resources": {stage: {key: 2}}})
    validate_config({"resources": {"train": {key: 2}}})


@pytest.mark.parametrize("text, message", [
    (None, r"nope\.yaml: cannot read the config file \(No such file or directory\)"),
    ("train: {steps: [1\n", r"bad\.yaml:2:1: not valid YAML \(expected ',' or ']'"),
    ("- 1\n", r"bad\.yaml: a config is a mapping of keys to values, not a list"),
    ("train:\n  lr: 0.1\ntrain:\n  steps: 3\n",
     r"bad\.yaml:3:1: not valid YAML \(duplicate key 'train' \(first at line 1\)\)"),
    (b"train: {lr: 0.1}  # \xff\n", r"bad\.yaml: not UTF-8 text \(byte b'\\xff' at offset 20\)"),
])
def test_a_config_file_that_cannot_be_read_fails_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / ("nope.yaml" if text is None else "bad.yaml")
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match=message):
        load_configs([path], [])


def test_a_settings_file_that_cannot_be_read_fails_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"--settings @.*none\.json: cannot read the settings file"):
        parse_settings(f"@{tmp_path / 'none.json'}", "train")


def test_a_settings_file_that_is_not_utf8_fails_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"report: {title: caf\xe9}\n")
    with pytest.raises(ConfigError, match=r"--settings @.*latin1\.yaml: not UTF-8 text \(byte b'\\xe9'"):
        parse_settings(f"@{path}", "report")


def test_a_yaml_merge_key_may_override_what_it_merges(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("x-base: &base {lr: 0.1, steps: 3}\ntrain: {<<: *base, lr: 0.2}\n")
    assert read_config_file(path)["train"] == {"lr": 0.2, "steps": 3}


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e999"])
def test_a_number_that_is_not_finite_is_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"config\.train\.lr: -?(nan|inf) is not a finite number"):
        load_configs([], [f"train.lr={text}"])


@pytest.mark.parametrize("text", [".nan", "-.inf"])
def test_a_job_setting_that_is_not_finite_is_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"report\.confidence: -?(nan|inf) is not a finite number"):
        parse_settings(f"report: {{confidence: {text}}}", "report")


@pytest.mark.parametrize("loader, params, message", [
    ("math", {"splits": "train"}, "parameter 'splits' is 'train', not a list of str"),
    ("math", {"levels": [1, "2"]}, "parameter 'levels' is [1, '2'], not a list of int or null"),
    ("arithmetic", {"difficulty": "easy", "train_size": True}, "parameter 'train_size' is True, not int"),
    ("hub", {"hub_id": "org/set", "fields": {"problem": 1}}, "parameter 'fields' is {'problem': 1}, not a mapping"),
])
def test_a_loader_parameter_of_another_type_than_the_loader_takes_is_refused_naming_it(loader, params, message):
    """A string for MATH's splits was read letter by letter, failing at the data job as "math/t.jsonl: file not
    found"."""
    with pytest.raises(ConfigError, match=re.escape(f"config.datasets.d.params: dataset loader {loader!r} {message}")):
        validate_config({"datasets": {"d": {"loader": loader, "params": params}}})
