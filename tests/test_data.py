"""Datasets: the arithmetic generator, every loader (local copies and the hub path), gold answers, decontamination,
and the Parquet schema checked on write and read."""

import ast
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalmanrl.core.registry import ParameterError, UnknownNameError
from kalmanrl.data import arithmetic
from kalmanrl.data.dataset import DATASET_SCHEMA, DataError, read_dataset, write_dataset
from kalmanrl.data.loaders import build_dataset, decontaminate, normalize_problem
from kalmanrl.data.rewards import last_boxed

PRESETS = {"easy": [3, 3], "normal": [5, 5], "hard": [6, 6]}
QUESTION = re.compile(r"(?P<pre>Solve |What is )?(?P<expr>.*?)(?P<post>\?| = \?| =)?")


def build(spec: dict, local_dir: Path, *, offline: bool = True, seed: int = 0, exclude=()) -> tuple[pa.Table, dict]:
    """`offline=False` reads the hub (no copy directory), whatever `local_dir` is."""
    return build_dataset(spec, local_dir=local_dir if offline else None, seed=seed, arithmetic_presets=PRESETS,
                         exclude=exclude)


def rows(table: pa.Table, *columns: str) -> list[tuple]:
    return sorted(zip(*(table[c].to_pylist() for c in columns), strict=True))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:limit]]


# ---------------------------------------------------------------------------------------------------------------
# A safe reference parser: Python's own grammar through `ast`, only integer literals, + - * and unary minus.

def safe_value(expression: str) -> int:
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            left, right = value(node.left), value(node.right)
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        raise ValueError(f"node not allowed: {ast.dump(node)}")
    return value(ast.parse(expression.strip(), mode="eval").body)


def expression_of(question: str) -> str:
    return QUESTION.fullmatch(question)["expr"]


@pytest.fixture(scope="module")
def hard_rows() -> dict[str, list[dict]]:
    return arithmetic.generate(3000, 300, max_terms=6, max_digits=6, seed=7)


def test_reference_parser_agrees_with_the_authors_20000_answers(shared_data):
    for row in read_jsonl(shared_data / "arithmetic" / "MathTasks_test.jsonl"):
        assert safe_value(expression_of(row["question"])) == int(row["answer"]), row


def test_generated_answers_are_exact_under_the_reference_parser(hard_rows):
    for row in hard_rows["train"] + hard_rows["test"]:
        assert safe_value(expression_of(row["question"])) == int(row["answer"]), row


def test_generated_rows_have_the_authors_schema_and_ranges(hard_rows):
    generated = hard_rows["train"] + hard_rows["test"]
    assert all(set(row) == {"id", "question", "answer", "num_terms", "num_digits"} for row in generated)
    assert {row["num_terms"] for row in generated} == {2, 3, 4, 5, 6}
    assert {row["num_digits"] for row in generated} == {1, 2, 3, 4, 5, 6}
    for row in generated:
        literals = re.findall(r"\d+", row["question"])
        assert len(literals) == row["num_terms"]
        assert max(map(len, literals)) <= row["num_digits"]
    assert len({row["id"] for row in generated}) == len(generated)


def test_questions_use_the_authors_templates_spacing_and_unary_minus(hard_rows):
    questions = [row["question"] for row in hard_rows["train"]]
    forms = {"{pre}E{post}".format_map({k: v or "" for k, v in QUESTION.fullmatch(q).groupdict().items()})
             for q in questions}
    assert forms == {"Solve E", "What is E?", "E =", "E = ?", "E"}
    assert any("   " in q for q in questions) and any(q.startswith("  ") for q in questions)
    assert any("-(" in q for q in questions) and any(re.search(r"[-+*] -\d", q) for q in questions)


def test_train_and_test_never_share_an_expression(hard_rows):
    def key(row: dict) -> str:
        return re.sub(r"\s+", "", expression_of(row["question"]))
    train = {key(row) for row in hard_rows["train"]}
    assert len(train) == len(hard_rows["train"])
    assert not train & {key(row) for row in hard_rows["test"]}


def test_generator_is_reproducible_from_its_seed():
    first = arithmetic.generate(50, 10, max_terms=4, max_digits=3, seed=3)
    assert first == arithmetic.generate(50, 10, max_terms=4, max_digits=3, seed=3)
    assert first != arithmetic.generate(50, 10, max_terms=4, max_digits=3, seed=4)


def test_asking_for_more_distinct_expressions_than_exist_is_an_error():
    with pytest.raises(ValueError, match="distinct expressions"):
        arithmetic.generate(5000, 0, max_terms=2, max_digits=1, seed=0)


@pytest.mark.parametrize("train_size, test_size", [(-5, 3), (3, -1)])
def test_a_negative_split_size_is_an_error_not_a_reshuffled_split(train_size, test_size):
    with pytest.raises(ValueError, match=rf"train_size and test_size >= 0, got {train_size}, {test_size}"):
        arithmetic.generate(train_size, test_size, max_terms=2, max_digits=1, seed=0)


@pytest.mark.parametrize("max_terms, max_digits", [(2, 100000), (6, 1000)])
def test_limits_whose_answers_python_cannot_write_are_an_error_naming_them(tmp_path, max_terms, max_digits):
    """Past 4300 digits str() of an int raises a ValueError that names no parameter; n literals of d digits make
    answers of up to n * d digits."""
    with pytest.raises(ValueError, match=re.escape(f"max_terms x max_digits <= 4300 (the digits Python writes of an "
                                                   f"integer), got {max_terms} x {max_digits}")):
        build({"loader": "arithmetic", "params": {"max_terms": max_terms, "max_digits": max_digits,
                                                  "train_size": 5, "test_size": 5}}, tmp_path)
    assert arithmetic.generate(5, 5, max_terms=2, max_digits=2150, seed=0)["test"]


def test_difficulty_names_a_config_preset(tmp_path):
    table, stats = build_dataset({"loader": "arithmetic", "params": {"difficulty": "tiny", "train_size": 40,
                                                                    "test_size": 10}},
                                 local_dir=tmp_path, seed=0, arithmetic_presets={"tiny": [2, 1]})
    assert stats["splits"] == {"train": 40, "test": 10}
    assert set(table["num_terms"].to_pylist()) == {2} and set(table["num_digits"].to_pylist()) == {1}
    with pytest.raises(DataError, match="unknown difficulty 'extreme'; known: easy, hard, normal"):
        build({"loader": "arithmetic", "params": {"difficulty": "extreme"}}, tmp_path)


def test_explicit_limits_replace_the_preset(tmp_path):
    table, _ = build({"loader": "arithmetic", "params": {"max_terms": 2, "max_digits": 2, "train_size": 30,
                                                         "test_size": 5}}, tmp_path)
    assert max(table["num_terms"].to_pylist()) == 2 and table["source"].unique().to_pylist() == ["arithmetic"]


# ---------------------------------------------------------------------------------------------------------------
# Local copies (the directory $KALMANRL_DATA_DIR names): their README's row counts, gold answers normalised the way
# the field does.

@pytest.mark.parametrize("loader, params, splits", [
    ("arithmetic_file", {}, {"test": 20000}),
    ("arithmetic_file", {"authors_filter": True}, {"test": 15020}),
    ("math500", {}, {"test": 500}),
    ("aime24", {}, {"test": 30}),
    ("aime25", {}, {"test": 30}),
    ("amc23", {}, {"test": 40}),
    # two MATH train solutions box nothing (`\boxed{}`, train/number_theory); they are skipped with a warning
    ("math", {}, {"train": 7498, "test": 5000}),
    ("gsm8k", {}, {"train": 7473, "test": 1319}),
])
def test_local_copies_load_with_the_documented_row_counts(shared_data, loader, params, splits):
    table, stats = build({"loader": loader, "params": params}, shared_data)
    assert stats["splits"] == splits and table.schema == DATASET_SCHEMA
    assert all(table["answer"].to_pylist()) and all(table["problem"].to_pylist())


def test_aime_answers_are_integers_without_zero_padding(shared_data):
    aime24, _ = build({"loader": "aime24"}, shared_data)
    assert all(re.fullmatch(r"[1-9]\d*|0", a) for a in aime24["answer"].to_pylist())
    assert "25" in aime24["answer"].to_pylist()  # stored as "025" in the file
    aime25, _ = build({"loader": "aime25"}, shared_data)
    assert aime25["answer"].to_pylist()[:3] == ["70", "588", "16"]


def test_amc_float_answers_become_integer_text(shared_data):
    table, _ = build({"loader": "amc23"}, shared_data)
    assert table["answer"].to_pylist()[0] == "27"
    assert not any("." in a for a in table["answer"].to_pylist())


def test_gsm8k_gold_is_after_the_hashes_without_commas(shared_data):
    table, _ = build({"loader": "gsm8k", "params": {"splits": ["train"]}}, shared_data)
    answers, solutions = table["answer"].to_pylist(), table["solution"].to_pylist()
    assert answers[0] == "72" and answers[1342] == "885000"  # train.jsonl line 1343 reads "#### 885,000"
    assert not any("####" in s or "<<" in s for s in solutions)


def test_math_gold_is_the_last_box_of_the_solution_as_in_math500(shared_data):
    for row in read_jsonl(shared_data / "math500" / "test.jsonl"):
        assert last_boxed(row["solution"]) == row["answer"]
    math, _ = build({"loader": "math", "params": {"splits": ["test"]}}, shared_data)
    by_id = dict(zip(math["id"].to_pylist(), math["answer"].to_pylist(), strict=True))
    assert all(by_id[row["unique_id"]] == row["answer"] for row in read_jsonl(shared_data / "math500" / "test.jsonl"))


@pytest.mark.parametrize("text, expected", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("nested \\boxed{\\{1, \\sqrt{2}\\}}", "\\{1, \\sqrt{2}\\}"),
    ("old style \\fbox{12}.", "12"),
    ("space form $\\boxed 5$", "5"),
    ("no box here", None),
    ("unbalanced \\boxed{1 + {2}", None),
])
def test_last_boxed_handles_nesting_fbox_and_missing_boxes(text, expected):
    assert last_boxed(text) == expected


def test_math_filters_by_subject_and_level(shared_data):
    table, _ = build({"loader": "math", "params": {"splits": ["train"], "subjects": ["counting_and_probability"]}},
                     shared_data)
    assert table.num_rows == 771 and set(table["subject"].to_pylist()) == {"Counting & Probability"}
    table, _ = build({"loader": "math", "params": {"splits": ["train"], "levels": [1]}}, shared_data)
    assert table.num_rows == 564 and set(table["level"].to_pylist()) == {1}
    with pytest.raises(DataError, match="unknown MATH subject 'Topology'"):
        build({"loader": "math", "params": {"subjects": ["Topology"]}}, shared_data)


def test_a_filter_that_leaves_nothing_is_an_error_not_an_empty_file(shared_data):
    with pytest.raises(DataError, match="no rows left after filtering"):
        build({"loader": "math", "params": {"levels": [9]}}, shared_data)


def test_a_string_for_a_list_of_splits_fails_naming_the_parameter_not_a_file_per_letter(tmp_path):
    with pytest.raises(ParameterError, match="dataset loader 'math' parameter 'splits' is 'train', not a list of str"):
        build({"loader": "math", "params": {"splits": "train"}}, tmp_path)


def test_unknown_loader_fails_listing_the_known_ones(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown dataset loader 'mmlu' \(known: .*aime24.*openmath"):
        build({"loader": "mmlu"}, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Malformed input fails naming the file and line.

@pytest.mark.parametrize("line, message", [
    ('{"id": "1", "question": "1 + 1", "answer": "2", "num_terms": 2}', "missing field 'num_digits'"),
    ('{"id": "1", "question": "1 + 1", "answer": "two", "num_terms": 2, "num_digits": 1}', "not an integer"),
    ('{"id": "1", "question": "1 + 1", "answer": "2", "num_terms": 2, ', "invalid JSON"),
    ('["1 + 1", "2"]', "expected a JSON object"),
    ('{"id": "1", "question": "1 + 1", "answer": ' + "9" * 5000 + ', "num_terms": 2, "num_digits": 1}',
     r"invalid JSON \(Exceeds the limit \(4300 digits\)"),
    ('{"id": "1", "question": "1 + 1", "answer": "2", "answer": "3", "num_terms": 2, "num_digits": 1}',
     r"invalid JSON \(the key 'answer' is repeated\)"),
])
def test_malformed_row_fails_naming_file_and_line(tmp_path, line, message):
    good = '{"id": "0", "question": "1 + 2", "answer": "3", "num_terms": 2, "num_digits": 1}'
    (tmp_path / "tasks.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'tasks.jsonl'}:2: ") + ".*" + message):
        build({"loader": "arithmetic_file", "params": {"file": "tasks.jsonl"}}, tmp_path)


MATH_ROW = {"unique_id": "test/algebra/1.json", "problem": "P", "level": "Level 3", "type": "Algebra",
            "solution": "so \\boxed{1}"}


def arithmetic_row(**fields) -> dict:
    return {"id": "0", "question": "1 + 2", "answer": "3", "num_terms": 2, "num_digits": 1, **fields}


@pytest.mark.parametrize("spec, file, record, message", [
    ({"loader": "math500"}, "math500/test.jsonl", {"problem": "P", "answer": "1", "level": "Level " + "9" * 23},
     f"field 'level' is {'9' * 23}, outside [0, 2**63 - 1]"),
    ({"loader": "math", "params": {"splits": ["test"]}}, "math/test.jsonl", {**MATH_ROW, "level": "Level " + "9" * 23},
     f"field 'level' is {'9' * 23}, outside [0, 2**63 - 1]"),
    ({"loader": "arithmetic_file", "params": {"file": "t.jsonl"}}, "t.jsonl", arithmetic_row(num_terms=10**30),
     f"field 'num_terms' is {10**30}, outside [1, 2**63 - 1]"),
    ({"loader": "arithmetic_file", "params": {"file": "t.jsonl"}}, "t.jsonl", arithmetic_row(num_terms=-3),
     "field 'num_terms' is -3, outside [1, 2**63 - 1]"),
    ({"loader": "arithmetic_file", "params": {"file": "t.jsonl"}}, "t.jsonl", arithmetic_row(num_digits=0),
     "field 'num_digits' is 0, outside [1, 2**63 - 1]"),
])
def test_an_integer_past_int64_or_a_count_below_one_fails_naming_file_and_line(tmp_path, spec, file, record, message):
    """Arrow refused a value past int64 only when the table was made (an OverflowError naming no row), and a negative
    number of terms was stored as read."""
    path = write_jsonl(tmp_path / file, [record])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: {message}")):
        build(spec, tmp_path)


@pytest.mark.parametrize("spec, file, record, ids", [
    ({"loader": "math", "params": {"splits": ["test"]}}, "math/test.jsonl", {**MATH_ROW, "unique_id": None},
     ["test-0"]),
    ({"loader": "math500"}, "math500/test.jsonl", {"problem": "P", "answer": "1", "unique_id": None, "id": 7}, ["7"]),
    ({"loader": "math500"}, "math500/test.jsonl", {"problem": "P", "answer": "1", "unique_id": None}, ["0"]),
])
def test_a_null_id_falls_back_to_the_loaders_id_from_the_row_position(tmp_path, spec, file, record, ids):
    """One rule for every loader that reads ids: MATH turned a null unique_id into the id "None"."""
    write_jsonl(tmp_path / file, [record])
    assert build(spec, tmp_path)[0]["id"].to_pylist() == ids


@pytest.mark.parametrize("spec, file, record, name, value", [
    ({"loader": "math", "params": {"splits": ["test"]}}, "math/test.jsonl", {**MATH_ROW, "unique_id": {"a": 1}},
     "unique_id", {"a": 1}),
    ({"loader": "math500"}, "math500/test.jsonl", {"problem": "P", "answer": "1", "unique_id": [1]}, "unique_id", [1]),
    ({"loader": "aime24"}, "aime24/test.jsonl", {"problem": "P", "answer": "1", "id": 2.5}, "id", 2.5),
    ({"loader": "arithmetic_file", "params": {"file": "t.jsonl"}}, "t.jsonl", arithmetic_row(id=True), "id", True),
    ({"loader": "hub", "params": {"hub_id": "org/set", "fields": {"id": "k", "problem": "q", "answer": "a"},
                                  "local_files": {"train": "set.jsonl"}}}, "set.jsonl", {"k": 1.5, "q": "P", "a": "1"},
     "k", 1.5),
])
def test_an_id_that_is_not_text_or_an_integer_fails_naming_file_and_line(tmp_path, spec, file, record, name, value):
    """str() of a dict, a list or a float is no id that names a problem (and True is no id either)."""
    path = write_jsonl(tmp_path / file, [record])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field {name!r} is not an id (text or an integer): "
                                                  f"{value!r}")):
        build(spec, tmp_path)


@pytest.mark.parametrize("spec, file, record", [
    ({"loader": "math", "params": {"splits": ["test"]}}, "math/test.jsonl", {**MATH_ROW, "level": [3]}),
    ({"loader": "math500"}, "math500/test.jsonl", {"problem": "P", "answer": "1", "level": [3]}),
])
def test_a_level_that_is_not_text_or_an_integer_fails_naming_file_and_line(tmp_path, spec, file, record):
    """A list level was read as no level (None) without a word."""
    path = write_jsonl(tmp_path / file, [record])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'level' is not text or an integer: [3]")):
        build(spec, tmp_path)


def test_a_benchmark_with_a_null_level_has_none(tmp_path):
    """As a null id: a hub column may be null where a row has no value."""
    write_jsonl(tmp_path / "math500" / "test.jsonl", [{"problem": "P", "answer": "1", "level": None}])
    assert build({"loader": "math500"}, tmp_path)[0]["level"].to_pylist() == [None]


@pytest.mark.parametrize("spec, file, record", [
    ({"loader": "math500"}, "math500/test.jsonl", {"problem": "", "answer": "1"}),
    ({"loader": "math", "params": {"splits": ["test"]}}, "math/test.jsonl", {**MATH_ROW, "problem": " \n "}),
    ({"loader": "gsm8k", "params": {"splits": ["test"]}}, "gsm8k/test.jsonl", {"question": "\t", "answer": "#### 1"}),
    ({"loader": "arithmetic_file", "params": {"file": "t.jsonl"}}, "t.jsonl", arithmetic_row(question=" ")),
    ({"loader": "dapo_filter"}, "dapo_filter/train.jsonl",
     {"prompt": [{"content": "Let's think step by step and output the final answer within \\boxed{}."}],
      "reward_model": {"ground_truth": "1"}}),
    ({"loader": "hub", "params": {"hub_id": "org/set", "fields": {"problem": "q", "answer": "a"},
                                  "local_files": {"train": "set.jsonl"}}}, "set.jsonl", {"q": "  ", "a": "1"}),
])
def test_an_empty_or_blank_problem_fails_naming_file_and_line(tmp_path, spec, file, record):
    """A problem of no text (or only the instruction dapo_filter strips) asks nothing: it was stored as it was."""
    path = write_jsonl(tmp_path / file, [record])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: the problem is empty")):
        build(spec, tmp_path)


def test_an_arithmetic_question_written_as_a_number_is_stored_as_its_text(tmp_path):
    """The field is read as text (as every loader reads its problem), so the row stores that text: it used to pass
    the number on, which Arrow refused for the string column naming no row."""
    write_jsonl(tmp_path / "t.jsonl", [arithmetic_row(question=5, answer="5")])
    table, _ = build({"loader": "arithmetic_file", "params": {"file": "t.jsonl"}}, tmp_path)
    assert table["problem"].to_pylist() == ["5"]


def test_authors_filter_keeps_questions_shorter_than_128_characters_and_at_most_5_terms_and_digits(tmp_path):
    """The KRPO authors' train.py keeps `len(question) < 128 and num_terms <= 5 and num_digits <= 5` (the tiny-grpo
    predicate with their limits): a question of exactly 128 characters is dropped, one of 127 kept."""
    def row(ident, length, terms=2, digits=1):
        return {"id": ident, "question": "1 + 2" + " " * (length - 5), "answer": "3", "num_terms": terms,
                "num_digits": digits}
    write_jsonl(tmp_path / "tasks.jsonl", [row("127", 127), row("128", 128), row("5x5", 5, 5, 5),
                                           row("6 terms", 5, 6), row("6 digits", 5, 2, 6)])
    table, _ = build({"loader": "arithmetic_file", "params": {"file": "tasks.jsonl", "authors_filter": True}},
                     tmp_path)
    assert table["id"].to_pylist() == ["127", "5x5"]


def test_a_line_that_is_not_utf8_fails_naming_file_and_line(tmp_path):
    good = '{"id": "0", "question": "1 + 2", "answer": "3", "num_terms": 2, "num_digits": 1}'
    bad = b'{"id": "1", "question": "1 + \xff1", "answer": "2", "num_terms": 2, "num_digits": 1}'
    (tmp_path / "tasks.jsonl").write_bytes(f"{good}\n".encode() + bad + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'tasks.jsonl'}:2: not UTF-8 (byte b'\\xff'")):
        build({"loader": "arithmetic_file", "params": {"file": "tasks.jsonl"}}, tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_number_fails_naming_file_line_and_field(tmp_path, value):
    """JSON's NaN / Infinity (which Python's json reads) or a float column's missing value is no gold: it used to
    become the answer "nan" or "inf"."""
    path = write_jsonl(tmp_path / "set.jsonl", [{"q": "P0", "a": "1"}, {"q": "P1", "a": value}])
    spec = {"loader": "hub", "params": {"hub_id": "org/set", "fields": {"problem": "q", "answer": "a"},
                                        "local_files": {"train": "set.jsonl"}}}
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'a' is not a finite number: {value!r}")):
        build(spec, tmp_path)


@pytest.mark.parametrize("spec, file, split, record", [
    ({"loader": "aime24"}, "aime24/test.jsonl", "test", lambda i, n: {"id": i, "problem": f"P{n}", "answer": "1"}),
    ({"loader": "arithmetic_file", "params": {"file": "tasks.jsonl"}}, "tasks.jsonl", "test",
     lambda i, n: {"id": i, "question": f"{n} + 1", "answer": str(n + 1), "num_terms": 2, "num_digits": 1}),
    ({"loader": "hub", "params": {"hub_id": "org/set", "fields": {"id": "k", "problem": "q", "answer": "a"},
                                  "local_files": {"train": "set.jsonl"}}}, "set.jsonl", "train",
     lambda i, n: {"k": i, "q": f"P{n}", "a": "1"}),
])
def test_a_repeated_id_fails_naming_both_lines(tmp_path, spec, file, split, record):
    path = write_jsonl(tmp_path / file, [record(7, 0), record(8, 1), record(7, 2)])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: id '7' is not unique within split {split!r} "
                                                  f"(first at {path}:1)")):
        build(spec, tmp_path)


def test_missing_local_copy_names_the_path_and_the_switch(tmp_path):
    with pytest.raises(DataError, match=r"math500/test.jsonl: file not found .*data.local_dir or \$KALMANRL_DATA_DIR"):
        build({"loader": "math500"}, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Decontamination.

@pytest.mark.parametrize("a, b", [("What is  $2+3$?", "what is 2 + 3"), ("Find x.\n", "find  x"),
                                  ("ｘ＝１", "x=1")])
def test_normalized_problems_ignore_spacing_case_dollars_and_final_punctuation(a, b):
    assert normalize_problem(a) == normalize_problem(b)


@pytest.mark.parametrize("a, b", [(r"Find \(x\) if \(x+1=2\).", "Find $x$ if $x+1=2$."),
                                  (r"What is \[1+1\]?", "What is $$1+1$$?"),
                                  (r"Solve \begin{equation*} x^2=4 \end{equation*}", "Solve $$x^2=4$$"),
                                  (r"Solve \begin{equation}x^2=4\end{equation}", "Solve $x^2=4$")])
def test_normalized_problems_ignore_latex_math_delimiters(a, b):
    assert normalize_problem(a) == normalize_problem(b)


def test_normalized_problems_keep_what_changes_the_question():
    assert normalize_problem("What is 2 + 3?") != normalize_problem("What is 2 - 3?")


def test_build_drops_training_problems_found_in_eval_sets_and_counts_them(shared_data):
    spec = {"loader": "hub", "params": {"hub_id": "HuggingFaceH4/MATH-500", "fields": {"problem": "problem",
            "answer": "answer"}, "splits": {"train": "test", "test": "test"},
            "local_files": {"train": "math500/test.jsonl", "test": "math500/test.jsonl"}}}
    benchmark = [row["problem"] for row in read_jsonl(shared_data / "math500" / "test.jsonl", limit=10)]
    table, stats = build(spec, shared_data, exclude=[f" {p.upper()}  " for p in benchmark])
    assert stats["decontaminated"] == 10 and stats["splits"] == {"train": 490, "test": 500}


def test_decontaminate_drops_train_rows_of_a_benchmark_table(shared_data):
    table, _ = build({"loader": "gsm8k"}, shared_data)
    benchmark = table.filter(pa.array([s == "train" for s in table["split"].to_pylist()])).slice(0, 7)
    kept, dropped = decontaminate(table, [benchmark])
    assert dropped == 7 and kept.num_rows == table.num_rows - 7


def test_gsm8k_and_math_training_sets_hold_no_benchmark_problem(shared_data):
    benchmarks = [build({"loader": name}, shared_data)[0] for name in ("math500", "aime24", "aime25", "amc23")]
    for name in ("math", "gsm8k"):
        table, _ = build({"loader": name, "params": {"splits": ["train"]}}, shared_data)
        assert decontaminate(table, benchmarks)[1] == 0, name


# ---------------------------------------------------------------------------------------------------------------
# The hub path: `datasets.load_dataset` pointed at local files written in each hub dataset's own format.

@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Register {(hub_id, config, split): records}; `datasets.load_dataset(hub_id, config, split=...)` then reads
    them back through the real `datasets` JSON builder, as the hub would serve them."""
    import datasets

    real_load, files = datasets.load_dataset, {}

    def add(hub_id: str, config: str | None, split: str, records: list[dict]) -> None:
        files[hub_id, config, split] = write_jsonl(tmp_path / "hub" / f"{len(files)}.jsonl", records)

    def load_dataset(hub_id, config=None, *, split):
        return real_load("json", data_files=str(files[hub_id, config, split]), split="train",
                         cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return add


def test_hub_and_local_copies_build_the_same_math500(shared_data, fake_hub):
    fake_hub("HuggingFaceH4/MATH-500", None, "test", read_jsonl(shared_data / "math500" / "test.jsonl"))
    online, _ = build({"loader": "math500"}, shared_data, offline=False)
    offline, _ = build({"loader": "math500"}, shared_data)
    assert online.equals(offline)


def test_hub_gsm8k_uses_config_main_and_the_same_gold(shared_data, fake_hub):
    for split in ("train", "test"):
        fake_hub("openai/gsm8k", "main", split, read_jsonl(shared_data / "gsm8k" / f"{split}.jsonl"))
    online, _ = build({"loader": "gsm8k"}, shared_data, offline=False)
    offline, _ = build({"loader": "gsm8k"}, shared_data)
    assert online.equals(offline)


def test_hub_math_is_read_from_its_seven_subject_configs(shared_data, fake_hub):
    local = read_jsonl(shared_data / "math" / "test.jsonl")
    for config, subject in [("algebra", "Algebra"), ("counting_and_probability", "Counting & Probability"),
                            ("geometry", "Geometry"), ("intermediate_algebra", "Intermediate Algebra"),
                            ("number_theory", "Number Theory"), ("prealgebra", "Prealgebra"),
                            ("precalculus", "Precalculus")]:
        hub_rows = [{k: r[k] for k in ("problem", "level", "type", "solution")} for r in local if r["type"] == subject]
        fake_hub("EleutherAI/hendrycks_math", config, "test", hub_rows)
    online, _ = build({"loader": "math", "params": {"splits": ["test"]}}, shared_data, offline=False)
    offline, _ = build({"loader": "math", "params": {"splits": ["test"]}}, shared_data)
    columns = ("problem", "answer", "subject", "level")
    assert rows(online, *columns) == rows(offline, *columns)


@pytest.mark.parametrize("loader, hub_id, hub_rows, answers", [
    ("aime24", "HuggingFaceH4/aime_2024", [{"id": 60, "problem": "P1", "solution": "s", "answer": "025"}], ["25"]),
    ("aime25", "yentinglin/aime_2025", [{"id": 0, "problem": "P1", "answer": "070"}], ["70"]),
    ("amc23", "math-ai/amc23", [{"id": 0, "problem": "P1", "answer": 27.0}], ["27"]),
])
def test_hub_benchmarks_normalise_their_answers(tmp_path, fake_hub, loader, hub_id, hub_rows, answers):
    fake_hub(hub_id, None, {"aime24": "train", "aime25": "train", "amc23": "test"}[loader], hub_rows)
    table, _ = build({"loader": loader}, tmp_path, offline=False)
    assert table["answer"].to_pylist() == answers


DAPO_ROWS = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": f"Problem {i}: what is {i} + 1?"}],
              "reward_model": {"ground_truth": str(i + 1), "style": "rule"}} for i in range(4)]


def test_any_hub_dataset_maps_nested_fields_into_the_schema(tmp_path, fake_hub):
    hub_id = "BytedTsinghua-SIA/DAPO-Math-17k"
    fake_hub(hub_id, None, "train", DAPO_ROWS)
    fields = {"problem": "prompt.0.content", "answer": "reward_model.ground_truth"}
    spec = {"loader": "hub", "params": {"hub_id": hub_id, "source": "dapo", "fields": fields}}
    online, stats = build(spec, tmp_path, offline=False)
    assert stats["splits"] == {"train": 4} and online["answer"].to_pylist() == ["1", "2", "3", "4"]
    assert online["problem"].to_pylist()[1] == "Problem 1: what is 1 + 1?"
    assert online["source"].unique().to_pylist() == ["dapo"]
    write_jsonl(tmp_path / "dapo" / "train.jsonl", DAPO_ROWS)
    spec["params"]["local_files"] = {"train": "dapo/train.jsonl"}
    assert build(spec, tmp_path)[0].equals(online)


@pytest.mark.parametrize("rule, text, gold", [("boxed", "so \\boxed{7}", "7"), ("gsm8k", "work\n#### 1,024", "1024"),
                                              ("field", " 3/4 ", "3/4")])
def test_hub_answer_rules_extract_the_gold(tmp_path, rule, text, gold):
    write_jsonl(tmp_path / "t.jsonl", [{"q": "question", "a": text}])
    spec = {"loader": "hub", "params": {"hub_id": "x/y", "fields": {"problem": "q", "answer": "a"},
                                        "answer_rule": rule, "local_files": {"train": "t.jsonl"}}}
    assert build(spec, tmp_path)[0]["answer"].to_pylist() == [gold]


def test_hub_row_without_the_mapped_field_fails_naming_the_row(tmp_path, fake_hub):
    fake_hub("x/y", None, "train", [{"q": "question", "a": "1"}, {"q": "question 2"}])
    spec = {"loader": "hub", "params": {"hub_id": "x/y", "fields": {"problem": "q", "answer": "a"}}}
    with pytest.raises(DataError, match=r"x/y \(split train, row 1\): (missing field 'a'|field 'a' is null)"):
        build(spec, tmp_path, offline=False)


def test_offline_hub_dataset_needs_local_files(tmp_path):
    with pytest.raises(DataError, match="offline needs local_files"):
        build({"loader": "hub", "params": {"hub_id": "x/y", "fields": {"problem": "q", "answer": "a"}}}, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# OpenMathInstruct-2: a fixture in the hub's format, categories from the MATH subject of the problem.

@pytest.fixture
def openmath_dir(tmp_path, shared_data) -> Path:
    """A local_dir with the MATH copies and a 9-row `openmath/train_1M.jsonl` in nvidia/OpenMathInstruct-2's
    fields: two MATH train problems (Algebra, Counting & Probability; one twice, and once re-spaced), GSM8K and
    augmented problems."""
    math_train = read_jsonl(shared_data / "math" / "train.jsonl")
    algebra = next(r for r in math_train if r["type"] == "Algebra")
    counting = next(r for r in math_train if r["type"] == "Counting & Probability")
    (tmp_path / "math").mkdir()
    for split in ("train", "test"):
        (tmp_path / "math" / f"{split}.jsonl").symlink_to(shared_data / "math" / f"{split}.jsonl")

    def row(problem: str, source: str, answer: str = "1") -> dict:
        return {"problem": problem, "generated_solution": f"Thus \\boxed{{{answer}}}.", "expected_answer": answer,
                "problem_source": source}

    records = [row(algebra["problem"], "math", "a1"), row(algebra["problem"], "math", "a2"),
               row(counting["problem"].replace(" ", "  "), "math", "c1"), row("Tom has 3 apples.", "gsm8k"),
               row("Tom has 4 apples.", "augmented_gsm8k"), row("Find $x$ if $x^2=4$.", "augmented_math")]
    records += [row(f"Augmented problem {i}.", "augmented_math") for i in range(3)]
    write_jsonl(tmp_path / "openmath" / "train_1M.jsonl", records)
    return tmp_path


def test_openmath_keeps_one_row_per_problem_with_its_category(openmath_dir):
    table, stats = build({"loader": "openmath"}, openmath_dir)
    assert stats["splits"] == {"train": 8}
    by_answer = {a: s for a, s in zip(table["answer"].to_pylist(), table["subject"].to_pylist(), strict=True)}
    assert by_answer["a1"] == "Algebra" and by_answer["c1"] == "Counting & Probability" and "a2" not in by_answer
    assert sorted(set(table["source"].to_pylist())) == ["openmath/augmented_gsm8k", "openmath/augmented_math",
                                                        "openmath/gsm8k", "openmath/math"]


def test_openmath_category_subsets_follow_the_krpo_paper_names(openmath_dir):
    table, _ = build({"loader": "openmath", "params": {"categories": ["Probability"]}}, openmath_dir)
    assert table["answer"].to_pylist() == ["c1"]
    table, _ = build({"loader": "openmath", "params": {"problem_sources": ["augmented_math"]}}, openmath_dir)
    assert table.num_rows == 4 and table["subject"].null_count == 4


def test_openmath_holds_out_a_seeded_test_split(openmath_dir):
    spec = {"loader": "openmath", "params": {"test_size": 3, "max_problems": 6}}
    table, stats = build(spec, openmath_dir, seed=1)
    assert stats["splits"] == {"test": 3, "train": 3}
    assert build(spec, openmath_dir, seed=1)[0].equals(table)
    assert not build(spec, openmath_dir, seed=2)[0].equals(table)


def test_openmath_hub_path_gives_the_local_result(openmath_dir, fake_hub, shared_data):
    fake_hub("nvidia/OpenMathInstruct-2", None, "train_1M", read_jsonl(openmath_dir / "openmath" / "train_1M.jsonl"))
    local_math = read_jsonl(shared_data / "math" / "train.jsonl")
    for split in ("train", "test"):
        for config in ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                       "prealgebra", "precalculus"):
            fake_hub("EleutherAI/hendrycks_math", config, split, local_math[:3] if config == "algebra" else
                     [r for r in local_math if r["type"] == "Counting & Probability"][:3])
    online, _ = build({"loader": "openmath", "params": {"categories": ["Algebra", "Probability"]}}, openmath_dir,
                      offline=False)
    offline, _ = build({"loader": "openmath", "params": {"categories": ["Algebra", "Probability"]}}, openmath_dir)
    assert online.equals(offline) and online.num_rows == 2


# ---------------------------------------------------------------------------------------------------------------
# The Parquet contract.

def test_write_then_read_round_trips_and_selects_a_split(tmp_path):
    table, _ = build({"loader": "arithmetic", "params": {"difficulty": "easy", "train_size": 20, "test_size": 5}},
                     tmp_path)
    path = tmp_path / "out" / "arithmetic.parquet"
    write_dataset(table, path)
    assert [p.name for p in path.parent.iterdir()] == ["arithmetic.parquet"]
    assert read_dataset(path).equals(table)
    assert read_dataset(path, split="test").num_rows == 5


def test_an_empty_table_is_never_written(tmp_path, shared_data):
    table, _ = build({"loader": "aime24"}, shared_data)
    with pytest.raises(DataError, match="refusing to write an empty dataset"):
        write_dataset(table.slice(0, 0), tmp_path / "empty.parquet")
    assert not list(tmp_path.iterdir())


def test_reading_a_split_the_file_lacks_is_an_error(tmp_path, shared_data):
    table, _ = build({"loader": "aime24"}, shared_data)
    write_dataset(table, tmp_path / "aime24.parquet")
    with pytest.raises(DataError, match=r"aime24.parquet: no rows in split 'train'"):
        read_dataset(tmp_path / "aime24.parquet", split="train")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["answer"]), "missing required column 'answer'"),
    (lambda t: t.set_column(t.schema.get_field_index("level"), "level", pa.array(["5"] * t.num_rows)),
     "column 'level' has type string, expected int64"),
    (lambda t: t.append_column("reward", pa.array([1.0] * t.num_rows)), "unknown column"),
    (lambda t: t.set_column(t.schema.get_field_index("split"), "split", pa.array(["dev"] * t.num_rows)),
     "column 'split' has \\['dev'\\]"),
    (lambda t: t.set_column(t.schema.get_field_index("id"), "id", pa.array(["a"] * t.num_rows)),
     "column 'id' is not unique within a split: id 'a' of split 'test' at rows 0 and 1"),
    (lambda t: t.set_column(t.schema.get_field_index("answer"), "answer", pa.nulls(t.num_rows, pa.string())),
     "column 'answer' has 40 null value\\(s\\)"),  # a required column; AMC 2023 has 40 rows
])
def test_read_checks_the_schema_naming_file_and_column(tmp_path, shared_data, change, message):
    table, _ = build({"loader": "amc23"}, shared_data)
    path = tmp_path / "bad.parquet"
    pq.write_table(change(table), path)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        read_dataset(path)


def test_optional_columns_may_be_absent_from_a_file(tmp_path, shared_data):
    table, _ = build({"loader": "amc23"}, shared_data)
    path = tmp_path / "lean.parquet"
    pq.write_table(table.select(["id", "source", "split", "problem", "answer"]), path)
    assert read_dataset(path).schema == DATASET_SCHEMA


# ---------------------------------------------------------------------------------------------------------------
# The KPO authors' data (shuohe1995/verl-kpo, examples/data_preprocess/kpo_math.py): rows in each hub dataset's format.

MINERVA_ROWS = [{"problem": "Compute the escape velocity.", "answer": "11.2", "solution": "v = ..."},
                {"problem": "Give the answer in $\\mathrm{nm}$.", "answer": "500"}]
OLYMPIAD_ROWS = [{"problem": "Find all $n$.", "answer": "$n=3$", "unique_id": "ob-1"},
                 {"problem": "Compute $x$.", "answer": "\\frac{1}{2}"}]


@pytest.mark.parametrize("loader, hub_id, hub_rows, ids, answers", [
    ("minerva_math", "zwhe99/simplerl-minerva-math", MINERVA_ROWS, ["0", "1"], ["11.2", "500"]),
    ("olympiadbench", "realtreetune/olympiadbench", OLYMPIAD_ROWS, ["ob-1", "1"], ["$n=3$", "\\frac{1}{2}"]),
])
def test_kpo_benchmarks_from_the_hub_and_from_local_files_in_the_hubs_format(tmp_path, fake_hub, loader, hub_id,
                                                                              hub_rows, ids, answers):
    fake_hub(hub_id, None, "test", hub_rows)
    online, stats = build({"loader": loader}, tmp_path, offline=False)
    assert online["id"].to_pylist() == ids and online["answer"].to_pylist() == answers
    assert online["problem"].to_pylist() == [r["problem"] for r in hub_rows]
    assert stats["splits"] == {"test": 2} and online["source"].unique().to_pylist() == [loader]
    write_jsonl(tmp_path / loader / "test.jsonl", hub_rows)
    assert build({"loader": loader}, tmp_path)[0].equals(online)


@pytest.mark.parametrize("loader, answer", [("aime24", "4.5"), ("amc23", 2.5), ("aime24", "x")])
def test_an_integer_benchmark_with_a_non_integer_gold_fails_naming_the_row(tmp_path, loader, answer):
    """AIME and AMC golds are integers (AMC's stored as floats, 27.0): any other gold is a broken copy, not an answer
    to compare."""
    write_jsonl(tmp_path / loader / "test.jsonl", [{"problem": "P", "answer": answer}])
    with pytest.raises(DataError, match=rf"{loader}/test.jsonl:1: {loader} answer is not an integer"):
        build({"loader": loader}, tmp_path)


@pytest.mark.parametrize("answer", [["$1$", "$2$"], True])
def test_kpo_benchmark_with_a_non_text_answer_fails_naming_the_row(tmp_path, answer):
    """A list, or a JSON boolean (which Python counts as an int), is no gold: "True" would never match an answer."""
    write_jsonl(tmp_path / "olympiadbench" / "test.jsonl", [{"problem": "P", "answer": answer}])
    with pytest.raises(DataError, match=r"olympiadbench/test.jsonl:1: field 'answer' is not text"):
        build({"loader": "olympiadbench"}, tmp_path)


@pytest.mark.parametrize("name, value", [("solution", ["a"]), ("subject", {"name": "Algebra"})])
def test_benchmark_with_a_non_text_solution_or_subject_fails_naming_the_row(tmp_path, name, value):
    write_jsonl(tmp_path / "math500" / "test.jsonl", [{"problem": "P", "answer": "1", name: value}])
    with pytest.raises(DataError, match=rf"math500/test.jsonl:1: field '{name}' is not text"):
        build({"loader": "math500"}, tmp_path)


KPO_DAPO_ROWS = [
    {"data_source": "math_dapo", "ability": "MATH",
     "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
     "prompt": [{"role": "user", "content": "Solve $x+1=35$. Let's think step by step and output the final answer "
                                            "within \\boxed{}."}]},
    {"data_source": "math_dapo", "ability": "MATH", "reward_model": {"ground_truth": "2", "style": "rule"},
     "prompt": [{"role": "user", "content": "How many primes are even?"}]},
]


def test_dapo_filter_strips_the_boxed_instruction_and_keeps_the_gold(tmp_path, fake_hub):
    fake_hub("aaabiao/dapo_filter", None, "train", KPO_DAPO_ROWS)
    online, stats = build({"loader": "dapo_filter"}, tmp_path, offline=False)
    assert online["problem"].to_pylist() == ["Solve $x+1=35$.", "How many primes are even?"]
    assert online["answer"].to_pylist() == ["34", "2"] and online["id"].to_pylist() == ["0", "1"]
    assert stats["splits"] == {"train": 2}
    write_jsonl(tmp_path / "dapo_filter" / "train.jsonl", KPO_DAPO_ROWS)
    assert build({"loader": "dapo_filter"}, tmp_path)[0].equals(online)


@pytest.mark.parametrize("name, hub_id, answer, gold", [
    ("aime25_matharena", "MathArena/aime_2025", 70, "70"),
    ("amc23_knoveleng", "knoveleng/AMC-23", "27", "27"),
])
def test_the_kpo_authors_aime25_and_amc23_copies_are_catalogue_entries(tmp_path, fake_hub, name, hub_id, answer,
                                                                        gold):
    from kalmanrl.configuration.config import builtin_datasets

    spec = builtin_datasets()[name]
    assert spec["params"]["hub_id"] == hub_id
    fake_hub(hub_id, None, "train", [{"problem": "P", "answer": answer}])
    online, _ = build(spec, tmp_path, offline=False)
    assert online["answer"].to_pylist() == [gold] and online["split"].to_pylist() == ["test"]
    write_jsonl(tmp_path / name / "test.jsonl", [{"problem": "P", "answer": answer}])
    assert build(spec, tmp_path)[0].equals(online)
