"""Verifiable rewards: score completions against gold answers, safely and within a hard time limit.

`get_reward(name, **params)` returns a `RewardFunction`; `reward_fn(completions, golds)` gives one float per
completion and `reward_fn.judge(completions, golds)` one `Verdict` (reward, correct, extracted answer, and the limit
the completion hit, if any) per completion; `limit_hits(verdicts)` counts the completions that hit a limit.

Every reward works in two stages. `screen` runs in this process and must be linear-time string work: it extracts the
answer, applies the length limit and settles the cheap cases (exact match, literal numbers). Whatever it cannot settle
becomes a check that runs in a persistent pool of worker processes (`kalmanrl.runtime.workers`): each check gets
`timeout_s` of wall time, after which its worker is killed and replaced. Only a completion that hits a limit (time,
memory, recursion, answer length, or its worker dying on it) scores 0, marked with the limit; workers that cannot start,
or a check that fails for any other reason, raise. Completion text is never evaluated: the only parser it reaches is
math-verify's (ANTLR LaTeX grammar, and sympy's `parse_expr` on strings its regex restricts to digits, `.` and
arithmetic operators), and that runs inside the sandboxed workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from kalmanrl.core.registry import Registry
from kalmanrl.runtime.workers import LimitHit, WorkerPool

__all__ = ["Verdict", "RewardFunction", "register_reward", "get_reward", "list_rewards", "limit_hits", "last_boxed"]


@dataclass(frozen=True)
class Verdict:
    """The score of one completion: `reward` (what the trainer optimises, format bonus included), `correct`
    (the answer is right, whatever its format), `extracted` (the answer string the completion was judged on, the
    unit of maj@k voting; None when the completion holds no answer, or when its several boxes hit a limit before
    math-verify read them) and `limit`: None, or the limit the completion hit instead of being judged ("time",
    "memory", "recursion", "crash" or "length"; it then scores 0)."""

    reward: float
    correct: bool
    extracted: str | None
    limit: str | None = None


def limit_hits(verdicts: Iterable[Verdict]) -> int:
    """How many of `verdicts` scored 0 because their completion hit a limit rather than being judged."""
    return sum(v.limit is not None for v in verdicts)


@dataclass(frozen=True)
class Check:
    """A verification `screen` could not settle: `args` for the reward's worker-side `check`, plus what is already
    known about the completion."""

    args: tuple[str, ...]
    extracted: str | None
    formatted: bool


REWARDS: Registry[type[RewardFunction]] = Registry("reward")


def register_reward(name: str) -> Callable[[type[RewardFunction]], type[RewardFunction]]:
    """Class decorator: make a `RewardFunction` subclass available to `get_reward` under `name`."""
    return REWARDS.register(name)


def list_rewards() -> list[str]:
    return REWARDS.names()


def get_reward(name: str, **params) -> RewardFunction:
    """The reward registered as `name`, built with `params` (see each reward's docstring); unknown parameters
    fail naming the known ones. No worker process starts before the first completion that needs one."""
    return REWARDS.bind(name, params)


class RewardFunction:
    """Base of all rewards. Subclasses implement `screen` and, if it can return a `Check`, a module-level `check`
    function (run in the workers) returning `(correct, extracted)`.

    Args:
        timeout_s: hard wall-time limit of one worker-side verification; past it the completion scores 0.
        max_chars: longest answer handed to the parser; longer answers score 0 without being parsed.
        num_workers: worker processes (default: the CPUs this process may use). They are started on the first
            check that needs them, sleep between calls, and are shut down by `close()` or at interpreter exit.
        max_memory_mb: address-space limit of each worker, so one huge expression cannot exhaust the machine.
        format_weight: bonus added to the reward of a completion in the required format (0, the papers' setting,
            turns it off; a negative value makes it a penalty for well-formatted output, which is rarely wanted).
    """

    check: Callable[..., tuple[bool, str | None]] | None = None
    preload: tuple[str, ...] = ()  # modules the workers import once, before their first check
    warmup: tuple[str, ...] | None = None  # arguments of a `check` each worker runs before it takes completions

    def __init__(self, *, timeout_s: float = 3.0, max_chars: int = 1000, num_workers: int | None = None,
                 max_memory_mb: int = 2048, format_weight: float = 0.0):
        if timeout_s <= 0 or max_chars <= 0 or max_memory_mb <= 0:
            raise ValueError("timeout_s, max_chars and max_memory_mb must be positive")
        num_workers = len(os.sched_getaffinity(0)) if num_workers is None else num_workers
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (got {num_workers}): checks only run in worker processes")
        self.timeout_s, self.max_chars, self.format_weight = timeout_s, max_chars, format_weight
        self._pool = (WorkerPool(type(self).check, num_workers, timeout_s, max_memory_mb, preload=self.preload,
                                warmup=self.warmup)
                      if self.check else None)

    def screen(self, completion: str, gold: str) -> Verdict | Check:
        """Settle the verdict here (linear-time string work only) or return the `Check` the workers must run."""
        raise NotImplementedError

    def judge(self, completions: list[str], golds: list[str]) -> list[Verdict]:
        """One `Verdict` per completion, in order. completions, golds: [N]."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        screened = [self.screen(_clean(c), _clean(g)) for c, g in zip(completions, golds, strict=True)]
        pending = [i for i, s in enumerate(screened) if isinstance(s, Check)]
        outcomes = self._pool.run([screened[i].args for i in pending]) if pending else []
        for i, outcome in zip(pending, outcomes, strict=True):
            check = screened[i]
            if isinstance(outcome, LimitHit):
                screened[i] = Verdict(0.0, False, check.extracted, outcome.limit)
            else:
                correct, extracted = outcome
                screened[i] = self.verdict(correct, check.extracted or extracted, check.formatted)
        return screened

    def __call__(self, completions: list[str], golds: list[str]) -> list[float]:
        """One reward per completion, in order. completions, golds: [N]."""
        return [v.reward for v in self.judge(completions, golds)]

    def verdict(self, correct: bool, extracted: str | None, formatted: bool) -> Verdict:
        """The binary reward (1 right / 0 wrong) plus the format bonus."""
        return Verdict(float(correct) + self.format_weight * formatted, correct, extracted)

    def close(self) -> None:
        """Stop the worker processes (also done at interpreter exit); the reward restarts them if called again."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clean(text: str) -> str:
    """Replace what is not valid UTF-8 (lone surrogates, e.g. from decoding with surrogateescape) by '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# math_verify: the MATH family, AIME, AMC, GSM8K


_SPACE = re.compile(r"\s+|\\[,;:! ]|\\(?:left|right)(?![a-zA-Z])")
_FRAC_ALIASES = re.compile(r"\\[dt]frac")
_EXACT_NUMBER = re.compile(r"(-?)(?:\\frac\{(\d{1,30})\}\{(\d{1,30})\}|(\d{1,30})/(\d{1,30})|(\d{1,30}))")
_DECIMAL = re.compile(r"-?(?:\d{1,30}\.\d{0,30}|\.\d{1,30})")
_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed")  # gold already in math mode: an unescaped $ or a box
_SPACED_BOX = re.compile(r"\\boxed +(?=\{)")  # `\boxed {x}`, which last_boxed reads and math-verify does not


def last_boxed(text: str, *, strict: bool = False) -> str | None:
    r"""The content of the last box in `text` (braces balanced, stripped); None when there is none, or the last one
    is not closed (a truncated completion) or empty. The one box reader of the package: gold answers of MATH-style
    solutions and the answers of completions. Linear in len(text), as MATH's `last_boxed_only_string` is.

    Default: the last `\boxed` or `\fbox`, whichever comes later; `\boxed{x}` and `\boxed {x}` give x, the space
    form `\boxed 5` gives the text up to the next `$` (MATH's solutions use it). strict=True: only `\boxed{...}`
    counts, `\fbox` and the space forms give None, as the KPO authors' `extract_answer` reads a completion
    (shuohe1995/verl-kpo, verl/utils/reward_score/utils.py:378-420: `remove_boxed` requires the text `\boxed{`).
    """
    boxed = text.rfind("\\boxed")
    fbox = -1 if strict else text.rfind("\\fbox")
    start = max(boxed, fbox)
    if start < 0:
        return None
    i = start + len("\\boxed" if start == boxed else "\\fbox")
    if not strict:
        spaced = i
        while spaced < len(text) and text[spaced] == " ":
            spaced += 1
        if spaced > i and spaced < len(text) and text[spaced] != "{":
            return text[spaced:].split("$", 1)[0].strip() or None  # the space form
        i = spaced
    if i == len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip() or None
    return None


def _normalise(answer: str) -> str:
    r"""Spacing removed and \dfrac/\tfrac spelled \frac: forms that are equal as written."""
    return _FRAC_ALIASES.sub(r"\\frac", _SPACE.sub("", answer))


def _number(answer: str) -> tuple[Fraction, bool] | None:
    """The value of a literal number (integer, a/b, \\frac{a}{b}, decimal) and whether it is exact (not a decimal,
    which math-verify compares after rounding); None for anything else. Built from regex groups, never evaluated."""
    if (m := _EXACT_NUMBER.fullmatch(answer)) is not None:
        sign, *parts = m.groups()
        num, den = next((a, b) for a, b in ((parts[0], parts[1]), (parts[2], parts[3]), (parts[4], "1")) if a)
        if int(den) == 0:
            return None
        return Fraction(int(num), int(den)) * (-1 if sign else 1), True
    if _DECIMAL.fullmatch(answer):
        return Fraction(answer), False
    return None


def _quick_verdict(gold: str, answer: str) -> bool | None:
    """Correctness when it is certain without parsing: equal as written, or both literal numbers (unequal decimals
    are left to math-verify, whose float comparison rounds); None when math-verify must decide."""
    gold, answer = _normalise(gold), _normalise(answer)
    if gold == answer:
        return True
    g, a = _number(gold), _number(answer)
    if g is None or a is None:
        return None
    if g[0] == a[0]:
        return True
    return False if g[1] and a[1] else None


def _limits_raised(fn: Callable, *args, **kwargs):
    """`fn(..., raise_on_error=False)`, math-verify's own result, except that a MemoryError or RecursionError (which
    math-verify would turn into "no answer" / "not equal") reaches the worker pool and is counted as a limit hit.
    Other errors are math-verify's to handle, so they are rerun its way (the same answer as before, twice the cost
    only on that rare path)."""
    try:
        return fn(*args, **kwargs, raise_on_error=True)
    except (MemoryError, RecursionError):
        raise
    except Exception:
        return fn(*args, **kwargs, raise_on_error=False)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    from math_verify import parse

    wrapped = gold if _DELIMITED.search(gold) else f"\\boxed{{{gold}}}"
    return _limits_raised(parse, wrapped, parsing_timeout=None)


def math_verify_check(gold: str, answer: str) -> tuple[bool, str | None]:
    """math-verify's parse of both sides and `verify(gold, answer)` (it is asymmetric: gold first), with its
    signal-based timeouts off (the worker pool enforces the limit). Runs in a worker process."""
    from math_verify import parse, verify

    parsed = _limits_raised(parse, answer, parsing_timeout=None)
    extracted = next((p for p in parsed if isinstance(p, str)), None)
    return _limits_raised(verify, _parse_gold(gold), parsed, timeout_seconds=None), extracted


@register_reward("math_verify")
class MathVerify(RewardFunction):
    r"""1 if the completion's answer equals the gold under math-verify (huggingface/Math-Verify), else 0.

    The answer is the content of the last `\boxed{}` (the MATH convention); when the last `max_chars` characters
    hold several boxes, math-verify sees all of them (it reads `\boxed{1} and \boxed{2}` as one answer, "1,2", the
    extracted answer then; `\boxed {x}` is handed to it as `\boxed{x}`, the only form it reads). A completion
    without a box is handed to math-verify's own extraction (final-answer phrases, LaTeX environments, plain
    numbers) on its last `max_chars` characters, which covers GSM8K-style endings; one whose last box is left open
    (cut off at max_tokens) or empty has no answer and scores 0. Golds are parsed as `\boxed{gold}` unless they hold
    an unescaped `$` or `\boxed`. Answers equal up to spacing and \dfrac/\tfrac, or literal numbers (integers,
    fractions, decimals) with the same value, are settled without parsing. The format bonus goes to completions
    with a closed `\boxed{}`.

    The KPO authors' reward (shuohe1995/verl-kpo, verl/utils/reward_score/kpo_math_reward.py:56-70) is
    `after_think=True, require_box=True`: after_think reads the answer from the text after the first `</think>`
    (up to a second one, as their `split("</think>")[1]`), or the whole completion when there is none;
    require_box scores 0 when that text has no `\boxed{...}` (read strictly, see `last_boxed`) instead of falling
    back to math-verify's other extractions, and judges only the box.
    """

    check = staticmethod(math_verify_check)
    preload = ("math_verify",)
    warmup = ("x+1", r"\boxed{1+x}")  # loads the LaTeX grammar and sympy's paths (0.5 s) outside any time limit

    def __init__(self, *, after_think: bool = False, require_box: bool = False, **params):
        super().__init__(**params)
        self.after_think, self.require_box = after_think, require_box

    def screen(self, completion: str, gold: str) -> Verdict | Check:
        if self.after_think and "</think>" in completion:
            completion = completion.split("</think>", 2)[1]
        window = completion[-self.max_chars:]
        answer = last_boxed(completion, strict=self.require_box)
        if answer is None:
            # A last box left open (a truncated completion) or empty is no answer, as MATH's and verl's readers of
            # the last box hold: math-verify's fallback would credit an earlier box the completion went past.
            if self.require_box or "\\boxed" in completion or "\\fbox" in completion:
                return Verdict(0.0, False, None)
            return Check((gold, window), None, False)
        if len(answer) > self.max_chars:
            return Verdict(0.0, False, answer[:self.max_chars], "length")
        if (correct := _quick_verdict(gold, answer)) is not None:
            return self.verdict(correct, answer, True)
        # One box: parse it alone (half the cost of the window). Several boxes in the window: math-verify joins
        # "\boxed{1} and \boxed{2}" into one answer, so it gets the window (not when only the box may count), and
        # its reading of them ("1,2"), not the last box, is what maj@k votes for.
        if window.count("\\boxed") > 1 and not self.require_box:
            return Check((gold, _SPACED_BOX.sub(r"\\boxed", window)), None, True)
        return Check((gold, f"\\boxed{{{answer}}}"), answer, True)


# ---------------------------------------------------------------------------------------------------------------
# krpo_arithmetic: the KRPO authors' reward (billhhh/KRPO_LLMs_RL, train.py, after open-thought/tiny-grpo)


@register_reward("krpo_arithmetic")
class KrpoArithmetic(RewardFunction):
    """The KRPO authors' arithmetic reward, on the first `<answer>...</answer>` of the completion: none -> 0;
    equal to the gold -> 1.0; gold a substring of it -> 0.5; otherwise 0.01.

    As in the authors' code the comparison is on the raw tag content, so `<answer> 42 </answer>` earns 0.5 (the
    gold is a substring); `strip=True` strips both sides first. `correct` is always the stripped comparison.
    `partial_credit` replaces the 0.5: with single-digit answers the substring credit pays a hedge such as `-10` for
    the gold `1`, which a small policy learns instead of the answer (0 turns it off).
    The format bonus goes to completions with `<think>...</think>` before the answer tags. Only string search and
    comparison happen here, linear in the completion length, so no worker process is ever started.
    """

    def __init__(self, *, strip: bool = False, partial_credit: float = 0.5, **params):
        super().__init__(**params)
        self.strip, self.partial_credit = strip, partial_credit

    def screen(self, completion: str, gold: str) -> Verdict:
        answer = _between(completion, "<answer>", "</answer>")
        if answer is None:
            return Verdict(0.0, False, None)
        formatted = _between(completion[:completion.find("<answer>")], "<think>", "</think>") is not None
        candidate, target = (answer.strip(), gold.strip()) if self.strip else (answer, gold)
        reward = 1.0 if candidate == target else self.partial_credit if target in candidate else 0.01
        return Verdict(reward + self.format_weight * formatted, answer.strip() == gold.strip(), answer.strip())


def _between(text: str, opening: str, closing: str) -> str | None:
    """The text between the first `opening` and the first `closing` after it, as `re.search(f"{opening}(.*?)
    {closing}", text, re.DOTALL)` finds it, but in linear time."""
    start = text.find(opening)
    if start < 0:
        return None
    end = text.find(closing, start + len(opening))
    return None if end < 0 else text[start + len(opening):end]
