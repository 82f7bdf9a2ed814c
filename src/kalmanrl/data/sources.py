"""Where a dataset's raw rows come from: local JSON Lines copies when a copy directory is named (`data.local_dir` or
$KALMANRL_DATA_DIR, see `resolve_local_dir`), else the Hugging Face hub.

Both give the loaders the same (where, row) pairs, so the same row mapping runs on hub rows and on local copies and
the tests on local copies exercise the hub code; `field` and `text_field` read a row's values, failing with the file
and line (or the hub row) and the field's name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kalmanrl.data.dataset import DataError

DATA_DIR_ENV = "KALMANRL_DATA_DIR"


@dataclass(frozen=True)
class LoadContext:
    """The `data` settings every loader sees: where the local copies are (None: the hub), the seed, the presets."""

    local_dir: Path | None
    seed: int
    arithmetic_presets: Mapping[str, Any]

    @property
    def offline(self) -> bool:
        """Rows come from local copies (a copy directory is named), not from the hub."""
        return self.local_dir is not None

    def local_file(self, relative: str | Path) -> Path:
        """A file of the local copies; without a copy directory the error says how to name one."""
        if self.local_dir is None:
            raise DataError(f"{relative}: a local copy is needed but no copy directory is named "
                            f"(set data.local_dir or ${DATA_DIR_ENV})")
        return self.local_dir / relative


def resolve_local_dir(setting: str | Path | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The directory of local dataset copies: `data.local_dir` when set, else $KALMANRL_DATA_DIR, else None (rows
    then come from the Hugging Face hub, cached by `datasets`). A named directory that does not exist is an error
    naming the setting it came from, so a typo never falls back to the hub."""
    if setting not in (None, ""):
        path, origin = Path(setting), "data.local_dir"
    elif environ.get(DATA_DIR_ENV):
        path, origin = Path(environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        return None
    if not path.is_dir():
        raise DataError(f"{origin} = {str(path)!r}: no such directory of local dataset copies "
                        f"(working directory {Path.cwd()})")
    return path


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object's dict, refusing a repeated key: `json` keeps the last value, so of two `answer`s one would be
    dropped without a word."""
    row = dict(pairs)
    if len(row) < len(pairs):
        repeated = next(key for index, (key, _) in enumerate(pairs) if any(key == k for k, _ in pairs[:index]))
        raise ValueError(f"the key {repeated!r} is repeated")
    return row


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for every non-blank line; bytes that are not UTF-8, invalid JSON (a repeated key too) or a
    non-object fail naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (local copies are read from data.local_dir or ${DATA_DIR_ENV}; "
                        f"with neither set, datasets come from the hub)")
    # Undecodable bytes become lone surrogates (which valid UTF-8 never decodes to), found line by line below.
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {line[e.start].encode('utf-8', 'surrogateescape')!r} at "
                                f"character {e.start + 1})") from None
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            except ValueError as e:  # a repeated key, or an integer longer than Python reads (4300 digits)
                raise DataError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _load_hub(hub_id: str, *, config: str | None = None, split: str) -> Iterable[dict]:
    """One split of a hub dataset, as an iterable of row dicts (the only place that touches the hub)."""
    import datasets

    return datasets.load_dataset(hub_id, config, split=split)


@dataclass(frozen=True)
class Source:
    """One split of a dataset: on the hub (id, split, and the configs that together make it) and as a local JSON
    Lines copy relative to `data.local_dir`."""

    hub_id: str
    hub_split: str
    local_file: str
    hub_configs: tuple[str | None, ...] = (None,)


def iter_rows(ctx: LoadContext, source: Source) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of one source; `where` names the file and line, or the hub id, config, split and row."""
    if ctx.offline:
        yield from read_jsonl(ctx.local_file(source.local_file))
        return
    for config in source.hub_configs:
        name = source.hub_id + (f"/{config}" if config else "")
        for index, row in enumerate(_load_hub(source.hub_id, config=config, split=source.hub_split)):
            yield f"{name} (split {source.hub_split}, row {index})", row


def field(row: Mapping[str, Any], path: str, where: str) -> Any:
    """A row's field by dotted path (`reward_model.ground_truth`, `prompt.0.content`); missing, null or a non-finite
    number (NaN, a float column's missing value, or JSON's NaN / Infinity, which `json` accepts) fails naming it."""
    value: Any = row
    for key in path.split("."):
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, TypeError, ValueError):
            raise DataError(f"{where}: missing field {path!r}") from None
    if value is None:
        raise DataError(f"{where}: field {path!r} is null")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field {path!r} is not a finite number: {value!r}")
    return value


def text_field(row: Mapping[str, Any], path: str, where: str) -> str:
    """A scalar field (text or number) as text; anything else fails naming the row and field."""
    value = field(row, path, where)
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise DataError(f"{where}: field {path!r} is not text: {value!r}")
    return str(value)


def id_field(row: Mapping[str, Any], path: str, where: str) -> str:
    """An id field as text: a string or an integer; anything else fails naming the row and field, as str() of a float,
    list or dict (or a boolean) is no id that names the problem."""
    value = field(row, path, where)
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise DataError(f"{where}: field {path!r} is not an id (text or an integer): {value!r}")
    return str(value)
