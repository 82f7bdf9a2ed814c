"""The KRPO paper's Arithmetic task: random integer expressions in the authors' row schema.

Rows look like the authors' `MathTasks_test.jsonl` (`id, question, answer, num_terms, num_digits`): operators + - *,
parentheses, unary minus on literals and on groups, irregular spacing, and five question templates. Each expression is
built as a tree and its answer computed from the tree with Python integers, so the answer is exact and no string is
ever evaluated.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
# The authors' five question forms, in the proportions of their test file (about 1/5 each).
TEMPLATES = ("{}", "Solve {}", "What is {}?", "{} =", "{} = ?")

GROUP_PROB = 0.1  # an operation is parenthesised although precedence does not require it
NEGATE_PROB = 0.5  # a parenthesised group (or a literal) carries a unary minus
WIDE_GAP_PROB = 0.12  # a gap between tokens widens by two more spaces
# Python's default limit on the digits str() writes of an int. An expression of n literals of at most d digits has
# |value| < 10 ** (n * d) (each of + - * keeps |x| + 1 a product of its literals' |t| + 1), so n * d digits suffice.
MAX_DIGITS = 4300


@dataclass(frozen=True)
class Num:
    value: int  # a signed literal; negative ones render as `-77`


@dataclass(frozen=True)
class BinOp:
    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Group:
    child: Expr
    negate: bool  # renders `-( child )` instead of `( child )`


Expr = Num | BinOp | Group


def evaluate(expr: Expr) -> int:
    """The exact integer value of an expression tree."""
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Group):
        value = evaluate(expr.child)
        return -value if expr.negate else value
    return OPERATORS[expr.op](evaluate(expr.left), evaluate(expr.right))


def tokens(expr: Expr) -> list[str]:
    """The expression's tokens (`-(` and signed literals are single tokens); tree construction already put a Group
    wherever precedence needs one, so no parentheses are added here."""
    if isinstance(expr, Num):
        return [str(expr.value)]
    if isinstance(expr, Group):
        return ["-(" if expr.negate else "(", *tokens(expr.child), ")"]
    return [*tokens(expr.left), expr.op, *tokens(expr.right)]


def random_expression(rng: random.Random, num_terms: int, num_digits: int) -> Expr:
    """A random tree with `num_terms` literals of at most `num_digits` digits, shaped and grouped like the authors'."""
    expr = _random_tree(rng, num_terms, num_digits)
    return _maybe_group(rng, expr, prob=GROUP_PROB / 3) if isinstance(expr, BinOp) else expr


def _random_tree(rng: random.Random, num_terms: int, num_digits: int) -> Expr:
    if num_terms == 1:
        value = rng.randrange(10 ** num_digits)
        return Num(-value if value and rng.random() < NEGATE_PROB else value)
    left_terms = rng.randint(1, num_terms - 1)
    op = rng.choice(tuple(OPERATORS))
    left = _operand(rng, _random_tree(rng, left_terms, num_digits), op, right=False)
    right = _operand(rng, _random_tree(rng, num_terms - left_terms, num_digits), op, right=True)
    return BinOp(op, left, right)


def _operand(rng: random.Random, child: Expr, op: str, *, right: bool) -> Expr:
    """Group `child` where `child op ...` or `... op child` would otherwise parse differently (a lower-precedence
    operand, or a +/- chain right of a minus), and at random elsewhere."""
    if not isinstance(child, BinOp):
        return child
    lower = PRECEDENCE[child.op] < PRECEDENCE[op]
    if lower or (right and op == "-" and PRECEDENCE[child.op] == PRECEDENCE[op]):
        return _group(rng, child)
    return _maybe_group(rng, child, prob=GROUP_PROB)


def _maybe_group(rng: random.Random, expr: BinOp, prob: float) -> Expr:
    return _group(rng, expr) if rng.random() < prob else expr


def _group(rng: random.Random, expr: Expr) -> Group:
    """Parentheses, each time possibly negated; occasionally nested (`-( -( ... ) )`, as the authors' file has)."""
    group = Group(expr, negate=rng.random() < NEGATE_PROB)
    while rng.random() < GROUP_PROB / 3:
        group = Group(group, negate=True)
    return group


def render(rng: random.Random, expr: Expr) -> str:
    """Tokens joined by irregular runs of spaces (mostly one, sometimes 3, 5, ...; sometimes leading spaces)."""
    def gap(width: int) -> str:
        while rng.random() < WIDE_GAP_PROB:
            width += 2
        return " " * width

    parts = tokens(expr)
    return gap(0) + "".join(token + gap(1) for token in parts[:-1]) + parts[-1]


def question(rng: random.Random, expr: Expr) -> str:
    return rng.choice(TEMPLATES).format(render(rng, expr))


def generate(train_size: int, test_size: int, *, max_terms: int, max_digits: int, seed: int) -> dict[str, list[dict]]:
    """Rows `{id, question, answer, num_terms, num_digits}` for the train and test splits, with num_terms uniform in
    [2, max_terms] and num_digits in [1, max_digits].

    Expressions are unique across both splits (compared as token sequences, so spacing and template do not count),
    so train and test never share one. Ids are consecutive, train first, as in the authors' files.
    """
    if max_terms < 2 or max_digits < 1:
        raise ValueError(f"arithmetic needs max_terms >= 2 and max_digits >= 1, got {max_terms}, {max_digits}")
    if max_terms * max_digits > MAX_DIGITS:  # an answer (or literal) str() refuses to write
        raise ValueError(f"arithmetic needs max_terms x max_digits <= {MAX_DIGITS} (the digits Python writes of an "
                         f"integer), got {max_terms} x {max_digits}")
    if train_size < 0 or test_size < 0:  # a negative size would slice the other split's rows into this one
        raise ValueError(f"arithmetic needs train_size and test_size >= 0, got {train_size}, {test_size}")
    rng = random.Random(seed)
    wanted = train_size + test_size
    seen: set[tuple[str, ...]] = set()
    rows: list[dict] = []
    for _ in range(20 * wanted + 1000):
        if len(rows) == wanted:
            break
        num_terms, num_digits = rng.randint(2, max_terms), rng.randint(1, max_digits)
        expr = random_expression(rng, num_terms, num_digits)
        key = tuple(tokens(expr))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"id": str(len(rows)), "question": question(rng, expr), "answer": str(evaluate(expr)),
                     "num_terms": num_terms, "num_digits": num_digits})
    if len(rows) < wanted:
        raise ValueError(f"only {len(rows)} distinct expressions with max_terms={max_terms}, max_digits={max_digits};"
                         f" asked for {wanted}")
    return {"train": rows[:train_size], "test": rows[train_size:]}
