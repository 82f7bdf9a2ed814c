"""Prompt templates per dataset family, rendered through the tokenizer's own chat template.

A template fixes three things that must agree with each other and with the reward: the system prompt, how a problem
becomes the user turn, and the answer format of a correct completion (`target`, used by the supervised warm start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class PromptTemplate:
    """A system prompt plus the answer format a correct completion follows.

    `format_target(answer, solution)` builds the assistant text of a supervised example.
    """

    name: str
    system: str
    format_target: Callable[[str, str | None], str]

    def messages(self, problem: str) -> list[dict[str, str]]:
        """The chat messages of one prompt (system, when there is one, then the problem as the user turn)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": problem}]

    def render(self, tokenizer: Any, problem: str) -> str:
        """The prompt text the policy continues: the tokenizer's chat template with the generation prompt added."""
        return tokenizer.apply_chat_template(self.messages(problem), tokenize=False, add_generation_prompt=True)

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


TEMPLATES: dict[str, PromptTemplate] = {
    "krpo": PromptTemplate("krpo", KRPO_SYSTEM_PROMPT, _think_answer_target),
    # The KRPO answer format without the system prompt: for tiny models on a laptop, where a 100-token system prompt
    # would be most of every sequence. The krpo_arithmetic reward scores it exactly as it scores `krpo`.
    "answer_tag": PromptTemplate("answer_tag", "", _answer_target),
    "boxed": PromptTemplate("boxed", BOXED_SYSTEM_PROMPT, _boxed_target),
}


def get_template(name: str) -> PromptTemplate:
    """The registered template called `name`; unknown names fail listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None
