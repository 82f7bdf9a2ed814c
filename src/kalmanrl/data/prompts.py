"""Prompt templates per dataset family, rendered through the tokenizer's own chat template.

A template fixes what must agree with each other and with the reward: the system prompt, how a problem becomes the
user turn, the answer format of a correct completion (`target`, used by the supervised warm start), the extra
arguments the chat template is rendered with (`enable_thinking: false` for Qwen3, as the KPO authors run it), and
whether the rendered text is tokenised with the tokenizer's special tokens added (`PromptTemplate.encode`, the one place
a prompt becomes token ids).

Rendering never reads the clock: chat templates that write today's date (Llama-3.2's calls `strftime_now`) get a
fixed date, so a prompt is the same on every day (a resumed run or a later evaluation is the same experiment).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

from kalmanrl.core.registry import Registry

# The DeepSeek-R1-Zero system prompt exactly as the KRPO authors' train.py sends it (billhhh/KRPO_LLMs_RL, inherited
# from open-thought/tiny-grpo), line breaks included; the `krpo_arithmetic` reward reads the `<answer>` tag it asks for.
KRPO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think>\n"
    "<answer> answer here </answer>\n"
)

# Qwen2.5-Math's chain-of-thought system prompt (its `qwen25-math-cot` template), the usual prompt of the MATH family.
BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# The KPO authors' training instruction (shuohe1995/verl-kpo, examples/data_preprocess/kpo_math.py:40-41): appended
# with one space to each DAPO problem after the dataset's own boxed instruction is removed. Their reward nevertheless
# reads a `\boxed{}` answer (verl/utils/reward_score/kpo_math_reward.py:68, utils.py:470-473), not the text after
# "####"; this is their recipe as it ran.
KPO_TRAIN_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

# The boxed instruction the DAPO copy the KPO authors train on ends its problems with, removed before theirs is
# appended (kpo_math.py:30-33): optional line breaks (real or the two characters backslash-n) and spaces, then the
# sentence, case-insensitive, at the very end.
_BOXED_INSTRUCTION_SUFFIX = re.compile(
    r"(?:\r?\n|\\n)*\s*let'?s\s+think\s+step\s+by\s+step\s+and\s+output\s+the\s+final\s+answer\s+within\s*"
    r"\\boxed\{\}\.\s*$", re.IGNORECASE)

# The date every clock-reading chat template sees: Llama-3.x templates' own fallback when no clock is available.
FIXED_DATE = datetime(2024, 7, 26)


def _fixed_strftime_now(format: str) -> str:
    return FIXED_DATE.strftime(format)


# Passed to every `apply_chat_template` call: render arguments shadow the template engine's globals, so
# `strftime_now` is this fixed-date function, and `date_string` (what Llama-3.x templates look for first) is set.
FIXED_CLOCK: Mapping[str, Any] = MappingProxyType(
    {"strftime_now": _fixed_strftime_now, "date_string": FIXED_DATE.strftime("%d %b %Y")})


def strip_boxed_instruction(problem: str) -> str:
    """The problem without a trailing "Let's think step by step and output the final answer within \\boxed{}."."""
    return _BOXED_INSTRUCTION_SUFFIX.sub("", problem)


def _bare(problem: str) -> str:
    return problem


def _kpo_train_user(problem: str) -> str:
    """The KPO authors' training user turn: the problem, one space, their "####" instruction."""
    return f"{strip_boxed_instruction(problem)} {KPO_TRAIN_INSTRUCTION}"


@dataclass(frozen=True)
class PromptTemplate:
    """A system prompt, the user turn, the answer format a correct completion follows, and chat-template arguments.

    `format_target(answer, solution)` builds the assistant text of a supervised example; `user(problem)` the user
    turn (default: the problem verbatim); `chat_kwargs` are extra `apply_chat_template` arguments (e.g.
    `enable_thinking: False`), which a dataset's `chat_template_kwargs` extend or override. `add_special_tokens`
    (a dataset's) tokenises the rendered text with the tokenizer's special tokens added: off, the chat template's own
    begin-of-text is the only one; on, Llama-3.x prompts begin with a second, as the KRPO authors' code runs them.
    """

    name: str
    system: str
    format_target: Callable[[str, str | None], str]
    user: Callable[[str], str] = _bare
    chat_kwargs: Mapping[str, Any] = field(default_factory=dict)
    add_special_tokens: bool = False

    def messages(self, problem: str) -> list[dict[str, str]]:
        """The chat messages of one prompt (system, when there is one, then the user turn)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.user(problem)}]

    def render(self, tokenizer: Any, problem: str) -> str:
        """The prompt text the policy continues: the tokenizer's chat template with the generation prompt added,
        rendered with this template's chat arguments and a fixed clock (`FIXED_CLOCK`)."""
        return tokenizer.apply_chat_template(self.messages(problem), tokenize=False, add_generation_prompt=True,
                                             **{**FIXED_CLOCK, **self.chat_kwargs})

    def encode(self, tokenizer: Any, problem: str) -> list[int]:
        """The token ids of the rendered prompt, for every stage that samples or trains on it (RL, evaluation, the
        warm start), so that they all see the same ids."""
        return tokenizer(self.render(tokenizer, problem), add_special_tokens=self.add_special_tokens)["input_ids"]

    def target(self, answer: str, solution: str | None = None) -> str:
        """The assistant completion of a correct answer in this template's format (the SFT target)."""
        return self.format_target(answer, solution)


def _think_answer_target(answer: str, solution: str | None) -> str:
    """`<think>` reasoning (the solution, or nothing: tiny models learn the format first) then `<answer>`; the answer
    is bare inside its tag because the KRPO reward gives full credit only to an exact string match."""
    reasoning = (solution or "").strip()
    return f"<think>{reasoning}</think>\n<answer>{answer}</answer>"


def _boxed_target(answer: str, solution: str | None) -> str:
    """The worked solution as is when it already boxes its answer (MATH, whose gold is its last box); otherwise the
    solution (GSM8K's, or none) followed by a final boxed line."""
    reasoning = (solution or "").strip()
    if "\\boxed" in reasoning or "\\fbox" in reasoning:
        return reasoning
    final = f"The final answer is $\\boxed{{{answer}}}$."
    return f"{reasoning}\n\n{final}" if reasoning else final


def _answer_target(answer: str, solution: str | None) -> str:
    """Just the tagged answer: what a tiny CPU model can learn in minutes."""
    return f"<answer>{answer}</answer>"


TEMPLATES: Registry[PromptTemplate] = Registry("prompt template")


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Make `template` available to configs (a dataset's `template`) under its name."""
    return TEMPLATES.register(template.name, template)


register_template(PromptTemplate("krpo", KRPO_SYSTEM_PROMPT, _think_answer_target))
# The KRPO answer format without the system prompt: for tiny models on a laptop, where a 100-token system prompt
# would be most of every sequence. The krpo_arithmetic reward scores it exactly as it scores `krpo`.
register_template(PromptTemplate("answer_tag", "", _answer_target))
register_template(PromptTemplate("boxed", BOXED_SYSTEM_PROMPT, _boxed_target))
# The KPO authors' prompts (shuohe1995/verl-kpo): a user turn only, Qwen3's thinking off
# (examples/kpo_trainer/kpo_qwen3_4b.sh:131, `+data.apply_chat_template_kwargs.enable_thinking=False`).
# Training: the problem plus their "####" instruction (kpo_math.py:34-55); evaluation: the bare problem
# (kpo_math.py:69-87). Their reward reads the last box, so the SFT target is the boxed one.
register_template(PromptTemplate("kpo_train", "", _boxed_target, _kpo_train_user, {"enable_thinking": False}))
register_template(PromptTemplate("kpo_eval", "", _boxed_target, _bare, {"enable_thinking": False}))


def get_template(name: str, chat_template_kwargs: Mapping[str, Any] | None = None, *,
                 add_special_tokens: bool = False) -> PromptTemplate:
    """The registered template called `name` with a dataset's prompt settings: its chat arguments extended (or
    overridden) by `chat_template_kwargs`, and `add_special_tokens`; unknown names fail listing the known ones."""
    template = TEMPLATES.get(name)
    return replace(template, chat_kwargs={**template.chat_kwargs, **(chat_template_kwargs or {})},
                   add_special_tokens=add_special_tokens)
