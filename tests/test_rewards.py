"""Rewards: the KRPO authors' arithmetic reward exactly, math-verify's equivalence on the answer forms MATH-style
benchmarks use, and a verifier that stays safe and bounded on hostile completions: nothing executes, every
verification returns within its time limit, and the worker processes are replaced, reused and shut down cleanly."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalmanrl.data.rewards import (
    Verdict,
    _limits_raised,
    get_reward,
    last_boxed,
    limit_hits,
    list_rewards,
    register_reward,
)
from kalmanrl.reporting.metrics import majority_correct
from kalmanrl.runtime.workers import CheckError, LimitHit, WorkerPool, WorkerStartError

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def math_reward():
    """Started before it is used, so timing tests measure checks, not the workers' start-up."""
    with get_reward("math_verify", timeout_s=TIMEOUT_S, num_workers=2) as reward:
        assert reward([r"\boxed{x+1}"] * 2, ["1+x"] * 2) == [1.0, 1.0]
        yield reward


@pytest.fixture(scope="module")
def patient_reward():
    """For accuracy checks: a limit no legitimate verification reaches even on a loaded CI machine, so a verdict is
    never a timeout's 0."""
    with get_reward("math_verify", timeout_s=30.0, num_workers=2) as reward:
        yield reward


# ---------------------------------------------------------------------------------------------------------------
# registry


def test_unknown_reward_fails_listing_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown reward 'exact_match' \(known: (\w+, )*krpo_arithmetic, math_verify"):
        get_reward("exact_match")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math_verify")(object)
    assert {"krpo_arithmetic", "math_verify"} <= set(list_rewards())


def test_reward_call_is_the_reward_of_each_verdict_in_order(math_reward):
    completions, golds = [r"\boxed{1}", "no answer", r"\boxed{3}"], ["1", "2", "4"]
    assert math_reward(completions, golds) == [v.reward for v in math_reward.judge(completions, golds)] == [1, 0, 0]


def test_mismatched_lengths_fail(math_reward):
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        math_reward(["a", "b"], ["1"])


def test_at_least_one_worker_is_required():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        get_reward("math_verify", num_workers=0)


# ---------------------------------------------------------------------------------------------------------------
# krpo_arithmetic: billhhh/KRPO_LLMs_RL train.py


@pytest.mark.parametrize("completion, reward, correct", [
    ("<think>5+7=12</think> <answer>12</answer>", 1.0, True),     # exact match
    ("<answer>12 apples</answer>", 0.5, False),                    # gold is a substring
    ("<answer>112</answer>", 0.5, False),                          # ... even of a wrong number
    ("<answer> 12 </answer>", 0.5, True),                          # the authors compare the raw tag content
    ("<answer>13</answer>", 0.01, False),                          # tags but wrong
    ("<answer></answer>", 0.01, False),
    ("The answer is 12.", 0.0, False),                             # no tags
    ("<answer>12", 0.0, False),                                    # unclosed tag
    ("<answer>13</answer><answer>12</answer>", 0.01, False),       # the first tag counts
    ("<answer>\n12\n</answer>", 0.5, True),                        # DOTALL: newlines inside the tag
])
def test_krpo_reward_is_the_authors(completion, reward, correct):
    (verdict,) = get_reward("krpo_arithmetic").judge([completion], ["12"])
    assert (verdict.reward, verdict.correct) == (reward, correct)


def test_krpo_strip_option_compares_stripped_answers():
    reward = get_reward("krpo_arithmetic", strip=True)
    assert reward(["<answer> 12 </answer>", "<answer> 13 </answer>"], ["12", "12"]) == [1.0, 0.01]


def test_krpo_partial_credit_option_replaces_the_substring_reward():
    completions, golds = ["<answer>-10</answer>", "<answer>1</answer>", "<answer>7</answer>"], ["1"] * 3
    assert get_reward("krpo_arithmetic")(completions, golds) == [0.5, 1.0, 0.01]
    assert get_reward("krpo_arithmetic", partial_credit=0.0)(completions, golds) == [0.0, 1.0, 0.01]


def test_krpo_extracted_is_the_stripped_tag_content():
    verdicts = get_reward("krpo_arithmetic").judge(["<answer> -3 </answer>", "none"], ["-3", "-3"])
    assert [v.extracted for v in verdicts] == ["-3", None]


def test_krpo_format_bonus_needs_think_before_answer():
    reward = get_reward("krpo_arithmetic", format_weight=0.1)
    rewards = reward(["<think>a</think><answer>1</answer>", "<answer>1</answer><think>a</think>",
                      "<think>a</think><answer>2</answer>", "<think>a</think>"], ["1"] * 4)
    assert rewards == pytest.approx([1.1, 1.0, 0.11, 0.0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<answer>", "</answer>", "<", ">", "/", "answer", "12", "1", "2", " ", "\n"]),
                max_size=12).map("".join))
def test_krpo_extraction_equals_the_authors_regex(completion):
    match = re.search(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    answer = match.group(1) if match else None
    expected = 0.0 if answer is None else 1.0 if answer == "12" else 0.5 if "12" in answer else 0.01
    assert get_reward("krpo_arithmetic")([completion], ["12"]) == [expected]


def test_krpo_never_starts_worker_processes():
    reward = get_reward("krpo_arithmetic", num_workers=2)
    reward(["<answer>1</answer>"] * 100, ["1"] * 100)
    assert reward._pool is None


# ---------------------------------------------------------------------------------------------------------------
# math_verify: where the answer is, and which forms are equal

CASES = [
    # integers and plain numbers
    ("42", r"\boxed{42}", True),
    ("42", r"\boxed{43}", False),
    ("-7", r"\boxed{-7}", True),
    ("7", r"\boxed{-7}", False),
    ("1000", r"\boxed{1,000}", True),
    ("5", r"\boxed{5.0}", True),
    ("25", r"\boxed{025}", True),
    ("1500", r"\boxed{1.5 \times 10^3}", True),
    ("0.25", r"\boxed{\frac14}", True),
    ("3.14", r"\boxed{3.14159}", False),
    # fractions
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}", True),
    (r"\frac{1}{2}", r"\boxed{\tfrac12}", True),
    (r"\frac{1}{2}", r"\boxed{1/2}", True),
    (r"\frac{1}{2}", r"\boxed{0.5}", True),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}", True),
    (r"\frac{1}{3}", r"\boxed{0.33}", False),
    (r"\frac{3}{4}", r"\boxed{\frac{4}{3}}", False),
    (r"-\frac{2}{3}", r"\boxed{\frac{-2}{3}}", True),
    (r"-\frac{1}{2}", r"\boxed{-0.5}", True),
    (r"\frac{9}{4}", r"\boxed{2.25}", True),
    (r"\frac{14}{3}", r"\boxed{4\frac{2}{3}}", True),
    # square roots
    (r"\sqrt{2}", r"\boxed{\sqrt2}", True),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", True),
    (r"2\sqrt{3}", r"\boxed{\sqrt{12}}", True),
    (r"\sqrt{3}", r"\boxed{3^{1/2}}", True),
    (r"3\sqrt{2}", r"\boxed{\sqrt{18}}", True),
    (r"\sqrt{2}", r"\boxed{\sqrt{3}}", False),
    # pi and expressions
    (r"2\pi", r"\boxed{2\pi}", True),
    (r"\frac{\pi}{4}", r"\boxed{\pi/4}", True),
    (r"18+2\pi", r"\boxed{2\pi+18}", True),
    (r"x^2+2x+1", r"\boxed{(x+1)^2}", True),
    (r"x^2-1", r"\boxed{(x-1)(x+1)}", True),
    (r"2x+3", r"\boxed{2x-3}", False),
    (r"y=2x+3", r"\boxed{y = 2x+3}", True),
    ("5", r"\boxed{k=5}", True),
    (r"\infty", r"\boxed{\infty}", True),
    # intervals
    (r"(-\infty, 3]", r"\boxed{(-\infty,3]}", True),
    (r"(-\infty, 3]", r"\boxed{(-\infty, 3)}", False),
    (r"[2, 5)", r"\boxed{[2,5)}", True),
    (r"(-\infty,-2)\cup(2,\infty)", r"\boxed{(-\infty,-2) \cup (2,\infty)}", True),
    (r"(1, 2)", r"\boxed{[1,2]}", False),
    # sets and lists of solutions
    (r"\{1, 2, 3\}", r"\boxed{\{3, 2, 1\}}", True),
    ("1, 2, 3", r"\boxed{3, 1, 2}", True),
    (r"\{1, 2\}", r"\boxed{\{1, 3\}}", False),
    ("-2, 1", r"\boxed{1, -2}", True),
    # tuples and matrices
    (r"(3, \frac{\pi}{2})", r"\boxed{\left(3, \frac{\pi}{2}\right)}", True),
    ("(1, 2)", r"\boxed{(2, 1)}", False),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix}2\\1\end{pmatrix}}", False),
    # degrees
    (r"30^\circ", r"\boxed{30}", True),
    ("30", r"\boxed{30^\circ}", True),
    (r"45^\circ", r"\boxed{45^{\circ}}", True),
    (r"45^\circ", r"\boxed{54^\circ}", False),
    # percentages
    (r"50\%", r"\boxed{50}", True),
    ("50", r"\boxed{50\%}", True),
    (r"12.5\%", r"\boxed{12.5\%}", True),
    (r"20\%", r"\boxed{25\%}", False),
    # units and currency
    ("10", r"\boxed{10 \text{ cm}}", True),
    (r"5 \text{ inches}", r"\boxed{5}", True),
    (r"\$18.90", r"\boxed{18.90}", True),
    ("18.90", r"\boxed{\$18.9}", True),
    ("6", r"\boxed{6\text{ square units}}", True),
    ("10", r"\boxed{12 \text{ cm}}", False),
    # text answers
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", True),
    (r"\text{Evelyn}", r"\boxed{\text{Ann}}", False),
    (r"\text{(C)}", r"\boxed{\text{(C)}}", True),
    (r"\text{(C)}", r"\boxed{C}", True),
    (r"\text{even}", r"\boxed{\text{odd}}", False),
    # complex numbers
    ("1+2i", r"\boxed{2i+1}", True),
    ("3-4i", r"\boxed{3+4i}", False),
    # where the answer is: the last box, or math-verify's own extraction when there is none
    ("42", r"First \boxed{41}. Wait, no: it is \boxed{42}.", True),
    ("42", r"\boxed{42}, or rather \boxed{41}.", False),
    ("42", "So the final answer is 42.", True),
    ("42", r"Thus the answer is $\frac{84}{2}$.", True),
    ("72", "She sold 48 + 24 = 72 clips.\n#### 72", True),
    ("42", "I do not know.", False),
    ("42", r"\boxed{42}. Let me check again: \boxed{", False),  # the last box is cut off: no answer
    ("42", r"\boxed{42}, so \boxed{}", False),                   # the last box is empty: no answer
    # a gold already in math mode (an unescaped $) is parsed as written, not wrapped in a box, which would hide it
    (r"The answer is $\frac{1}{2}$ dollars", r"\boxed{1/2}", True),
]


@pytest.mark.parametrize("gold, completion, expected", CASES)
def test_math_verify_accepts_equivalent_forms_and_rejects_others(patient_reward, gold, completion, expected):
    (verdict,) = patient_reward.judge(["Let me think step by step. " + completion], [gold])
    assert (verdict.correct, verdict.reward, verdict.limit) == (expected, float(expected), None), verdict


def test_math_verify_agrees_with_math_verify_regression_cases(patient_reward, shared_data):
    """Math-Verify's own test tables (254 cases, each test with its own settings; math-verify's defaults agree
    with 248). Our gold wrapping and default settings must agree with at least 95%."""
    rows = [json.loads(line) for line in (shared_data / "math_verify_cases" / "cases.jsonl").open()]
    verdicts = patient_reward.judge([r["pred"] for r in rows], [r["gold"] for r in rows])
    agreement = sum(v.correct == bool(r["expected"]) for v, r in zip(verdicts, rows, strict=True)) / len(rows)
    print(f"agreement with Math-Verify's regression cases: {agreement:.1%} of {len(rows)}")
    assert agreement >= 0.95


@pytest.mark.parametrize("gold, answer", [
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),   # spacing and \left \right
    (r"\frac{1}{2}", r"\tfrac{1}{2}"), (r"\frac{1}{2}", r"\dfrac{1}{2}"),
    ("0.5", "1/2"), ("-7", r"-\frac{14}{2}"), ("2", "2.0")])
def test_answers_equal_as_written_or_as_literal_numbers_are_settled_without_a_worker(gold, answer):
    """The documented fast path: such answers never wait for (or time out in) a worker, so a loaded machine cannot
    score them 0."""
    with get_reward("math_verify", num_workers=1) as reward:
        assert reward.screen(rf"so \boxed{{{answer}}}", gold) == Verdict(1.0, True, answer)


@pytest.mark.parametrize("gold, completion, correct", [
    ("0.3333333", r"\boxed{0.333333333}", True),      # math-verify compares floats rounded to 6 places
    (r"\frac{1}{3}", r"\boxed{0.333333333}", True),
    (r"\frac{1}{3}", r"\boxed{0.3333}", False),
    ("7", r"\boxed{-7}", False)])
def test_literal_numbers_of_unequal_value_are_left_to_math_verify_when_a_decimal_rounds(patient_reward, gold,
                                                                                         completion, correct):
    """Two exact numbers of different value are wrong at once; a decimal against another number is math-verify's
    call (its float comparison rounds), so the fast path never contradicts it (its own verify gives these verdicts)."""
    (verdict,) = patient_reward.judge([completion], [gold])
    assert verdict.correct is correct


def test_extracted_is_the_last_box_or_math_verify_extraction(math_reward):
    verdicts = math_reward.judge([r"so \boxed{ \dfrac{1}{2} }.", "The final answer is 7.", "nothing"], ["1", "7", "1"])
    assert [v.extracted for v in verdicts] == [r"\dfrac{1}{2}", "7", None]


def test_extracted_is_the_box_as_written_when_a_worker_judged_it(math_reward):
    """A box the worker judges keeps its content as the extracted answer (math-verify itself would give "10"), as
    a box settled in-process does."""
    (verdict,) = math_reward.judge([r"so \boxed{10 \text{ cm}}"], ["10"])
    assert (verdict.correct, verdict.extracted) == (True, r"10 \text{ cm}")


def test_several_boxes_vote_as_the_one_answer_math_verify_judged(math_reward):
    r"""maj@k votes on what was judged: `\boxed{1} and \boxed{2}` is judged as the one answer {1, 2}, so it must not
    vote with a wrong `\boxed{2}` (both voted "2", and that wrong majority counted as correct)."""
    completions = [r"The roots are \boxed{1} and \boxed{2}.", r"The root is \boxed{2}.", r"The root is \boxed{2}."]
    verdicts = math_reward.judge(completions, ["1, 2"] * 3)
    assert [(v.correct, v.extracted) for v in verdicts] == [(True, "1,2"), (False, "2"), (False, "2")]
    assert not majority_correct([v.extracted for v in verdicts], [v.correct for v in verdicts])
    # Far apart, the later box revises the answer: math-verify reads it alone.
    (revised,) = math_reward.judge([r"\boxed{1}. Let me check it once more very slowly. So \boxed{1+x}."], ["x+1"])
    assert (revised.correct, revised.extracted) == (True, "1+x")


@pytest.mark.parametrize("unspaced, gold, correct, extracted", [
    (r"The roots are \boxed{1} and \boxed{2}.", "1, 2", True, "1,2"),
    (r"The roots are \boxed{1} and \boxed{3}.", "1, 2", False, "1,3"),
    (r"So \boxed{1} and \boxed{x+1}.", "1+x", False, "1,x+1"),   # two answers, not the last box alone
])
def test_spaced_boxes_are_judged_as_their_unspaced_twins(patient_reward, unspaced, gold, correct, extracted):
    r"""`\boxed {x}` is a box (`last_boxed` reads it), so several boxes judged together reach math-verify as
    `\boxed{x}`, the only form it reads: it extracted nothing from `\boxed {1} and \boxed {2}` (scored 0), and only
    the unspaced box from `\boxed {1} and \boxed{2}`."""
    spaced = unspaced.replace(r"\boxed{", r"\boxed {")
    mixed = unspaced.replace(r"\boxed{", r"\boxed  {", 1)
    verdicts = patient_reward.judge([unspaced, spaced, mixed], [gold] * 3)
    assert [(v.correct, v.reward, v.extracted) for v in verdicts] == [(correct, float(correct), extracted)] * 3


def test_only_the_spaced_brace_form_is_respelled_for_math_verify():
    r"""The space form `\boxed 3` (MATH's solutions) and a box after a line break, which `last_boxed` does not read,
    reach math-verify as written."""
    with get_reward("math_verify", num_workers=1) as reward:
        check = reward.screen("\\boxed\n{0}, \\boxed {1}, \\boxed  {2} or \\boxed 3", "x")
    assert check.args == ("x", "\\boxed\n{0}, \\boxed{1}, \\boxed{2} or \\boxed 3")


def test_math_format_bonus_rewards_a_box_and_leaves_correct_alone():
    with get_reward("math_verify", format_weight=0.2, num_workers=1) as reward:
        verdicts = reward.judge([r"\boxed{3}", r"\boxed{4}", "The final answer is 3."], ["3", "3", "3"])
    assert [v.reward for v in verdicts] == pytest.approx([1.2, 0.2, 1.0])
    assert [v.correct for v in verdicts] == [True, False, True]


@pytest.mark.parametrize("text, boxed", [
    (r"a \boxed{1} b \boxed{\frac{1}{2}} c", r"\frac{1}{2}"),
    (r"\boxed {x}", "x"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{1} then \boxed{2", None),   # the last box is cut off: no answer, as in MATH's last_boxed_only_string
    ("no box", None),
    (r"old style \fbox{12}.", "12"),
    (r"\boxed{1} then \fbox{2}", "2"),    # the later of \boxed and \fbox
    (r"space form $\boxed 5$", "5"),
    (r"\boxed{}", None),
])
def test_last_boxed_balances_braces(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("text, boxed", [
    (r"a \boxed{1} b \boxed{\frac{1}{2}} c", r"\frac{1}{2}"),
    (r"\boxed {x}", None),                 # their remove_boxed needs the text \boxed{
    (r"space form $\boxed 5$", None),
    (r"\fbox{12}", None),
    (r"\boxed{1} then \fbox{2}", "1"),    # \fbox is never read
    (r"\boxed{1} then \boxed{2", None),
])
def test_strict_last_boxed_reads_only_boxed_brace_as_the_kpo_authors_do(text, boxed):
    assert last_boxed(text, strict=True) == boxed


def test_data_and_rewards_share_one_box_reader():
    from kalmanrl.data import answers, loaders, rewards
    assert loaders.last_boxed is rewards.last_boxed and answers.ANSWER_RULES["boxed"] is rewards.last_boxed


@pytest.mark.parametrize("completion, gold, authors, default", [
    (r"<think>so \boxed{1}</think> The answer is \boxed{2}.", "2", 1.0, 1.0),
    (r"<think>so \boxed{1}</think> The answer is \boxed{2}.", "1", 0.0, 0.0),
    (r"<think>so \boxed{1}</think> The answer is 2.", "1", 0.0, 1.0),   # default: the think box counts
    (r"<think>long</think> The final answer is 2.", "2", 0.0, 1.0),      # no box: 0, no fallback extraction
    (r"\boxed{2}", "2", 1.0, 1.0),                                       # no </think>: the whole completion
    (r"<think>a</think>\boxed{3}</think>\boxed{4}", "3", 1.0, 0.0),     # split("</think>")[1]
    (r"The answer: \fbox{2}", "2", 0.0, 1.0),
    ("", "2", 0.0, 0.0),
    # theirs judges the last box alone; by default math-verify reads the two boxes as one answer
    (r"The roots are \boxed{1} and \boxed{2}.", "1, 2", 0.0, 1.0),
])
def test_kpo_authors_reward_semantics(completion, gold, authors, default):
    with get_reward("math_verify", after_think=True, require_box=True, num_workers=1) as reward:
        verdict = reward.judge([completion], [gold])[0]
        assert verdict.reward == authors and verdict.correct == bool(authors)
    with get_reward("math_verify", num_workers=1) as reward:
        assert reward([completion], [gold]) == [default]


# ---------------------------------------------------------------------------------------------------------------
# safety and bounds


def _injections(sentinel) -> list[str]:
    cmd = f"__import__('os').system('touch {sentinel}')"
    return [
        cmd,
        f"The final answer is {cmd}",
        rf"\boxed{{{cmd}}}",
        f"${cmd}$",
        rf"\boxed{{\text{{{cmd}}}}}",
        f"Answer: eval(\"{cmd}\")",
        f"exec(compile(\"{cmd}\", 'x', 'exec'))",
        r"\boxed{().__class__.__base__.__subclasses__()}",
        f"answer: 1 + {cmd} = 2",
        rf"\boxed{{\operatorname{{eval}}({cmd})}}",
    ]


def _hostile() -> dict[str, str]:
    return {
        "100k-char expression": r"\boxed{" + "1+" * 50_000 + "1}",
        "100k-char expression, no box": "1+" * 50_000 + "1",
        "near-limit expression": r"\boxed{" + "9^" * 450 + "9}",
        "deeply nested braces": r"\boxed{" + "{" * 450 + "1" + "}" * 450 + "}",
        "deeply nested fractions": r"\boxed{" + r"\frac{1}{" * 60 + "1" + "}" * 60 + "}",
        "huge exponent": r"\boxed{9^{9^{9^9}}}",
        "huge exponent, plain": "The final answer is 9^9^9^9",
        "huge factorial": r"\boxed{(10^{10})!}",
        "invalid UTF-8": b"\\boxed{\xff\xfe\xc3(}".decode("utf-8", "surrogateescape"),
        "lone surrogate": "\\boxed{\ud800 1}",
        "NUL bytes": "\\boxed{\x00\x00}",
    }


def test_text_that_is_not_utf8_becomes_a_question_mark_never_nothing():
    """A byte the tokenizer could not decode (a lone surrogate here) is replaced, not dropped: dropping it would turn
    "4<bad byte>2" into the gold "42"."""
    verdict = get_reward("krpo_arithmetic").judge(["<answer>4\udcff2</answer>"], ["42"])[0]
    assert verdict == Verdict(0.01, False, "4?2")


def test_injected_code_never_runs(math_reward, tmp_path):
    sentinel = tmp_path / "pwned"
    completions = _injections(sentinel)
    verdicts = math_reward.judge(completions, ["2"] * len(completions))
    verdicts += math_reward.judge(["\\boxed{2}"] * len(completions), completions)  # hostile golds too
    krpo = get_reward("krpo_arithmetic").judge([f"<answer>{c}</answer>" for c in completions], ["2"] * len(completions))
    assert not sentinel.exists()
    assert not any(v.correct for v in verdicts + krpo)


@pytest.mark.parametrize("name", list(_hostile()))
def test_hostile_completion_returns_within_the_time_limit(math_reward, name):
    start = time.monotonic()
    (verdict,) = math_reward.judge([_hostile()[name]], ["1"])
    assert time.monotonic() - start < TIMEOUT_S + 2.0  # the limit, plus replacing a killed worker
    assert isinstance(verdict, Verdict) and verdict.reward in (0.0, 1.0)


def test_a_hostile_batch_is_bounded_and_keeps_the_order(math_reward):
    hostile = list(_hostile().values())
    completions = [c for h in hostile for c in (h, r"\boxed{1}")]
    start = time.monotonic()
    rewards = math_reward(completions, ["1"] * len(completions))
    assert time.monotonic() - start < len(hostile) * TIMEOUT_S / 2 + 5.0
    assert rewards[1::2] == [1.0] * len(hostile)


def test_answers_longer_than_max_chars_score_zero_unparsed():
    with get_reward("math_verify", max_chars=8, num_workers=1, format_weight=0.5) as reward:
        verdicts = reward.judge([r"\boxed{123456789}", r"\boxed{12345678}"], ["123456789", "12345678"])
        assert [(v.reward, v.correct, v.limit) for v in verdicts] == [(0.0, False, "length"), (1.5, True, None)]
        assert limit_hits(verdicts) == 1
        assert reward._pool._workers == []  # both settled without a worker


def test_a_timed_out_worker_is_killed_and_replaced():
    pool = WorkerPool(math.factorial, num_workers=1, timeout_s=0.5, max_memory_mb=512)
    try:
        assert pool.run([(5,)]) == [120]
        first = pool._workers[0].process
        start = time.monotonic()
        assert pool.run([(4,), (10**9,), (6,)]) == [24, LimitHit("time"), 720]
        assert time.monotonic() - start < 3.0
        assert not first.is_alive() and pool._workers[0].process.is_alive()
    finally:
        pool.close()


def test_a_crashed_worker_is_replaced():
    pool = WorkerPool(os._exit, num_workers=1, timeout_s=5.0, max_memory_mb=512)
    try:
        assert pool.run([(1,), (1,)]) == [LimitHit("crash"), LimitHit("crash")]
        assert len(pool._workers) == 1 and pool._workers[0].process.is_alive()
    finally:
        pool.close()


def test_workers_persist_across_calls_and_stop_on_close():
    reward = get_reward("math_verify", num_workers=2)
    pids = []
    for _ in range(3):
        assert reward([r"\boxed{x+1}"] * 8, ["1+x"] * 8) == [1.0] * 8
        processes = [w.process for w in reward._pool._workers]
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
        pids.append({p.pid for p in processes})
    assert pids[0] == pids[1] == pids[2]
    reward.close()
    assert all(not p.is_alive() for p in processes) and reward._pool._workers == []
    assert reward([r"\boxed{x+1}"], ["1+x"]) == [1.0]  # restarts on demand
    reward.close()


def test_workers_stop_when_the_reward_is_garbage_collected():
    reward = get_reward("math_verify", num_workers=1)
    reward([r"\boxed{x}"], ["x+0"])
    (process,) = [w.process for w in reward._pool._workers]
    del reward
    gc.collect()
    process.join(5)
    assert not process.is_alive()


# ---------------------------------------------------------------------------------------------------------------
# loud failures: only a limit scores 0, and it is counted


def test_a_timed_out_completion_is_marked_and_counted(math_reward):
    verdicts = math_reward.judge([r"\boxed{9^{9^{9^9}}}", r"\boxed{x+1}", "no answer"], ["1", "1+x", "1"])
    assert [(v.reward, v.limit) for v in verdicts] == [(0.0, "time"), (1.0, None), (0.0, None)]
    assert limit_hits(verdicts) == 1


def test_memory_and_recursion_limits_are_limit_hits():
    pool = WorkerPool(bytearray, num_workers=1, timeout_s=10.0, max_memory_mb=256)
    try:
        assert pool.run([(2**33,), (4,)]) == [LimitHit("memory"), bytearray(4)]
    finally:
        pool.close()
    pool = WorkerPool(json.loads, num_workers=1, timeout_s=10.0, max_memory_mb=512)
    try:
        assert pool.run([("[" * 100_000 + "]" * 100_000,), ("[1]",)]) == [LimitHit("recursion"), [1]]
    finally:
        pool.close()


@pytest.mark.parametrize("error", [MemoryError, RecursionError])
def test_math_verify_limits_reach_the_pool_and_other_errors_are_math_verifys_to_handle(error):
    """math-verify with raise_on_error=False turns a MemoryError or RecursionError into "no answer" / "not equal";
    `_limits_raised` lets them through (the worker pool then marks the limit) and reruns only other errors its way."""
    def parse(text, *, raise_on_error):
        if raise_on_error:
            raise error if text == "limit" else ValueError("a parse error")
        return "math-verify's own result"

    with pytest.raises(error):
        _limits_raised(parse, "limit")
    assert _limits_raised(parse, "other") == "math-verify's own result"


def test_a_check_that_fails_otherwise_raises_naming_it():
    pool = WorkerPool(int, num_workers=1, timeout_s=10.0, max_memory_mb=512)
    try:
        with pytest.raises(CheckError, match=r"(?s)builtins\.int\('twelve',\) raised.*ValueError: invalid literal"):
            pool.run([("12",), ("twelve",)])
    finally:
        pool.close()


def test_a_check_whose_result_cannot_be_sent_back_raises():
    """A result the worker cannot pickle (a plugin check returning a memoryview, a lock, a generator) is a bug in the
    check, not a limit: it killed the worker, so every item scored 0 as a "crash" limit hit."""
    pool = WorkerPool(memoryview, num_workers=1, timeout_s=10.0, max_memory_mb=512)
    try:
        with pytest.raises(CheckError, match=r"(?s)builtins\.memoryview\(b'ab',\) raised.*could not be sent back.*"
                                              r"cannot pickle.*memoryview"):
            pool.run([(b"ab",), (b"cd",)])
    finally:
        pool.close()


def test_a_call_that_raised_leaves_no_results_for_the_next_call():
    """A call that ends early (a CheckError here; a WorkerStartError or Ctrl-C the same) leaves chunks in flight: their
    results must not be read as the next call's (they were, by position: the next call returned stale values)."""
    pool = WorkerPool(int, num_workers=1, timeout_s=10.0, max_memory_mb=512)
    try:
        with pytest.raises(CheckError):
            pool.run([("twelve",), ("2",), ("3",), ("4",), ("5",), ("6",), ("7",), ("8",)])  # chunks of 2
        assert pool.run([("70",), ("80",), ("90",)]) == [70, 80, 90]
    finally:
        pool.close()


SCRIPT = """
from kalmanrl.data.rewards import get_reward

if __name__ == "__main__":  # the workers re-import the main module
    with get_reward("math_verify", num_workers=1) as reward:
        print(reward.judge([r"\\boxed{x^2+1}"], ["1+x^2"]))
"""


def test_workers_that_cannot_start_raise_naming_why(tmp_path):
    """The issue's repro: a script read on standard input. A fresh forkserver/spawn process re-imports the main
    module from '<stdin>', which is not a file, so every worker dies at start; this used to score every completion
    0 without a word (32 of Math-Verify's 254 cases agreed instead of 246)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    with script.open() as stdin:
        piped = subprocess.run([sys.executable, "-"], stdin=stdin, capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
    assert piped.returncode != 0
    assert "WorkerStartError" in piped.stderr and "standard input" in piped.stderr
    assert "Verdict" not in piped.stdout
    from_file = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    assert "reward=1.0" in from_file.stdout


def test_a_worker_that_fails_its_warm_up_or_stays_silent_raises():
    pool = WorkerPool(int, num_workers=1, timeout_s=5.0, max_memory_mb=512, warmup=("x",))
    try:
        with pytest.raises(WorkerStartError, match=r"(?s)failed its warm-up check.*ValueError: invalid literal"):
            pool.run([("1",)])
    finally:
        pool.close()
    pool = WorkerPool(time.sleep, num_workers=1, timeout_s=5.0, max_memory_mb=512, warmup=(30,), start_timeout_s=1.0)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerStartError, match=r"did not report ready within 1 s"):
            pool.run([(0,)])
        assert time.monotonic() - start < 10
    finally:
        pool.close()
