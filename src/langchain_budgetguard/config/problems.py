"""What is wrong with a config file, said the way a person fixes it: ``<file>: <key path>: <what>``.

Pydantic finds the problems (``schema.py``); this module turns each of its errors into a line
that names the TOML key (``limits[1].usd``, ``prices."gpt-4.1-ft".input``) and what was expected.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import BudgetGuardError

__all__ = ["ConfigError", "Problem", "bad", "show", "key_path", "problems_of", "MOVED_KEYS"]

Problem = tuple[str, str]  # (key path, what is wrong)

# Keys people put where the first example file had them, or by their BudgetPolicy name.
MOVED_KEYS = {
    "estimator": "[estimate] mode",
    "store": "[store] url",
    "on_store_error": "[store] on_error",
    "limit": "a [[limits]] table",
    "degrade_to": "[degrade] (model name -> cheaper models)",
}

ERROR_TYPE = "budgetguard"


class ConfigError(BudgetGuardError, ValueError):
    """A config file that cannot be used. ``problems`` lists ``(key path, what is wrong)``;
    the message has one line per problem: ``<file>: <key>: <what was expected, got what>``."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {key}: {what}" if key else f"{source}: {what}"
                                   for key, what in self.problems))


def bad(message: str) -> PydanticCustomError:
    """The error a value check raises: ``message`` is shown as it is (braces included)."""
    return PydanticCustomError(ERROR_TYPE, "{message}", {"message": message})


def show(value: Any) -> str:
    """A value as it would be written in TOML: ``"five"``, ``5``, ``true``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]" if len(value) < 6 else "an array"
    if isinstance(value, Decimal):  # TOML floats are read as Decimal: show them as TOML writes them
        if not value.is_finite():
            return "nan" if value.is_nan() else ("-inf" if value < 0 else "inf")
        return str(value).lower().replace("e+", "e")
    return str(value)


def key_part(part: str) -> str:
    """A TOML key as it appears in a key path: bare when it can be, quoted otherwise."""
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part, ensure_ascii=False)


def key_path(loc: Iterable[str | int]) -> str:
    """``("limits", 1, "usd")`` -> ``limits[1].usd``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + key_part(part)
    return out


# -- the model class behind a key path ---------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` / ``X | None`` -> ``X``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else Any
        else:
            return annotation


def _is_table(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def table_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class validating the value at ``loc`` (None when it is not a table)."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if _is_table(current):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (list, tuple):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if _is_table(current) else None


# -- pydantic errors -> problems -------------------------------------------------------------------


def _unknown_key(root: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    name = str(loc[-1])
    table = table_at(root, loc[:-1])
    allowed = list(table.model_fields) if table else []
    where = str(loc[-2]) if len(loc) > 1 else ""
    homes = [section for section, field in root.model_fields.items()  # the [sections], not lists
             if section != where and _is_table(field.annotation) and name in field.annotation.model_fields]
    hint = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    if homes:
        suggestion = f"; did you mean [{homes[0]}] {name}?"
    elif hint:
        suggestion = f"; did you mean {hint[0]!r}?"
    elif name in MOVED_KEYS:
        suggestion = f"; did you mean {MOVED_KEYS[name]}?"
    else:
        suggestion = ""
    return f"unknown key (expected one of: {', '.join(allowed)}){suggestion}"


def _required(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[Problem]:
    """A missing key; a missing table is reported as its own required keys."""
    table = table_at(root, loc[:-1])
    field = table.model_fields.get(str(loc[-1])) if table else None
    inner = table_at(root, loc)
    if inner is not None:
        missing = [(name, f) for name, f in inner.model_fields.items() if f.is_required()]
        if missing:
            return [(key_path((*loc, name)), f"required: {f.description}") for name, f in missing]
    what = field.description if field is not None and field.description else "this key"
    return [(key_path(loc), f"required: {what}")]


def _expected_table(root: type[BaseModel], loc: tuple[str | int, ...], value: Any) -> str:
    table = table_at(root, loc)
    example = getattr(table, "table_example", None)
    if example:
        return f"expected a table such as {example}, got {show(value)}"
    if loc and isinstance(loc[-1], int):
        return f"expected a table ([[{key_path(loc[:-1])}]]), got {show(value)}"
    return f"expected a table ([{key_path(loc)}]), got {show(value)}"


def problems_of(error: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """One ``(key path, what is wrong)`` per error of ``root.model_validate``."""
    out: list[Problem] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        kind = item["type"]
        value = item.get("input")
        key = key_path(loc)
        if kind == ERROR_TYPE:
            out.append((key, item["msg"]))
        elif kind == "extra_forbidden":
            out.append((key, _unknown_key(root, loc)))
        elif kind == "missing":
            out.extend(_required(root, loc))
        elif kind in ("model_type", "model_attributes_type", "dict_type") and table_at(root, loc) is not None:
            out.append((key, _expected_table(root, loc, value)))
        elif kind == "dict_type":
            out.append((key, f"expected a table ([{key}]), got {show(value)}"))
        elif kind == "list_type":
            out.append((key, f"expected tables ([[{key}]] ...), got {show(value)}"))
        elif kind == "too_short":
            out.append((key, f"expected at least one [[{key}]] table, got none"))
        else:  # pragma: no cover - every value type of schema.py raises its own message
            out.append((key, f"{item['msg']}, got {show(value)}"))
    return out
