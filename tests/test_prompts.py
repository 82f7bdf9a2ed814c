"""Prompt templates: the exact system prompts of the papers, rendered by the tokenizer's chat template, and SFT
targets in the answer format the rewards read."""

import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kalmanrl.configuration.config import ConfigError, builtin_datasets, load_config, stage_settings, validate_config
from kalmanrl.configuration.settings import resolve_evaluate, resolve_train
from kalmanrl.data.prompts import get_template
from kalmanrl.data.rewards import last_boxed
from kalmanrl.jobs.sft import tokenize_examples
from kalmanrl.jobs.stage import encode_prompts

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=CHATML)


def test_krpo_system_prompt_is_the_authors_deepseek_r1_zero_text():
    system = get_template("krpo").system
    assert system.startswith("A conversation between User and Assistant. The user asks a question, and the "
                             "Assistant solves it.\nThe assistant first thinks")
    assert system.endswith("i.e., <think> reasoning process here </think>\n<answer> answer here </answer>\n")


def test_boxed_system_prompt_asks_for_a_boxed_answer():
    assert get_template("boxed").system == "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize("name", ["krpo", "boxed"])
def test_messages_are_system_then_the_problem_verbatim(name):
    messages = get_template(name).messages("What is 2 + 3?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "What is 2 + 3?"


@pytest.mark.parametrize("name", ["krpo", "boxed"])
def test_render_goes_through_the_chat_template_and_opens_the_assistant_turn(tokenizer, name):
    template = get_template(name)
    text = template.render(tokenizer, "What is 2 + 3?")
    assert text == (f"<|im_start|>system\n{template.system}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("solution", [None, "2 + 3 is 5."])
def test_krpo_target_gets_full_credit_under_the_authors_answer_tag_rule(solution):
    target = get_template("krpo").target("5", solution)
    assert re.search(r"<answer>(.*?)</answer>", target, flags=re.DOTALL).group(1) == "5"
    assert re.fullmatch(r"<think>.*</think>\n<answer>5</answer>", target, flags=re.DOTALL)


@pytest.mark.parametrize("box", ["\\boxed{6}", "\\fbox{6}"])
def test_boxed_target_keeps_a_math_solution_that_boxes_its_answer(box):
    """MATH's gold is its solution's last box, `\\boxed` or the older `\\fbox` (last_boxed reads both): such a
    solution is the target as is, with no second, appended box."""
    solution = f"We have $x = 2 \\cdot 3$, so $x = {box}$."
    assert get_template("boxed").target("6", solution) == solution


@pytest.mark.parametrize("solution", [None, "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips."])
def test_boxed_target_ends_in_the_gold_answer_boxed(solution):
    target = get_template("boxed").target("72", solution)
    assert last_boxed(target) == "72"
    assert solution is None or target.startswith(solution)


def test_unknown_template_fails_listing_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown prompt template 'r1' \(known: answer_tag, boxed, kpo_eval, kpo_train, "
                                      r"krpo\)"):
        get_template("r1")


def test_answer_tag_template_has_no_system_turn_and_scores_like_krpo():
    from kalmanrl.data.rewards import get_reward

    template = get_template("answer_tag")
    assert template.messages("1 + 2") == [{"role": "user", "content": "1 + 2"}]
    with get_reward("krpo_arithmetic") as reward:
        assert reward([template.target("3", None), get_template("krpo").target("3", None)], ["3", "3"]) == [1.0, 1.0]


# ------------------------------------------------------------------------------------------- the papers' prompts

# The generation prompt of Qwen3's chat template (its last lines): thinking off closes an empty think block.
QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
              "{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def qwen3_like() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=QWEN3_LIKE)


def test_kpo_training_prompt_is_the_authors_user_turn_with_thinking_off(qwen3_like):
    # kpo_math.py:40-41 on a DAPO row whose prompt ends in the boxed instruction
    problem = "Find $x$ if $2x = 6$. Let's think step by step and output the final answer within \\boxed{}."
    text = get_template("kpo_train").render(qwen3_like, problem)
    assert text == ("<|im_start|>user\nFind $x$ if $2x = 6$. Let's think step by step and output the final answer "
                    "after \"####\".<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("problem, stripped", [
    ("Q?\\nLet's think step by step and output the final answer within \\boxed{}.", "Q?"),   # backslash-n text
    ("Q?\n\nlets think step by step and output the final answer within\\boxed{}.  ", "Q?"),
    ("Q? Let's think step by step and output the final answer within \\boxed{}. More.",
     "Q? Let's think step by step and output the final answer within \\boxed{}. More."),     # not at the end
    ("Q?", "Q?"),
])
def test_kpo_training_prompt_removes_only_a_trailing_boxed_instruction(problem, stripped):
    assert get_template("kpo_train").messages(problem) == [
        {"role": "user", "content": stripped + ' Let\'s think step by step and output the final answer after "####".'}]


def test_kpo_evaluation_prompt_is_the_bare_problem_with_thinking_off(qwen3_like):
    text = get_template("kpo_eval").render(qwen3_like, "What is $1+1$?")
    assert text == "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_krpo_prompt_is_their_system_prompt_and_the_bare_question(tokenizer):
    # train.py:68-80: system_prompt, then the question (the `question_prefix` line is commented out, train.py:342)
    assert get_template("krpo").messages("12 + 3 * 4") == [
        {"role": "system", "content": get_template("krpo").system}, {"role": "user", "content": "12 + 3 * 4"}]


def test_dataset_chat_arguments_extend_and_override_the_templates(qwen3_like):
    thinking = get_template("kpo_eval", {"enable_thinking": True}).render(qwen3_like, "Q")
    assert thinking == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert get_template("boxed", {"enable_thinking": False}).chat_kwargs == {"enable_thinking": False}
    assert get_template("boxed").chat_kwargs == {}


# A Llama-3.2-style header (its template's date logic) and a template calling strftime_now directly.
CLOCK_TEMPLATES = [
    ("{%- if not date_string is defined %}{%- if strftime_now is defined %}"
     "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
     "{%- endif %}{%- endif %}Today Date: {{ date_string }}\n{{ messages[-1]['content'] }}",
     "Today Date: 26 Jul 2024\nQ"),
    ("Now: {{ strftime_now('%Y-%m-%d') }}\n{{ messages[-1]['content'] }}", "Now: 2024-07-26\nQ"),
]


@pytest.mark.parametrize("chat_template, expected", CLOCK_TEMPLATES)
def test_templates_that_read_the_clock_render_a_fixed_date(chat_template, expected):
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    clocked = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=chat_template)
    # the template really reads the clock when rendered without the fixed one
    unfixed = clocked.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False)
    assert "2024" not in unfixed
    for name in ("krpo", "boxed", "kpo_eval"):
        assert get_template(name).render(clocked, "Q") == expected


# ------------------------------------------------------------------------------- tokenising the rendered prompt

BOS = "<|begin_of_text|>"
# Llama-3.x's chat template opens with the begin-of-text token, and its tokenizer adds one too when asked.
LLAMA3_LIKE = ("{{- bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def llama3_like() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, BOS: 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token=BOS,
                                   chat_template=LLAMA3_LIKE)


def test_add_special_tokens_gives_llama3_prompts_the_krpo_authors_second_begin_of_text(llama3_like):
    bos = llama3_like.bos_token_id
    assert get_template("krpo").render(llama3_like, "1 + 2").startswith(BOS)
    [ours] = encode_prompts(llama3_like, get_template("krpo"), ["1 + 2"])
    [theirs] = encode_prompts(llama3_like, get_template("krpo", add_special_tokens=True), ["1 + 2"])
    assert ours[:2] == [bos, 0] and theirs[:3] == [bos, bos, 0] and theirs[1:] == ours
    # the warm start's prompts are the ones RL and evaluation sample from
    for flag, ids in ((False, ours), (True, theirs)):
        [(example, labels)] = tokenize_examples(llama3_like, ["1 + 2"], ["3"], [None], max_length=1024,
                                                template=get_template("krpo", add_special_tokens=flag))
        assert example[:len(ids)] == ids and labels.count(-100) == len(ids)


def test_add_special_tokens_is_off_by_default_and_reaches_every_stage():
    assert get_template("krpo").add_special_tokens is False
    config = validate_config({"datasets": {"theirs": {"loader": "arithmetic", "template": "krpo",
                                                      "add_special_tokens": True}},
                              "tasks": ["arithmetic_easy", "theirs"], "benchmarks": ["arithmetic_easy", "theirs"]})
    algorithm = next(iter(config["algorithms"]))
    for task, flag in (("arithmetic_easy", False), ("theirs", True)):
        train = stage_settings(config, "train", model="tiny", task=task, algorithm=algorithm, seed="0")
        evaluate = stage_settings(config, "evaluate", model="tiny", task=task, benchmark=task, algorithm="sft")
        assert resolve_train(train, "cpu", vllm_installed=False).add_special_tokens is flag
        assert resolve_evaluate(evaluate, vllm_installed=False).add_special_tokens is flag
        assert stage_settings(config, "sft", model="tiny", task=task)["add_special_tokens"] is flag


def test_add_special_tokens_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"config\.datasets\.theirs\.add_special_tokens: 'sometimes' is not of type "
                                          r"'boolean'"):
        validate_config({"datasets": {"theirs": {"loader": "arithmetic", "add_special_tokens": "sometimes"}}})


def test_the_krpo_grid_tokenises_every_prompt_as_the_authors_code_and_keeps_the_built_in_arithmetic():
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "paper-krpo.yaml")
    defaults = validate_config({})["datasets"]
    for name in {*config["tasks"], *config["benchmarks"]}:
        assert config["datasets"][name]["add_special_tokens"] is True, name
    for name in ("arithmetic_easy", "arithmetic_normal", "arithmetic_hard"):
        assert {**config["datasets"][name], "add_special_tokens": False} == defaults[name], name
    assert not any(spec.get("add_special_tokens") for spec in builtin_datasets().values())
