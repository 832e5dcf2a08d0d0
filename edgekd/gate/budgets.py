"""Budgets: the one schema (`BudgetsConfig`, the `budgets:` section of pipeline.yaml and the budgets files of
`edgekd check`), their evaluation on report.json rows, and report.json loading (shared by run, check and
compare).

Torch-free on purpose: `edgekd check` / `edgekd compare` run on a CI runner that has only the runtime
install (numpy, onnxruntime, click, pydantic). YAML budgets files need PyYAML; JSON ones need nothing.

A budget is evaluated on one artifact row of report.json (the deployed one unless told otherwise):

  latency_p50_ms / latency_p90_ms / latency_p99_ms   max latency at latency_threads x latency_batch
  size_kb                                            max file size in KiB
  min_accuracy                                       min test accuracy
  max_accuracy_drop                                  max (teacher accuracy - accuracy)
  min_speedup                                        min teacher p50 / artifact p50 (same run, same setting)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator

from edgekd.errors import InputError
from edgekd.stages.teacher.config import MODEL as TEACHER
from edgekd.validation import Section, format_validation_error

REPORT_SCHEMA_VERSION = 1

# name -> (direction, unit, format): "max" budgets fail when value > limit, "min" ones when value < limit.
BUDGET_SPECS: dict[str, tuple[str, str, str]] = {
    "latency_p50_ms": ("max", "ms", "{:.3f}"),
    "latency_p90_ms": ("max", "ms", "{:.3f}"),
    "latency_p99_ms": ("max", "ms", "{:.3f}"),
    "size_kb": ("max", "KiB", "{:.1f}"),
    "min_accuracy": ("min", "", "{:.4f}"),
    "max_accuracy_drop": ("max", "", "{:.4f}"),
    "min_speedup": ("min", "x", "{:.2f}"),
}
ACCURACY_BUDGETS = ("min_accuracy", "max_accuracy_drop")


class BudgetsConfig(Section):
    """Limits that make `edgekd run` / `edgekd check` exit 1 when breached."""

    model_config = ConfigDict(allow_inf_nan=False)

    latency_p50_ms: float | None = Field(None, gt=0)
    """Max p50 latency of the deployed artifact (at latency_threads / latency_batch)."""
    latency_p90_ms: float | None = Field(None, gt=0)
    """Max p90 latency."""
    latency_p99_ms: float | None = Field(None, gt=0)
    """Max p99 latency."""
    latency_threads: int = Field(1, ge=1)
    """Thread count at which latency budgets apply (must be in benchmark.threads)."""
    latency_batch: int = Field(1, ge=1)
    """Batch size at which latency budgets apply (must be in benchmark.batch_sizes)."""
    size_kb: float | None = Field(None, gt=0)
    """Max file size of the deployed model in KiB."""
    min_accuracy: float | None = Field(None, ge=0, le=1)
    """Min test accuracy of the deployed model."""
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    """Max test-accuracy drop vs the teacher (0.01 = one point)."""
    min_speedup: float | None = Field(None, gt=0)
    """Min p50 speed-up of the deployed model vs the teacher, measured in the same run."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # `true` is no number of milliseconds
            raise ValueError(f"must be a number (got {value})")
        return value

    def as_dict(self) -> dict[str, Any]:
        """{name: limit} of the budgets that are set, plus latency_threads / latency_batch."""
        return self.model_dump(exclude_none=True)


def normalize_budgets(raw: Any, source: str = "budgets") -> dict[str, Any]:
    """Validate a budgets mapping with `BudgetsConfig` (the schema pipeline.yaml uses too).

    Returns {name: limit, ..., "latency_threads": n, "latency_batch": n}; unset limits are left out.
    """
    if isinstance(raw, BudgetsConfig):
        return raw.as_dict()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: must be a mapping of budget names to limits")
    try:
        return BudgetsConfig.model_validate(raw).as_dict()
    except ValidationError as exc:
        raise InputError(format_validation_error(BudgetsConfig, exc, source)) from None


def load_budgets_file(path: Path) -> dict[str, Any]:
    """Budgets from a JSON or YAML file: either a plain budgets mapping or a pipeline.yaml (its `budgets:`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: budgets file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
    else:
        try:
            from edgekd.yamlio import load_yaml_text
        except ImportError:  # the runtime-only install has no PyYAML
            raise InputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give a .json file") from None
        raw = load_yaml_text(text, str(path))
    if isinstance(raw, dict) and "budgets" in raw:
        raw = raw["budgets"]
    return normalize_budgets(raw, str(path))


def active_limits(budgets: dict[str, Any]) -> dict[str, float]:
    """The budgets that are set (settings left out), in the documented order."""
    return {name: budgets[name] for name in BUDGET_SPECS if budgets.get(name) is not None}


# --------------------------------------------------------------------------------------------------
# Reports


def validate_report(report: Any, source: str = "report.json") -> dict[str, Any]:
    """Check the parts of report.json that check/compare rely on; raise InputError naming what is wrong."""
    if not isinstance(report, dict):
        raise InputError(f"{source}: not a JSON object (not an edgekd report.json?)")
    version = report.get("schema_version")
    if version != REPORT_SCHEMA_VERSION:
        raise InputError(
            f"{source}: report schema_version {version!r} is not supported (this edgekd reads "
            f"{REPORT_SCHEMA_VERSION}); re-render it with `edgekd report RUN_DIR` using this version"
        )
    artifacts = report.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        raise InputError(f"{source}: 'artifacts' must be a non-empty list")
    for index, row in enumerate(artifacts):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise InputError(f"{source}: artifacts[{index}] needs a string 'name'")
        if not isinstance(row.get("latency_ms", []), list):
            raise InputError(f"{source}: artifacts[{index}].latency_ms must be a list")
    return report


def load_report(path: Path) -> dict[str, Any]:
    """Read report.json; a missing, truncated or foreign file raises InputError (exit 2)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON, truncated? ({exc})") from None
    return validate_report(report, str(path))


def find_row(report_or_rows: Any, name: str) -> dict[str, Any] | None:
    rows = report_or_rows.get("artifacts", []) if isinstance(report_or_rows, dict) else report_or_rows
    return next((row for row in rows if row.get("name") == name), None)


def latency_at(row: dict[str, Any] | None, threads: int, batch: int) -> dict[str, Any] | None:
    """The latency entry of `row` measured at threads x batch, or None."""
    for entry in (row or {}).get("latency_ms") or []:
        if entry.get("threads") == threads and entry.get("batch") == batch:
            return entry
    return None


def p50_at(row: dict[str, Any] | None, threads: int, batch: int) -> float | None:
    """The row's p50 latency at threads x batch (None when not measured)."""
    entry = latency_at(row, threads, batch)
    value = entry.get("p50") if entry else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


# --------------------------------------------------------------------------------------------------
# Evaluation


def budget_value(name: str, row: dict[str, Any], teacher: dict[str, Any] | None, threads: int, batch: int) -> float | None:
    """The measured quantity a budget limits, for one artifact row (None: not measured)."""
    if name.startswith("latency_"):
        entry = latency_at(row, threads, batch)
        value = entry.get(name.split("_")[1]) if entry else None
    elif name == "size_kb":
        value = row["size_bytes"] / 1024 if isinstance(row.get("size_bytes"), (int, float)) else None
    elif name == "min_accuracy":
        value = row.get("accuracy")
    elif name == "max_accuracy_drop":
        ok = teacher is not None and isinstance(teacher.get("accuracy"), (int, float))
        value = teacher["accuracy"] - row["accuracy"] if ok and isinstance(row.get("accuracy"), (int, float)) else None
    elif name == "min_speedup":
        base, mine = p50_at(teacher, threads, batch), p50_at(row, threads, batch)
        value = base / mine if base and mine else None
    else:
        raise InputError(f"unknown budget '{name}'")
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(name: str, value: float) -> str:
    _, unit, fmt = BUDGET_SPECS[name]
    text = fmt.format(value)
    return f"{text} {unit}" if unit and unit != "x" else f"{text}{unit}"


def verdict(name: str, limit: float, value: float | None, artifact: str, threads: int, batch: int) -> dict[str, Any]:
    """One budget verdict: passed, and by how much it is missed (`over`, absolute and relative)."""
    direction, unit, _ = BUDGET_SPECS[name]
    timed = name.startswith(("latency_", "min_speedup"))
    where = f" at {threads} thread{'s' if threads != 1 else ''}, batch {batch}" if timed else ""
    result: dict[str, Any] = {"name": name, "limit": limit, "value": None, "passed": False, "unit": unit,
                              "artifact": artifact, "over": None, "over_pct": None}
    if name.startswith("latency_") or name == "min_speedup":
        result.update(threads=threads, batch=batch)
    if value is None:
        result["message"] = f"{name}: not measured for {artifact}{where} (limit {_fmt(name, limit)})"
        return result
    value = round(value, 6)
    miss = value - limit if direction == "max" else limit - value
    passed = miss <= 1e-12
    sign = ">" if direction == "max" else "<"
    result.update(value=value, passed=passed)
    if passed:
        result["message"] = (f"{name}: {_fmt(name, value)} {'<=' if direction == 'max' else '>='} "
                             f"{_fmt(name, limit)}{where} (margin {_fmt(name, -miss)})")
    else:
        pct = 100 * miss / limit if limit else None
        result.update(over=round(miss, 6), over_pct=round(pct, 2) if pct is not None else None)
        word = "over" if direction == "max" else "short"
        result["message"] = (f"{name}: {_fmt(name, value)} {sign} {_fmt(name, limit)}{where}: {word} by "
                             f"{_fmt(name, miss)}" + (f" ({pct:.1f}%)" if pct is not None else ""))
    return result


def evaluate_row(row: dict[str, Any], teacher: dict[str, Any] | None, budgets: dict[str, Any],
                 names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Verdicts of every set budget (or of `names`) for one artifact row."""
    threads, batch = budgets.get("latency_threads", 1), budgets.get("latency_batch", 1)
    limits = active_limits(budgets)
    return [verdict(name, limit, budget_value(name, row, teacher, threads, batch), row["name"], threads, batch)
            for name, limit in limits.items() if names is None or name in names]


def evaluate_report(report: dict[str, Any], budgets: dict[str, Any], artifact: str | None = None) -> list[dict[str, Any]]:
    """Verdicts for the report's deployed artifact (or `artifact`); used by `edgekd check`."""
    name = artifact or (report.get("deployed") or {}).get("artifact")
    if not name:
        raise InputError("report has no deployed artifact; name one with --artifact")
    row = find_row(report, name)
    if row is None:
        names = ", ".join(r["name"] for r in report["artifacts"])
        raise InputError(f"artifact '{name}' is not in the report (artifacts: {names})")
    return evaluate_row(row, find_row(report, TEACHER), budgets)


def budgets_of_report(report: dict[str, Any]) -> dict[str, Any]:
    """The budgets a report was rendered with (its `budget_settings`), validated."""
    return normalize_budgets(report.get("budget_settings") or {}, "report.budget_settings")


# --------------------------------------------------------------------------------------------------
# Console lines


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """'PASS ...' / 'FAIL ...' lines, failures first, for the console."""
    ordered = sorted(verdicts, key=lambda v: v["passed"])
    return [f"{'PASS' if v['passed'] else 'FAIL'} {v['message']}" for v in ordered]
