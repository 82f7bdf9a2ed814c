"""Dataset loaders (a registry): each maps one dataset's raw rows (`sources`: hub or local copies) to rows of the
dataset schema, and `build_dataset` runs the one a config entry names and checks its table.

Every loader returns rows of `DATASET_SCHEMA` (missing optional columns are filled with nulls by `check_table`);
`build_dataset` also drops training problems found in the benchmarks it is given (`decontaminate`: compared as
normalised text).
"""

from __future__ import annotations

import logging
import random
import re
import types
import typing
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kalmanrl.core.registry import ParameterError, Registry
from kalmanrl.data import arithmetic
from kalmanrl.data.answers import (
    ANSWER_RULES,
    MATH_SUBJECTS,
    gsm8k_answer,
    last_box_is_empty,
    math_level,
    math_subject,
    number_text,
    require_gold,
)
from kalmanrl.data.dataset import DATASET_SCHEMA, SPLITS, DataError, check_table
from kalmanrl.data.prompts import strip_boxed_instruction
from kalmanrl.data.rewards import last_boxed
from kalmanrl.data.sources import LoadContext, Source, field, id_field, iter_rows, read_jsonl, text_field

log = logging.getLogger(__name__)

Loader = Callable[..., list[dict]]
LOADERS: Registry[Loader] = Registry("dataset loader")


def register_loader(name: str) -> Callable[[Loader], Loader]:
    """Register `fn(ctx: LoadContext, *, **params) -> rows` under `name` (the config's `loader`)."""
    return LOADERS.register(name)


def check_loader_params(name: str, params: Mapping[str, Any]) -> None:
    """Refuse parameters the loader `name` does not take (the registry's check) and values of another type than its
    signature names, naming the parameter: a string given for a list of splits was read letter by letter."""
    LOADERS.check_params(name, params)
    try:
        hints = typing.get_type_hints(LOADERS.get(name))
    except NameError:  # a plugin's annotation that names what only a type checker imports: nothing to check against
        return
    for key, value in params.items():
        if key in hints and not _has_type(value, hints[key]):
            raise ParameterError(f"dataset loader {name!r} parameter {key!r} is {value!r}, not "
                                 f"{_type_name(hints[key])}")


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a parameter value (as YAML or JSON gives it) is of the annotated type; a kind of annotation not
    handled here accepts anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is Iterable:  # a list; a string or mapping is iterable too, but not a list of values
        return isinstance(value, list | tuple) and all(_has_type(v, args[0]) for v in value)
    if origin is Mapping:
        return isinstance(value, Mapping) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                                  for k, v in value.items())
    if hint in (int, float):  # a boolean is an int to Python, never a number in a config
        return isinstance(value, int | hint) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is Iterable:
        return f"a list of {_type_name(args[0])}"
    if origin is Mapping:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


# ---------------------------------------------------------------------------------------------------------------
# Loaders. Each returns rows of DATASET_SCHEMA (missing optional columns are filled with nulls later).

# The least value of each integer column a loader reads from data; the most is int64's, the column type.
_LEAST = {"level": 0, "num_terms": 1, "num_digits": 1}
INT64_MAX = 2**63 - 1


def _checked(row: dict, where: str) -> dict:
    """`row`, after checking its values where the row that gave them is known: a blank problem asks nothing, Arrow
    refuses an integer past int64 only for the whole table (an OverflowError naming no row), and a count of terms or
    digits below 1 (or a negative level) describes no problem."""
    if not row["problem"].strip():
        raise DataError(f"{where}: the problem is empty")
    for name, least in _LEAST.items():
        value = row.get(name)
        if value is not None and not least <= value <= INT64_MAX:
            raise DataError(f"{where}: field {name!r} is {value!r}, outside [{least}, 2**63 - 1]")
    return row


def _unique_row(seen: dict[tuple[str, str], str], row: dict, where: str) -> dict:
    """`row`, after checking that no earlier row has its split and id (`seen` maps those to where each was read):
    where ids come from the data, a repeat then names both rows' file:line (or hub row), not only table rows."""
    key = (row["split"], row["id"])
    if key in seen:
        raise DataError(f"{where}: id {row['id']!r} is not unique within split {row['split']!r} (first at {seen[key]})")
    seen[key] = where
    return row


@register_loader("arithmetic")
def load_arithmetic(ctx: LoadContext, *, difficulty: str | None = None, max_terms: int | None = None,
                    max_digits: int | None = None, train_size: int = 20000, test_size: int = 500) -> list[dict]:
    """The KRPO Arithmetic task, generated: `difficulty` names a preset [max_terms, max_digits] of
    `data.arithmetic_presets`, or both limits are given explicitly."""
    if difficulty is not None:
        if max_terms is not None or max_digits is not None:
            raise DataError("arithmetic: give either difficulty or max_terms/max_digits, not both")
        if difficulty not in ctx.arithmetic_presets:
            raise DataError(f"arithmetic: unknown difficulty {difficulty!r}; known: "
                            f"{', '.join(sorted(ctx.arithmetic_presets))}")
        max_terms, max_digits = ctx.arithmetic_presets[difficulty]
    if max_terms is None or max_digits is None:
        raise DataError("arithmetic: needs difficulty, or both max_terms and max_digits")
    splits = arithmetic.generate(train_size, test_size, max_terms=max_terms, max_digits=max_digits, seed=ctx.seed)
    return [_arithmetic_row(row, split, "arithmetic") for split, rows in splits.items() for row in rows]


@register_loader("arithmetic_file")
def load_arithmetic_file(ctx: LoadContext, *, file: str = "arithmetic/MathTasks_test.jsonl", split: str = "test",
                         authors_filter: bool = False) -> list[dict]:
    """A file in the KRPO authors' schema (by default their 20,000-row test set; it has no hub copy). With
    `authors_filter`, keep only what their train.py keeps: len(question) < 128, num_terms <= 5, num_digits <= 5."""
    rows, seen = [], {}
    for where, raw in read_jsonl(ctx.local_file(file)):
        id_field(raw, "id", where)
        for name in ("question", "answer", "num_terms", "num_digits"):
            text_field(raw, name, where)
        if not re.fullmatch(r"-?\d+", str(raw["answer"]).strip()):
            raise DataError(f"{where}: arithmetic answer is not an integer: {raw['answer']!r}")
        if not all(isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in ("num_terms", "num_digits")):
            raise DataError(f"{where}: num_terms and num_digits must be integers")
        row = _checked(_arithmetic_row(raw, split, "arithmetic_file"), where)
        if not authors_filter or (len(row["problem"]) < 128 and row["num_terms"] <= 5 and row["num_digits"] <= 5):
            rows.append(_unique_row(seen, row, where))
    return rows


def _arithmetic_row(row: Mapping[str, Any], split: str, source: str) -> dict:
    return {"id": str(row["id"]), "source": source, "split": split, "problem": str(row["question"]),
            "answer": str(row["answer"]).strip(), "num_terms": row["num_terms"], "num_digits": row["num_digits"]}


def _optional_text(raw: Mapping[str, Any], name: str | None, where: str) -> str | None:
    """A field that rows may lack or leave null (hub columns) as text, checked as `text_field` checks it; None when
    `name` is None, the field is absent or null."""
    return None if name is None or raw.get(name) is None else text_field(raw, name, where)


def _data_id(raw: Mapping[str, Any], names: tuple[str, ...], where: str, default: str) -> str:
    """The id a row carries in the first of `names` it has and does not leave null (hub columns may be null), checked
    as `id_field` checks one; else `default`, the loader's id from the row's position."""
    name = next((k for k in names if raw.get(k) is not None), None)
    return default if name is None else id_field(raw, name, where)


def _benchmark_rows(ctx: LoadContext, name: str, source: Source, *, answer: str, solution: str | None,
                    integer: bool) -> list[dict]:
    """The test split of a benchmark whose rows carry `problem` and a gold answer field (MATH-500, AIME, AMC)."""
    rows, seen = [], {}
    for index, (where, raw) in enumerate(iter_rows(ctx, source)):
        gold = number_text(field(raw, answer, where)) if integer else text_field(raw, answer, where).strip()
        if integer and not re.fullmatch(r"-?\d+", gold):
            raise DataError(f"{where}: {name} answer is not an integer: {gold!r}")
        rows.append(_unique_row(seen, _checked({
            "id": _data_id(raw, ("unique_id", "id"), where, str(index)), "source": name, "split": "test",
            "problem": text_field(raw, "problem", where),
            "answer": require_gold(gold, "field", where), "solution": _optional_text(raw, solution, where),
            "subject": _optional_text(raw, "subject", where),
            "level": None if raw.get("level") is None else math_level(raw["level"], where)}, where), where))
    return rows


@register_loader("math500")
def load_math500(ctx: LoadContext) -> list[dict]:
    """MATH-500 (PRM800K's held-out 500 MATH test problems); gold = its `answer` field (= the solution's last box)."""
    return _benchmark_rows(ctx, "math500", Source("HuggingFaceH4/MATH-500", "test", "math500/test.jsonl"),
                           answer="answer", solution="solution", integer=False)


@register_loader("aime24")
def load_aime24(ctx: LoadContext) -> list[dict]:
    """AIME 2024 I+II; answers are integers ("025" -> "25")."""
    return _benchmark_rows(ctx, "aime24", Source("HuggingFaceH4/aime_2024", "train", "aime24/test.jsonl"),
                           answer="answer", solution="solution", integer=True)


@register_loader("aime25")
def load_aime25(ctx: LoadContext) -> list[dict]:
    """AIME 2025 I+II: lighteval's hub copy names its fields problem / answer / solution; the local copy is
    NeMo-Skills' (problem / expected_answer / reference_solution)."""
    answer, solution = ("expected_answer", "reference_solution") if ctx.offline else ("answer", "solution")
    return _benchmark_rows(ctx, "aime25", Source("yentinglin/aime_2025", "train", "aime25/test.jsonl"),
                           answer=answer, solution=solution, integer=True)


@register_loader("amc23")
def load_amc23(ctx: LoadContext) -> list[dict]:
    """AMC 2023 (40 problems of AMC 12A/12B); answers are stored as floats (27.0 -> "27")."""
    return _benchmark_rows(ctx, "amc23", Source("math-ai/amc23", "test", "amc23/test.jsonl"),
                           answer="answer", solution=None, integer=True)


@register_loader("minerva_math")
def load_minerva_math(ctx: LoadContext) -> list[dict]:
    """Minerva Math (272 MIT OpenCourseWare problems) as the KPO authors evaluate it: zwhe99/simplerl-minerva-math,
    split test, fields problem / answer (shuohe1995/verl-kpo, examples/data_preprocess/kpo_math.py:24, 69-76)."""
    return _benchmark_rows(ctx, "minerva_math",
                           Source("zwhe99/simplerl-minerva-math", "test", "minerva_math/test.jsonl"),
                           answer="answer", solution="solution", integer=False)


@register_loader("olympiadbench")
def load_olympiadbench(ctx: LoadContext) -> list[dict]:
    """OlympiadBench (its English, text-only maths problems) as the KPO authors evaluate it: realtreetune/olympiadbench,
    split test, fields problem / answer (kpo_math.py:25, 69-76)."""
    return _benchmark_rows(ctx, "olympiadbench",
                           Source("realtreetune/olympiadbench", "test", "olympiadbench/test.jsonl"),
                           answer="answer", solution="solution", integer=False)


@register_loader("dapo_filter")
def load_dapo_filter(ctx: LoadContext) -> list[dict]:
    """The DAPO-Math copy the KPO authors train on: aaabiao/dapo_filter, split train, the problem in
    `prompt.0.content` (its trailing "Let's think step by step and output the final answer within \\boxed{}."
    removed, as their preprocessing does before adding their own instruction), the gold in
    `reward_model.ground_truth`; ids are the row index, as theirs (kpo_math.py:17, 34-61). The bare problem is
    stored so decontamination compares problems; the `kpo_train` template adds their instruction."""
    rows, source = [], Source("aaabiao/dapo_filter", "train", "dapo_filter/train.jsonl")
    for index, (where, raw) in enumerate(iter_rows(ctx, source)):
        rows.append(_checked({"id": str(index), "source": "dapo_filter", "split": "train",
                              "problem": strip_boxed_instruction(text_field(raw, "prompt.0.content", where)),
                              "answer": require_gold(text_field(raw, "reward_model.ground_truth", where).strip(),
                                                     "field", where)}, where))
    return rows


@register_loader("math")
def load_math(ctx: LoadContext, *, splits: Iterable[str] = SPLITS, subjects: Iterable[str] | None = None,
              levels: Iterable[int] | None = None) -> list[dict]:
    """Hendrycks MATH (`EleutherAI/hendrycks_math`, one hub config per subject); gold = last box of the solution.
    `subjects` takes subject names ("Number Theory") or config names ("number_theory"); `levels` 1-5."""
    wanted_subjects = None if subjects is None else {math_subject(s) for s in subjects}
    wanted_levels = None if levels is None else set(levels)
    rows = []
    for split in splits:
        source = Source("EleutherAI/hendrycks_math", split, f"math/{split}.jsonl", hub_configs=tuple(MATH_SUBJECTS))
        for index, (where, raw) in enumerate(iter_rows(ctx, source)):
            solution = text_field(raw, "solution", where)
            answer = last_boxed(solution)
            if answer is None and last_box_is_empty(solution):
                log.warning("%s: skipped, the solution's last box is empty (a quirk of the original MATH)", where)
                continue
            row = _checked({"id": _data_id(raw, ("unique_id",), where, f"{split}-{index}"), "source": "math",
                            "split": split, "problem": text_field(raw, "problem", where),
                            "answer": require_gold(answer, "boxed", where), "solution": solution,
                            "subject": text_field(raw, "type", where),
                            "level": math_level(field(raw, "level", where), where)}, where)
            # Ids are left to check_table: openmath reads MATH only for its subjects, whatever its ids.
            if ((wanted_subjects is None or row["subject"] in wanted_subjects)
                    and (wanted_levels is None or row["level"] in wanted_levels)):
                rows.append(row)
    return rows


@register_loader("gsm8k")
def load_gsm8k(ctx: LoadContext, *, splits: Iterable[str] = SPLITS) -> list[dict]:
    """GSM8K (`openai/gsm8k`, config main): gold after `####`; the solution keeps the worked text without the
    `<<48/2=24>>` calculator annotations."""
    rows = []
    for split in splits:
        source = Source("openai/gsm8k", split, f"gsm8k/{split}.jsonl", hub_configs=("main",))
        for index, (where, raw) in enumerate(iter_rows(ctx, source)):
            text = text_field(raw, "answer", where)
            rows.append(_checked({"id": f"{split}-{index}", "source": "gsm8k", "split": split,
                                  "problem": text_field(raw, "question", where),
                                  "answer": require_gold(gsm8k_answer(text), "gsm8k", where),
                                  "solution": re.sub(r"<<[^>]*>>", "", text.rsplit("####", 1)[0]).strip()}, where))
    return rows


@register_loader("openmath")
def load_openmath(ctx: LoadContext, *, split: str = "train_1M", categories: Iterable[str] | None = None,
                  problem_sources: Iterable[str] | None = None, max_problems: int | None = None,
                  test_size: int = 0) -> list[dict]:
    """nvidia/OpenMathInstruct-2 (local copy: `openmath/<split>.jsonl` in the hub's format), one row per distinct
    problem with its first solution; gold = `expected_answer` (a majority vote for augmented problems).

    The hub rows carry no subject, so a problem's category is the MATH subject of the MATH train/test problem with
    the same normalised text (in practice the `problem_source == "math"` rows); other rows have no subject and are
    dropped by a `categories` filter ("Algebra", ..., "Probability" = Counting & Probability). A seeded shuffle then
    keeps `max_problems` and holds out `test_size` of them as the test split.
    """
    wanted = None if categories is None else {math_subject(c) for c in categories}
    sources = None if problem_sources is None else set(problem_sources)
    subject_of = {normalize_problem(row["problem"]): row["subject"] for row in load_math(ctx)}
    rows, seen = [], set()
    for index, (where, raw) in enumerate(iter_rows(ctx, Source("nvidia/OpenMathInstruct-2", split,
                                                               f"openmath/{split}.jsonl"))):
        problem, origin = text_field(raw, "problem", where), text_field(raw, "problem_source", where)
        key = normalize_problem(problem)
        subject = subject_of.get(key)
        if key in seen or (sources is not None and origin not in sources) or (wanted is not None
                                                                            and subject not in wanted):
            continue
        seen.add(key)
        rows.append(_checked({"id": f"openmath-{index}", "source": f"openmath/{origin}", "problem": problem,
                              "answer": require_gold(text_field(raw, "expected_answer", where).strip(), "field", where),
                              "solution": text_field(raw, "generated_solution", where), "subject": subject}, where))
    random.Random(ctx.seed).shuffle(rows)
    rows = rows[:max_problems]
    return [{**row, "split": "test" if i < test_size else "train"} for i, row in enumerate(rows)]


@register_loader("hub")
def load_hub_dataset(ctx: LoadContext, *, hub_id: str, fields: Mapping[str, str], answer_rule: str = "field",
                     config: str | None = None, splits: Mapping[str, str] | None = None,
                     local_files: Mapping[str, str] | None = None, source: str | None = None) -> list[dict]:
    """Any hub dataset through a field mapping, e.g. the KPO paper's DAPO-Math-17k.

    `fields` maps `problem`, `answer` (and optionally `solution`, `id`) to the dataset's field paths; dotted paths
    reach into nested fields (`reward_model.ground_truth`, `prompt.0.content`). `answer_rule` turns the answer
    field into the gold: `field` (as is), `boxed` (its last `\\boxed{}`), `gsm8k` (after `####`). `splits` maps our
    split names to the hub's (default {train: train}); offline, `local_files` gives each split's JSON Lines copy in
    the hub's format, relative to `data.local_dir`.
    """
    if answer_rule not in ANSWER_RULES:
        raise DataError(f"hub: unknown answer_rule {answer_rule!r}; known: {', '.join(ANSWER_RULES)}")
    missing = {"problem", "answer"} - set(fields)
    if missing:
        raise DataError(f"hub {hub_id}: fields must map {', '.join(sorted(missing))}")
    splits = dict(splits or {"train": "train"})
    if ctx.offline and not set(splits) <= set(local_files or {}):
        raise DataError(f"hub {hub_id}: offline needs local_files for splits {', '.join(splits)}")
    rows, seen = [], {}
    for split, hub_split in splits.items():
        where_from = Source(hub_id, hub_split, (local_files or {}).get(split, ""), hub_configs=(config,))
        for index, (where, raw) in enumerate(iter_rows(ctx, where_from)):
            gold = ANSWER_RULES[answer_rule](text_field(raw, fields["answer"], where))
            rows.append(_unique_row(seen, _checked({
                "id": id_field(raw, fields["id"], where) if "id" in fields else f"{split}-{index}",
                "source": source or hub_id, "split": split, "problem": text_field(raw, fields["problem"], where),
                "answer": require_gold(gold, answer_rule, where),
                "solution": text_field(raw, fields["solution"], where) if "solution" in fields else None}, where),
                where))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Building one config entry's table.

def build_dataset(spec: Mapping[str, Any], *, local_dir: Path | None, seed: int,
                  arithmetic_presets: Mapping[str, Any], exclude: Iterable[str] = ()) -> tuple[pa.Table, dict]:
    """One config dataset entry (`{loader, params}`) as a checked table, training problems found in `exclude`
    (benchmark problem texts) dropped; also returns stats (rows per split, the number decontaminated). `local_dir`
    is the resolved copy directory (`resolve_local_dir`); None reads the hub."""
    name = spec["loader"]
    params = dict(spec.get("params") or {})
    check_loader_params(name, params)
    rows = LOADERS.bind(name, params)(LoadContext(None if local_dir is None else Path(local_dir), seed,
                                                  arithmetic_presets))
    table = check_table(pa.Table.from_pylist(rows, schema=DATASET_SCHEMA), f"loader {name!r}")
    table, dropped = drop_problems(table, exclude)
    if table.num_rows == 0:
        raise DataError(f"loader {name!r} with params {params}: no rows left after filtering"
                        f"{f' and decontamination ({dropped} dropped)' if dropped else ''}")
    splits = pc.value_counts(table["split"]).to_pylist()
    stats = {"loader": name, "rows": table.num_rows, "decontaminated": dropped,
             "splits": {item["values"]: item["counts"] for item in splits}}
    log.info("loader %s: %s", name, stats)
    return table, stats


# Decontamination: training problems that also appear in a benchmark are dropped, compared as normalised text.

# Math-mode delimiters: `$`, `$$`, `\(` `\)`, `\[` `\]` and the equation environments' begin and end.
_MATH_DELIMITERS = re.compile(r"\$|\\[()\[\]]|\\(?:begin|end)\{equation\*?\}")


def normalize_problem(text: str) -> str:
    """A problem's text for duplicate detection: Unicode-normalised, lower case, without whitespace, math-mode
    delimiters or trailing punctuation, so copies that differ only in spacing or delimiters (`$x$`, `\\(x\\)`)
    compare equal."""
    text = _MATH_DELIMITERS.sub("", unicodedata.normalize("NFKC", text).lower())
    return re.sub(r"\s+", "", text).rstrip(".?!:;,")


def drop_problems(table: pa.Table, problems: Iterable[str]) -> tuple[pa.Table, int]:
    """Drop the training rows whose normalised problem text is among `problems`; returns the table and the count."""
    keys = {normalize_problem(p) for p in problems}
    if not keys:
        return table, 0
    keep = [split != "train" or normalize_problem(problem) not in keys
            for split, problem in zip(table["split"].to_pylist(), table["problem"].to_pylist(), strict=True)]
    kept = table.filter(pa.array(keep))
    return kept, table.num_rows - kept.num_rows


def decontaminate(table: pa.Table, benchmarks: Iterable[pa.Table]) -> tuple[pa.Table, int]:
    """`table` without the training problems that appear in any of the benchmark tables; returns the drop count."""
    return drop_problems(table, (p for b in benchmarks for p in b["problem"].to_pylist()))
