"""Typed settings: the base of every config section model, and pydantic's validation errors turned into one
line per problem: `file: dotted.key: message (got value)`.

Each stage (and the data, training and budgets owners) declares its own section model on `Section`;
`edgekd.config` composes them into `PipelineConfig`. An unknown key gets a "did you mean" suggestion from
the fields of the section it appears in.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """A config section: unknown keys are errors, each field is documented by its attribute docstring."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)

    def view(self) -> dict[str, Any]:
        """The section as plain JSON data, keys as written in YAML (for fingerprints and the manifest)."""
        return self.model_dump(mode="json", by_alias=True)


def positive_ints(value: list[int]) -> list[int]:
    """A list setting of sizes or counts (batch sizes, threads): not empty, each >= 1."""
    if not value:
        raise ValueError("must not be empty")
    bad = [v for v in value if v < 1]
    if bad:
        raise ValueError(f"must be >= 1 (got {bad[0]})")
    return value


def distinct_names(value: list[str]) -> list[str]:
    """A list of names (layers, nodes, providers): no empty or blank-padded names, no repeats."""
    for name in value:
        if not name.strip():
            raise ValueError(f"names must not be empty (got {name!r})")
        if name != name.strip():
            raise ValueError(f"names must not start or end with spaces (got {name!r})")
    repeated = sorted({name for name in value if value.count(name) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]!r} is listed twice")
    return value


def _model_for_loc(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class at a location (for 'did you mean' suggestions)."""
    model: Any = root
    for part in loc:
        if not isinstance(part, str) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of settings",
    "model_attributes_type": "must be a mapping of settings",
    "path_type": "must be a path",
    "missing": "required",
}


def _describe(root: type[BaseModel], error: dict) -> tuple[str, str]:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p[:1].isupper() or p in ("literal", "function-after")))
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    if kind == "extra_forbidden":
        parent = _model_for_loc(root, loc[:-1])
        suggestion = difflib.get_close_matches(str(loc[-1]), _field_names(parent), n=1) if parent else []
        hint = f"; did you mean '{suggestion[0]}'?" if suggestion else ""
        valid = f" (valid: {', '.join(_field_names(parent))})" if parent and not suggestion else ""
        return _format_loc(loc), f"unknown key{hint}{valid}"
    if kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '')}"
    elif kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", error["msg"]))
        # Validators that name a sub-key themselves ("root: required ...") extend the location.
        head, sep, tail = message.partition(": ")
        if sep and re.fullmatch(r"[a-z_.]+", head):
            return _format_loc((*loc, *head.split("."))) if head.count(".") == 0 else head, tail
        return _format_loc(loc), message
    else:
        shown = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in ctx.items()}
        message = _MESSAGES.get(kind, error["msg"]).format(**shown)
    if kind != "missing":
        message += f" (got {got!r})" if isinstance(got, str) else f" (got {got})"
    return _format_loc(loc), message


def format_validation_error(root: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where, message = _describe(root, error)
        lines.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return "\n".join(dict.fromkeys(lines))
