"""What train and evaluate share: the device, prompt encoding and the engine made from the `rollout` settings."""

from __future__ import annotations

from kalmanrl.configuration.config import validate_config
from kalmanrl.configuration.settings import resolve_rollout
from kalmanrl.data.prompts import get_template
from kalmanrl.jobs.stage import encode_prompts, engine_from_settings
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.rollout import HFEngine


def test_prompts_are_the_rendered_template_without_added_special_tokens(tiny_model_dir):
    _, tokenizer = load_policy(tiny_model_dir)
    template = get_template("krpo")
    ids = encode_prompts(tokenizer, template, ["1 + 2", "3 * 4"])
    assert [tokenizer.decode(x) for x in ids] == [template.render(tokenizer, p) for p in ("1 + 2", "3 * 4")]
    assert ids[0] == tokenizer(template.render(tokenizer, "1 + 2"), add_special_tokens=False)["input_ids"]


def test_the_engine_follows_the_rollout_settings(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir)
    rollout = resolve_rollout(validate_config({})["rollout"], vllm_installed=False)
    with engine_from_settings(rollout, policy=policy, tokenizer=tokenizer, model_dir=tiny_model_dir) as engine:
        assert isinstance(engine, HFEngine)
