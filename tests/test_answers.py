"""Gold answers (kalmanrl.data.answers) on hand-written inputs: GSM8K's text after the last `####`, numeric fields as
integer text, MATH's empty last box, level and subject labels. The loaders' tests check the same rules on the real
files (when KALMANRL_DATA_DIR names them); these pin each rule's edge cases without the data."""

import re

import pytest

from kalmanrl.data.answers import gsm8k_answer, last_box_is_empty, math_level, math_subject, number_text, require_gold
from kalmanrl.data.dataset import DataError


def test_gsm8k_gold_is_the_text_after_the_last_hashes():
    """A worked answer that writes `####` twice has its gold after the second, as the loader's solution is the
    text before it: the two split the answer at the same place."""
    assert gsm8k_answer("one #### 12 then #### 1,234") == "1234"
    assert gsm8k_answer("no marker 42") is None


@pytest.mark.parametrize("value, text", [(27.0, "27"), ("025", "25"), (" 7 ", "7"), ("-05", "-5"), ("+7", "7"),
                                         ("3.5", "3.5"), (2.5, "2.5"), ("-0", "0"), ("000", "0"),
                                         ("00" + "9" * 5000, "9" * 5000)])
def test_number_text_drops_zero_padding_signs_included(value, text):
    """Signed integer text is read as an integer (int("-05") is -5), so a padded negative gold is not kept padded."""
    assert number_text(value) == text


@pytest.mark.parametrize("solution, empty", [("so \\boxed{}.", True), ("so \\boxed{ }.", True),
                                             ("so \\boxed {}.", True), ("\\boxed{1} then \\boxed{}", True),
                                             ("\\boxed{} then \\boxed{2}", False), ("\\boxed{ 0 }", False)])
def test_an_empty_last_box_is_empty_whatever_its_spacing(solution, empty):
    """Only the last box counts, and a box holding nothing but spaces is as empty as `\\boxed{}` (last_boxed reads
    neither as an answer, so such a solution is skipped rather than failing as a missing gold)."""
    assert last_box_is_empty(solution) is empty


@pytest.mark.parametrize("value, level", [("Level 3", 3), (2, 2), ("5", 5), ("Level ?", None)])
def test_math_level_reads_labels_and_bare_numbers(value, level):
    """MATH's hub rows label levels "Level 3"; MATH-500's copy stores the bare integer (its first row: 2)."""
    assert math_level(value, "test.jsonl:1") == level


@pytest.mark.parametrize("value, message", [([3], "is not text or an integer: [3]"),
                                            (3.0, "is not text or an integer: 3.0"),
                                            (True, "is not text or an integer: True"),
                                            ("Level " + "9" * 5000, "has more digits than int() reads")])
def test_a_level_that_is_not_text_or_an_integer_fails_naming_the_row(value, message):
    """str() of a list or a float matched no label, so such a level was read as none without a word; a label of
    more digits than int() reads raised its ValueError naming no row."""
    with pytest.raises(DataError, match=re.escape(f"test.jsonl:1: field 'level' {message}")):
        math_level(value, "test.jsonl:1")


@pytest.mark.parametrize("gold", [None, ""])
def test_a_missing_or_empty_gold_fails_naming_the_row_and_rule(gold):
    """An empty gold (e.g. GSM8K text ending in "####") would score every answer wrong: the row fails instead."""
    with pytest.raises(DataError, match=r"train.jsonl:3: no gold answer \(answer rule 'gsm8k'\)"):
        require_gold(gold, "gsm8k", "train.jsonl:3")
    assert require_gold("0", "gsm8k", "train.jsonl:3") == "0"


@pytest.mark.parametrize("name", ["counting_and_probability", "Counting & Probability", "counting & probability",
                                  "Probability", "probability"])
def test_math_subject_accepts_config_names_subject_names_and_the_krpo_papers_label(name):
    """The KRPO paper calls the subject "Probability"; the hub config name and the subject label work too."""
    assert math_subject(name) == "Counting & Probability"
