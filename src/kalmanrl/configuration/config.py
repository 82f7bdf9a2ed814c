"""The experiment config: one JSON Schema (workflow/schemas/config.schema.yaml) is the single source of defaults,
types and documentation. The Snakefile and every `kalmanrl <stage>` call validate through this module, so a typo fails
the same way everywhere, with the key that is wrong."""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A config or stage settings value is invalid; the message names the key."""


@functools.cache
def load_schema() -> dict:
    """The config schema shipped with the package (a link to workflow/schemas/config.schema.yaml)."""
    return yaml.safe_load(resources.files("kalmanrl.configuration").joinpath("config.schema.yaml").read_text())


@functools.cache
def builtin_datasets() -> dict:
    """The dataset catalogue every config starts from."""
    return yaml.safe_load(resources.files("kalmanrl.data").joinpath("catalogue.yaml").read_text())


def resolve_ref(schema: dict) -> dict:
    """The schema node a `$ref` points to (followed until there is none), or `schema` itself."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = load_schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return resolve_ref(node)


def fill_defaults(value: Any, schema: dict) -> Any:
    """Return `value` with every missing key that has a schema default filled in, recursively (through $ref,
    nested objects and name -> object mappings)."""
    schema = resolve_ref(schema)
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for key, sub in schema.get("properties", {}).items():
        sub = resolve_ref(sub)
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = fill_defaults(out[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in set(out) - set(schema.get("properties", {})):
            out[key] = fill_defaults(out[key], extra)
    return out


def _accepts_string(schema: dict) -> bool:
    types = schema.get("type")
    if types is None:
        return "enum" not in schema or any(isinstance(v, str) for v in schema["enum"])
    return "string" in ([types] if isinstance(types, str) else types)


def parse_text(text: str) -> Any:
    """A value written as JSON or YAML: JSON first (YAML 1.1 reads 1e-06 as a string), then YAML, which raises
    yaml.YAMLError when neither parses."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def coerce_strings(value: Any, schema: dict) -> Any:
    """Read strings as JSON/YAML values wherever the schema does not take a string: `snakemake --config` passes
    `seeds='[0,1]'` as ['0', '1'] and `train={lr: 1e-4}` with '1e-4', and YAML 1.1 files read 1e-4 as a string.
    What still does not fit is left for validation to name."""
    schema = resolve_ref(schema)
    if isinstance(value, str) and not _accepts_string(schema):
        try:
            value = parse_text(value)
        except yaml.YAMLError:
            pass  # left as text, for validation to name
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {key: coerce_strings(item, properties.get(key, extra if isinstance(extra, dict) else {}))
                for key, item in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce_strings(item, schema["items"]) for item in value]
    return value


def _describe(error: jsonschema.ValidationError, root: str) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    where = f"{root}.{path}" if path else root
    if error.validator == "additionalProperties":
        known = sorted(resolve_ref(error.schema).get("properties", {}))
        unexpected = sorted(set(error.instance) - set(known))
        return f"unknown key {', '.join(repr(f'{where}.{k}') for k in unexpected)} (known keys: {', '.join(known)})"
    return f"{where}: {error.message}"


def _non_finite(value: Any, where: str) -> Iterable[str]:
    """The key paths of NaN and infinite numbers in `value` (YAML's .nan / .inf, JSON's NaN / Infinity): every
    comparison with NaN is false, so a schema bound such as `exclusiveMinimum: 0` lets it through."""
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{where}: {value} is not a finite number"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}.{index}")


def check(value: Any, schema: dict, root: str) -> None:
    """Validate against a (sub)schema, with no number NaN or infinite; raise ConfigError listing every problem with
    its key path."""
    validator = jsonschema.Draft202012Validator({**schema, "$defs": load_schema()["$defs"]})
    errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_describe(e, root) for e in errors] + list(_non_finite(value, root))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def validate_config(config: dict) -> dict:
    """Read command-line strings, fill defaults, validate, merge the dataset catalogue and check cross-references.
    Returns a new dict."""
    schema = load_schema()
    config = coerce_strings(config, schema)
    check(config, schema, "config")
    config = fill_defaults(config, schema)
    config["datasets"] = {**fill_defaults(builtin_datasets(), schema["properties"]["datasets"]), **config["datasets"]}
    check(config, schema, "config")
    import_plugins(config["plugins"])
    _check_references(config)
    return config


def check_data_dir(config: dict, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a copy directory that does not exist (`data.local_dir`, else $KALMANRL_DATA_DIR; relative to the
    working directory, as the data jobs read it), naming the setting: before any job runs, not when a data job does.
    Separate from `validate_config`, which also runs where the copies need not be (a cluster job's node)."""
    from kalmanrl.data.dataset import DataError
    from kalmanrl.data.sources import resolve_local_dir

    try:
        resolve_local_dir(config["data"]["local_dir"], environ)
    except DataError as err:
        raise ConfigError(str(err)) from None


def import_plugins(plugins: Iterable[str], where: str = "config.plugins") -> None:
    """Import the user's modules so that what they register (estimators, rewards, loaders, templates) can be named
    in the config: a dotted module name importable from the working directory, or a `.py` file relative to it (its
    directory goes on sys.path, so reward worker processes can import it by name too). Importing twice is a no-op."""
    plugins = list(plugins)
    if not plugins:
        return
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for index, plugin in enumerate(plugins):
        key = f"{where}[{index}]"
        if plugin.endswith(".py"):
            path = Path(plugin).resolve()
            if not path.is_file():
                raise ConfigError(f"{key}: no file {plugin!r} (relative to the working directory {cwd})")
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            name = path.stem
        else:
            name, path = plugin, None
        try:
            module = importlib.import_module(name)
        except Exception as err:
            raise ConfigError(f"{key}: importing plugin {plugin!r} failed: {type(err).__name__}: {err}") from err
        if path is not None and Path(getattr(module, "__file__", "") or "").resolve() != path:
            raise ConfigError(f"{key}: plugin {plugin!r} is shadowed by the module {name!r} at "
                              f"{getattr(module, '__file__', None)}: rename the file")


def _check_references(config: dict) -> None:
    from kalmanrl.core.layout import WARM_START, WILDCARD_CONSTRAINTS

    if WARM_START in config["algorithms"]:
        raise ConfigError(f"config.algorithms.{WARM_START}: the name {WARM_START!r} is the warm start's in the results "
                          "tree (its evaluations would be the warm start's): rename the algorithm")
    # Names are path components of the results tree: one the workflow's wildcards cannot match has no rule to make it.
    for key, names, wildcard in (("models", config["models"], "model"),
                                 ("algorithms", config["algorithms"], "algorithm")):
        for name in names:
            if not re.fullmatch(WILDCARD_CONSTRAINTS[wildcard], name):
                raise ConfigError(f"config.{key}: the name {name!r} cannot be a path component of the results tree "
                                  f"(it must match {WILDCARD_CONSTRAINTS[wildcard]}): rename it")
    for key, names in (("tasks", config["tasks"]), ("benchmarks", config["benchmarks"]),
                       ("train.validation.benchmarks", config["train"]["validation"]["benchmarks"] or [])):
        for name in names:
            if name not in config["datasets"]:
                raise ConfigError(f"config.{key}: unknown dataset {name!r} "
                                  f"(known: {', '.join(sorted(config['datasets']))})")
            if not re.fullmatch(WILDCARD_CONSTRAINTS["dataset"], name):
                raise ConfigError(f"config.{key}: the dataset name {name!r} cannot be a path component of the results "
                                  f"tree (it must match {WILDCARD_CONSTRAINTS['dataset']}: no '/' or '.'): rename it")
    for name, model in config["models"].items():
        needed = {"hub": "id", "local": "path"}.get(model["source"])
        if needed and needed not in model:
            raise ConfigError(f"config.models.{name}: source {model['source']!r} needs key {needed!r}")
        if model["source"] == "tiny":
            tiny = model["tiny"]
            head_dim, rest = divmod(tiny["hidden_size"], tiny["num_heads"])
            if rest or head_dim not in (32, 64):
                raise ConfigError(
                    f"config.models.{name}.tiny: hidden_size / num_heads = {tiny['hidden_size'] / tiny['num_heads']:g}"
                    " must be 32 or 64 (head sizes vLLM's CPU attention supports)")
    for stage, limits in config["resources"].items():
        for key, cap in (("mem_mb", "max_mem_mb"), ("runtime", "max_runtime")):
            if limits[cap] < limits[key]:
                raise ConfigError(f"config.resources.{stage}.{cap}: {limits[cap]} is below {key} = {limits[key]}")
        for key in ("nodes", "cpu_ranks"):  # the other stages' rules run one process on one node
            if stage != "train" and limits[key] != 1:
                raise ConfigError(f"config.resources.{stage}.{key}: {limits[key]}; only training jobs run on several "
                                  f"nodes or CPU ranks (resources.train.{key})")
        if limits["cpu_ranks"] > 1 and limits["gpus"]:
            raise ConfigError(f"config.resources.{stage}.cpu_ranks: {limits['cpu_ranks']} with gpus = "
                              f"{limits['gpus']}; CPU ranks are for jobs without GPUs (gpus: 0)")
    train = config["train"]
    if train["keep_every"] % train["checkpoint_every"]:
        raise ConfigError(f"config.train.keep_every: {train['keep_every']} is not a multiple of "
                          f"train.checkpoint_every = {train['checkpoint_every']}")
    rows = train["prompts_per_step"] * train["group_size"]
    if rows % train["mini_batches"]:
        raise ConfigError(f"config.train.mini_batches: {train['mini_batches']} does not divide a rollout batch's "
                          f"{rows} completions (train.prompts_per_step x train.group_size) into equal mini-batches")
    check_tracker_names("config.train", train)
    for name, algorithm in config["algorithms"].items():
        check_algorithm_names(f"config.algorithms.{name}", algorithm, train)
    for name, dataset in config["datasets"].items():
        check_dataset_names(f"config.datasets.{name}", dataset)
    evaluate = config["evaluate"]
    if max(evaluate["pass_k"], default=0) > evaluate["k"]:
        raise ConfigError(f"config.evaluate.pass_k: {evaluate['pass_k']} asks for more than "
                          f"k = {evaluate['k']} samples")


def _bound(name_key: str, params_key: str | None, bind: Callable[[], Any]) -> Any:
    """`bind()`, with a registry's unknown name reported at `name_key` and a bad parameter at `params_key`."""
    from kalmanrl.core.registry import ParameterError, UnknownNameError

    try:
        return bind()
    except UnknownNameError as err:
        raise ConfigError(f"{name_key}: {err}") from None
    except (ParameterError, ValueError, TypeError) as err:
        raise ConfigError(f"{params_key or name_key}: {err}") from None


def check_algorithm_names(where: str, algorithm: dict, train: dict) -> None:
    """Bind an algorithm's estimator, ratio transform, surrogate and aggregate by name with their parameters, and try
    the estimator and the transform on a zero batch of the run's group size, so a bad name or value fails at
    validation (naming its key) instead of at the first training step. Needs torch, nothing else."""
    import torch

    from kalmanrl.rl import algorithms, correction

    estimator = _bound(f"{where}.advantage", f"{where}.advantage_params",
                       lambda: algorithms.get_advantage_estimator(algorithm["advantage"],
                                                                  **algorithm["advantage_params"]))
    ratio = _bound(f"{where}.ratio", f"{where}.ratio_params",
                   lambda: algorithms.get_ratio_transform(algorithm["ratio"], **algorithm["ratio_params"]))
    _bound(f"{where}.surrogate", None, lambda: algorithms.SURROGATES.get(algorithm["surrogate"]))
    _bound(f"{where}.aggregate", None, lambda: algorithms.AGGREGATES.get(algorithm["aggregate"]))
    rewards, tokens = torch.zeros(1, train["group_size"], dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    _bound(f"{where}.advantage", f"{where}.advantage_params", lambda: estimator(rewards))
    _bound(f"{where}.ratio", f"{where}.ratio_params", lambda: ratio(tokens, tokens, torch.ones_like(tokens)))
    buffer = algorithm["overlong_buffer"]["length"]
    if buffer >= train["max_tokens"]:
        raise ConfigError(f"{where}.overlong_buffer.length: {buffer} must be below train.max_tokens = "
                          f"{train['max_tokens']} (the penalty covers the last `length` tokens)")
    fix = algorithm["rollout_correction"]
    bound = _bound(f"{where}.rollout_correction.name", f"{where}.rollout_correction.params",
                   lambda: correction.get_rollout_correction(fix["name"], **fix["params"]))
    _bound(f"{where}.rollout_correction.name", f"{where}.rollout_correction.params",
           lambda: bound.apply(tokens, tokens, torch.ones_like(tokens)))
    _bound(where, None, lambda: algorithms.check_algorithm(algorithm, train["ppo_epochs"] * train["mini_batches"]))


def check_tracker_names(where: str, train: dict) -> None:
    """Refuse a `loggers` entry no tracker is registered under (kalmanrl.runtime.trackers), naming its index; the
    packages a tracker needs are checked when the job starts it, on the machine that runs it."""
    from kalmanrl.runtime.trackers import TRACKERS

    for index, name in enumerate(train["loggers"]):
        _bound(f"{where}.loggers[{index}]", None, functools.partial(TRACKERS.get, name))


def check_dataset_names(where: str, dataset: dict) -> None:
    """Check a dataset's loader (its parameters' names and types too), template and reward names and parameters
    against their registries, without loading data or starting reward worker processes (a reward is built, which
    starts none, and closed)."""
    from kalmanrl.data.loaders import check_loader_params
    from kalmanrl.data.prompts import TEMPLATES
    from kalmanrl.data.rewards import get_reward

    _bound(f"{where}.loader", f"{where}.params", lambda: check_loader_params(dataset["loader"], dataset["params"]))
    _bound(f"{where}.template", None, lambda: TEMPLATES.get(dataset["template"]))
    _bound(f"{where}.reward", f"{where}.reward_params",
           lambda: get_reward(dataset["reward"], **dataset["reward_params"]).close())


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated within one mapping is an error: plain YAML keeps the last one,
    so a second `train:` section would silently drop the first."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict = {}
    for key_node, _ in node.value:
        # A `<<` merge may be overridden by the mapping's own keys: those are not repeats.
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node, deep=deep)
            if key in first:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line "
                                                        f"{first[key] + 1})", key_node.start_mark)
            first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_text(path: str | Path, label: str, what: str) -> str:
    """A config or settings file's text; one that cannot be read, or is not UTF-8, is a ConfigError naming `label`
    (and the offending byte), not a traceback."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{label}: cannot read the {what} ({err.strerror})") from None
    except UnicodeDecodeError as err:
        from kalmanrl.core.io import not_utf8

        raise ConfigError(f"{label}: {not_utf8(err)}") from None


def read_config_file(path: str | Path) -> dict:
    """A YAML config file's mapping, unvalidated; a missing file, a YAML error or a key repeated within a mapping
    (named by file:line:column) or a top level that is not a mapping is a ConfigError."""
    text = _read_text(path, str(path), "config file")
    try:
        config = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values, not a {type(config).__name__}")
    return config or {}


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it (`load_configs` of one file)."""
    return load_configs([path], [])


def load_configs(paths: list[str | Path], overrides: list[str]) -> dict:
    """Merge config files in order (later keys win, nested mappings merged, as Snakemake's --configfile), then
    KEY=VALUE overrides (a dotted key reaches into sections: train.micro_batch_tokens=8192), then validate."""
    merged: dict = {}
    for path in paths:
        _merge(merged, read_config_file(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--config {item!r}: expected KEY=VALUE")
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(merged, nested)
    return validate_config(merged)


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def config_hash(value: Any) -> str:
    """A short stable hash of any JSON-serialisable value (settings, configs) for provenance."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def validation_benchmarks(config: dict) -> list[str]:
    """The datasets a training job validates on (train.validation.benchmarks, else the config's benchmarks); none
    when validation is off."""
    validation = config["train"]["validation"]
    return list(validation["benchmarks"] or config["benchmarks"]) if validation["every"] else []


def stage_settings(config: dict, stage: str, **wildcards: Any) -> dict:
    """Everything one stage needs from the config, and nothing else: the rule passes it as a Snakemake param, so a
    change reruns exactly the jobs it affects. Evaluation takes an optional `step` (an intermediate checkpoint)."""
    datasets = config["datasets"]
    plugins = {"plugins": config["plugins"]} if config.get("plugins") else {}  # the job imports them first
    if stage == "data":
        name = wildcards["dataset"]
        # Not `decontaminate`: the decontaminate rule reads it, and toggling it must not rebuild every dataset.
        data = {key: value for key, value in config["data"].items() if key != "decontaminate"}
        return {"name": name, "dataset": datasets[name], "data": data, **plugins}
    # Only training reads a model's LoRA adapters (the model stage builds the base, evaluation loads merged weights):
    # toggling them reruns only the training jobs and what depends on them.
    base_model = {k: v for k, v in config["models"].get(wildcards.get("model"), {}).items() if k != "lora"}
    if stage == "model":
        model = base_model
        return {"model": model, **({"templates": sorted({datasets[t]["template"] for t in config["tasks"]})}
                                   if model["source"] == "tiny" else {}), **plugins}
    if stage == "sft":
        task = datasets[wildcards["task"]]
        return {"sft": config["sft"], "template": task["template"],
                "chat_template_kwargs": task["chat_template_kwargs"], "add_special_tokens": task["add_special_tokens"],
                "seed": config["data"]["seed"], "dtype": config["models"][wildcards["model"]]["dtype"], **plugins}
    ident = {k: wildcards[k] for k in ("model", "task", "algorithm", "benchmark") if k in wildcards}
    if "seed" in wildcards:
        ident["seed"] = int(wildcards["seed"])
    if stage == "train":
        validation = config["train"]["validation"]
        # Only a validating job gets the benchmarks and the evaluate section's sampling: others do not rerun when
        # those change.
        validating = {"validation": {"datasets": {name: datasets[name] for name in validation_benchmarks(config)},
                                     "sampling": {key: config["evaluate"][key]
                                                  for key in ("temperature", "top_p", "max_tokens")}}
                      } if validation["every"] else {}
        return {"train": config["train"], "model": config["models"][wildcards["model"]],
                "algorithm": config["algorithms"][wildcards["algorithm"]],
                "rollout": config["rollout"], "task": datasets[wildcards["task"]], "ident": ident, **validating,
                **plugins}
    if stage == "evaluate":
        final = 0 if ident["algorithm"] == "sft" else config["train"]["steps"]
        ident["step"] = int(wildcards.get("step") or final)
        return {"evaluate": config["evaluate"], "rollout": config["rollout"],
                "model": base_model, "benchmark": datasets[wildcards["benchmark"]],
                "ident": ident, **plugins}
    if stage == "report":
        return {"report": config["report"]}
    raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGE_SETTINGS_PARTS)})")


@dataclass(frozen=True)
class Part:
    """One top-level part of a stage job's settings: the schema definition it is validated against and completed
    from (None: checked by the job that reads it), and whether a job can run without it."""

    schema: str | None = None
    required: bool = True


_PLUGINS = Part("plugins", required=False)  # the job imports them first

# Each stage's settings, part by part: what `stage_settings` gives its jobs (a test holds it to this table), the
# report rule's "reproduce" (the config files and merged config its page prints), and what `parse_settings` accepts
# and demands, so that a misspelt or missing part fails naming it. `--help` documents the schema definitions.
STAGE_SETTINGS_PARTS: dict[str, dict[str, Part]] = {
    "data": {"name": Part(), "dataset": Part("dataset"), "data": Part("data"), "plugins": _PLUGINS},
    "model": {"model": Part("model"), "templates": Part(required=False), "plugins": _PLUGINS},  # templates: tiny
    "sft": {"sft": Part("sft"), "template": Part(), "chat_template_kwargs": Part(), "add_special_tokens": Part(),
            "seed": Part(), "dtype": Part(), "plugins": _PLUGINS},
    "train": {"train": Part("train"), "model": Part("model"), "algorithm": Part("algorithm"),
              "rollout": Part("rollout"), "task": Part("dataset"), "ident": Part(),
              "validation": Part(required=False), "plugins": _PLUGINS},
    "evaluate": {"evaluate": Part("evaluate"), "rollout": Part("rollout"), "model": Part("model"),
                 "benchmark": Part("dataset"), "ident": Part(), "plugins": _PLUGINS},
    "report": {"report": Part("report"), "reproduce": Part(required=False)},
}


def parse_settings(text: str, stage: str) -> dict:
    """A `stage` job's settings from the command line: JSON, or @path to a JSON/YAML file. Exactly the stage's parts
    (`STAGE_SETTINGS_PARTS`): none unknown, none it needs missing. Each is validated against its schema definition and
    completed with defaults, so a hand-written settings file only states what differs within a part."""
    source = "--settings"
    if text.startswith("@"):
        source = text[1:]
        text = _read_text(source, f"--settings @{source}", "settings file")
    try:
        settings = parse_text(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is neither JSON nor YAML: {err}") from None
    if not isinstance(settings, dict):
        raise ConfigError("--settings must be a mapping")
    parts = STAGE_SETTINGS_PARTS[stage]
    if unknown := [key for key in settings if key not in parts]:
        raise ConfigError(f"{source}: unknown part {', '.join(map(repr, unknown))} of the {stage} stage's settings "
                          f"(known parts: {', '.join(parts)})")
    if missing := [key for key, part in parts.items() if part.required and key not in settings]:
        raise ConfigError(f"{source}: the {stage} stage's settings lack {', '.join(map(repr, missing))} (print "
                          f"complete ones for a config with `kalmanrl settings {stage} ...`)")
    defs = load_schema()["$defs"]
    for key, part in parts.items():
        if part.schema and key in settings:
            check(settings[key], defs[part.schema], key)
            settings[key] = fill_defaults(settings[key], defs[part.schema])
    import_plugins(settings.get("plugins", []), "plugins")
    for key in ("dataset", "task", "benchmark"):
        if key in settings:
            check_dataset_names(key, settings[key])
    if "train" in settings:
        check_tracker_names("train", settings["train"])
    return settings
