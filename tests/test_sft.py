"""Supervised warm start: loss on the completion (and end-of-turn) tokens only, seeded, saved loadable, and it
actually teaches a tiny model the task's answer format."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kalmanrl.configuration.settings import Sft
from kalmanrl.core.layout import METRICS
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import get_template
from kalmanrl.jobs.sft import IGNORE, collate, run_sft, tokenize_examples
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import SamplingConfig, make_engine

SETTINGS = Sft(steps=8, batch_size=8, lr=3e-3, weight_decay=0.0, warmup_steps=2, schedule="cosine", max_length=64,
               max_grad_norm=1.0, log_every=4, precision="auto")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_policy(tiny_model_dir)[1]


def test_only_the_target_and_the_end_of_turn_token_are_labelled(tokenizer):
    template = get_template("answer_tag")
    [(ids, labels)] = tokenize_examples(tokenizer, ["What is 2 + 3?"], ["5"], [None],
                                        template=get_template("answer_tag"), max_length=64)
    prompt = tokenizer(template.render(tokenizer, "What is 2 + 3?"), add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert tokenizer.decode(ids[len(prompt):]) == "<answer>5</answer><|im_end|>"


def test_examples_longer_than_max_length_are_dropped(tokenizer):
    template = get_template("answer_tag")
    [(short, _)] = tokenize_examples(tokenizer, ["1 + 1"], ["2"], [None], template=template, max_length=256)
    examples = tokenize_examples(tokenizer, ["1 + 1", "1 + 1 " * 40], ["2", "40"], [None, None], template=template,
                                 max_length=len(short))
    assert [ids for ids, _ in examples] == [short]


def test_collate_right_pads_and_masks_the_padding_out_of_the_loss():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_no_example_fitting_max_length_is_an_error(tiny_model_dir, arithmetic_parquet, tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / "sft", template=get_template("krpo"),
                settings=replace(SETTINGS, max_length=8), seed=0, dtype="float32")


def test_same_seed_gives_the_same_weights_and_another_seed_others(tiny_model_dir, arithmetic_parquet, tmp_path):
    runs = {name: run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / name, template=get_template("answer_tag"),
                          settings=SETTINGS, seed=seed, dtype="float32")
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert runs["a"] == runs["b"]
    base = load_file(tiny_model_dir / "model.safetensors")
    assert not all(torch.equal(a[k], base[k]) for k in a), "training did not change the weights"


def test_warm_start_teaches_the_answer_format(tiny_model_dir, arithmetic_parquet, tmp_path):
    """About 15 s on 2 cores: the CI-size model learns to answer `<answer>integer</answer>` and stop."""
    settings = replace(SETTINGS, steps=120, batch_size=32, lr=5e-3, warmup_steps=10)
    metrics = run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / "sft", template=get_template("answer_tag"),
                      settings=settings, seed=0, dtype="float32")
    assert metrics["steps"] == 120 and metrics["loss"] < 1.5
    losses = pd.read_parquet(tmp_path / "sft" / "metrics.parquet")  # every step's loss, for the stage fingerprint
    assert list(losses["step"]) == list(range(1, 121)) and losses["loss"].iloc[-10:].mean() < losses["loss"].iloc[0]
    policy, tokenizer = load_policy(tmp_path / "sft")
    policy.eval()
    template = get_template("answer_tag")
    problems = read_dataset(arithmetic_parquet, split="test").column("problem").to_pylist()
    prompts = [tokenizer(template.render(tokenizer, p), add_special_tokens=False)["input_ids"] for p in problems]
    with make_engine("hf", policy=policy, tokenizer=tokenizer, model_dir=tmp_path / "sft") as engine:
        completions = [g[0] for g in engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=32))]
    well_formed = [re.fullmatch(r"<answer>-?\d+</answer>", c.text) is not None and c.finish_reason == "stop"
                   for c in completions]
    assert sum(well_formed) >= 0.8 * len(completions), [c.text for c in completions]


def test_no_steps_links_the_base_model_instead_of_copying_it(tiny_model_dir, arithmetic_parquet, tmp_path):
    """`sft.steps: 0` (the paper configs): the warm start is the base model's files, not a float32 re-save of them;
    Snakemake's marker of the base directory output is not shared."""
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    (base_dir / ".snakemake_timestamp").touch()
    metrics = run_sft(base_dir, tmp_path / "not-read.parquet", tmp_path / "sft", template=get_template("answer_tag"),
                      settings=replace(SETTINGS, steps=0), seed=0, dtype="bfloat16")
    assert metrics["steps"] == 0
    base = sorted(p.name for p in tiny_model_dir.iterdir())
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == base
    for name in base:
        assert (tmp_path / "sft" / name).samefile(base_dir / name), name
    assert load_policy(tmp_path / "sft")[0].config.model_type == "qwen2"


def test_the_warm_start_is_saved_in_the_models_dtype(tiny_model_dir, arithmetic_parquet, tmp_path):
    run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / "sft", template=get_template("answer_tag"),
            settings=replace(SETTINGS, steps=2), seed=0, dtype="bfloat16")
    weights = load_file(tmp_path / "sft" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    base = load_file(tiny_model_dir / "model.safetensors")
    assert sum(t.numel() * t.element_size() for t in weights.values()) * 2 == \
        sum(t.numel() * t.element_size() for t in base.values())
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sft_precision_reaches_the_warm_start(tiny_model_dir, arithmetic_parquet, tmp_path):
    """sft.precision as train.precision: auto is float32 on the CPU (the same run bit for bit); autocast_bf16 and
    bfloat16 train with bf16 products or weights (other, finite losses); the model is saved in its dtype."""
    losses = {}
    for name in ("auto", "float32", "autocast_bf16", "bfloat16"):
        run_sft(tiny_model_dir, arithmetic_parquet, tmp_path / name, template=get_template("answer_tag"),
                settings=replace(SETTINGS, steps=3, precision=name), seed=0, dtype="float32")
        losses[name] = pd.read_parquet(tmp_path / name / METRICS)["loss"].tolist()
        assert {t.dtype for t in load_file(tmp_path / name / "model.safetensors").values()} == {torch.float32}
    assert losses["auto"] == losses["float32"]
    for name in ("autocast_bf16", "bfloat16"):
        assert losses[name] != losses["float32"] and all(math.isfinite(v) for v in losses[name]), name

