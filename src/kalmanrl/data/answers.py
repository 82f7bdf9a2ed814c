"""Gold answers as the field normalises them: the answer rules (a field as is, a solution's last box, GSM8K's text
after `####`), numbers stored as floats or zero-padded text, and MATH's subject and level labels.

The box reader is the rewards' own (`rewards.last_boxed`), so a gold is read from a solution exactly as an answer is
read from a completion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kalmanrl.data.dataset import DataError
from kalmanrl.data.rewards import last_boxed

# MATH subjects: hub config name -> the `type` / `subject` field's value.
MATH_SUBJECTS = {"algebra": "Algebra", "counting_and_probability": "Counting & Probability", "geometry": "Geometry",
                 "intermediate_algebra": "Intermediate Algebra", "number_theory": "Number Theory",
                 "prealgebra": "Prealgebra", "precalculus": "Precalculus"}


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's gold: the text after the last `####`, thousands separators removed."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def number_text(value: Any) -> str:
    """A numeric field as answer text: 27.0 -> "27" (AMC stores floats), "025" -> "25" (AIME pads with zeros);
    other text is returned stripped."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    # As str(int(text)), but as text: int() refuses more than 4300 digits, which a downloaded row may hold.
    if (match := re.fullmatch(r"([+-]?)0*([0-9]+)", text)) is None:
        return text
    sign, digits = match.groups()
    return ("-" if sign == "-" and digits != "0" else "") + digits


ANSWER_RULES: dict[str, Callable[[str], str | None]] = {"field": str.strip, "boxed": last_boxed,
                                                         "gsm8k": gsm8k_answer}


def require_gold(value: str | None, rule: str, where: str) -> str:
    """The gold an answer rule found; none (or empty) fails naming the row and the rule."""
    if not value:
        raise DataError(f"{where}: no gold answer (answer rule {rule!r})")
    return value


def last_box_is_empty(solution: str) -> bool:
    r"""Whether a solution ends its last box empty (`\boxed{}`): two MATH training solutions do, and have no gold."""
    return re.match(r"\\boxed\s*\{\s*\}", solution[solution.rfind("\\boxed"):]) is not None


def math_level(value: Any, where: str) -> int | None:
    """MATH levels: "Level 3" -> 3, an integer as is; the two "Level ?" training rows -> None. Anything but text or an
    integer fails naming the row: str() of a list or a float read as no level."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise DataError(f"{where}: field 'level' is not text or an integer: {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(?:Level )?(\d+)", value.strip())
    if match is None:
        return None
    try:
        return int(match.group(1))
    except ValueError:  # more digits than int() reads (4300)
        raise DataError(f"{where}: field 'level' has more digits than int() reads") from None


def math_subject(name: str) -> str:
    """A MATH subject from its name or config name; "Probability" (the KRPO paper's label) is accepted too."""
    aliases = {**MATH_SUBJECTS, **{s.lower(): s for s in MATH_SUBJECTS.values()},
               "probability": "Counting & Probability"}
    subject = aliases.get(name) or aliases.get(name.lower())
    if subject is None:
        raise DataError(f"unknown MATH subject {name!r}; known: {', '.join(MATH_SUBJECTS.values())}")
    return subject
