"""Render the config reference (docs/config.md) from the pydantic models' attribute docstrings.

`python -m edgekd.config_docs > docs/config.md`; a test keeps the file in sync with the code.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from edgekd.config import PipelineConfig

HEADER = """# pipeline.yaml reference

Generated from `edgekd/config.py` by `python -m edgekd.config_docs`. Unknown keys are an error; relative
paths resolve against the folder of the config file. A section set to `null` (distill, prune, quantize)
switches that stage off.
"""


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return (text.replace("typing.", "").replace("pathlib.", "").replace("edgekd.config.", "")
            .replace("NoneType", "null").replace("Literal", "one of "))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, default=str) + "`"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _cell(text: str) -> str:
    # a table cell is one line: a docstring wrapped over several lines reads as one paragraph
    return " ".join(text.split()).replace("|", "\\|")


def _section(model: type[BaseModel], prefix: str, out: list[str], seen: set[str]) -> None:
    rows = []
    nested = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        sub = _nested_model(field.annotation)
        if sub is not None:
            nested.append((f"{prefix}{key}", sub, field.description or ""))
            rows.append(f"| `{key}` | section | {_default(field) if field.default is None else ''} | {_cell(field.description or '')} |")
            continue
        rows.append(f"| `{key}` | {_cell(_type_name(field.annotation))} | {_default(field)} | {_cell(field.description or '')} |")
    title = prefix.rstrip(".") or "top level"
    out.append(f"\n## `{title}`\n")
    if model.__doc__ and prefix and not model.__doc__.startswith(("!!!", "Usage docs")):
        out.append(model.__doc__.strip().splitlines()[0] + "\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    out.extend(rows)
    for path, sub, _ in nested:
        if path not in seen:
            seen.add(path)
            _section(sub, f"{path}.", out, seen)


def render() -> str:
    out = [HEADER]
    _section(PipelineConfig, "", out, set())
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
