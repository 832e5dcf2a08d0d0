"""Budgets: evaluation, artifact choice, report loading, JUnit output (shared by run, check and compare).

Torch-free and pydantic-free on purpose: `edgekd check` / `edgekd compare` run on a CI runner that has only
the runtime install (numpy, onnxruntime, click). YAML budgets files need PyYAML; JSON ones need nothing.

A budget is evaluated on one artifact row of report.json (the deployed one unless told otherwise):

  latency_p50_ms / latency_p90_ms / latency_p99_ms   max latency at latency_threads x latency_batch
  size_kb                                            max file size in KiB
  min_accuracy                                       min test accuracy
  max_accuracy_drop                                  max (teacher accuracy - accuracy)
  min_speedup                                        min teacher p50 / artifact p50 (same run, same setting)
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

from edgekd.errors import InputError

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
SETTINGS = {"latency_threads": 1, "latency_batch": 1}
ACCURACY_BUDGETS = ("min_accuracy", "max_accuracy_drop")
# Never deployed: the teacher is the reference (deployed only when nothing else exists); the baseline is
# the no-KD control run that shows the KD gain (same architecture as the student).
REFERENCE_ARTIFACTS = ("teacher", "student_baseline")


# --------------------------------------------------------------------------------------------------
# Budgets in, budgets validated


def normalize_budgets(raw: Any, source: str = "budgets") -> dict[str, Any]:
    """Validate a budgets mapping: known names only, positive numbers; settings default to 1 thread, batch 1.

    Returns {name: limit, ..., "latency_threads": n, "latency_batch": n}; None limits are dropped.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: must be a mapping of budget names to limits")
    budgets: dict[str, Any] = dict(SETTINGS)
    known = [*BUDGET_SPECS, *SETTINGS]
    for name, value in raw.items():
        if name not in known:
            hint = difflib.get_close_matches(str(name), known, n=1)
            raise InputError(
                f"{source}: unknown budget '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; known budgets: {', '.join(known)}"
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{source}.{name}: must be a number (got {value!r})")
        if name in SETTINGS:
            if int(value) != value or value < 1:
                raise InputError(f"{source}.{name}: must be an integer >= 1 (got {value!r})")
            budgets[name] = int(value)
        elif value < 0 or (value == 0 and name not in ("max_accuracy_drop", "min_accuracy")):
            raise InputError(f"{source}.{name}: must be > 0 (got {value!r})")
        elif name in ACCURACY_BUDGETS and value > 1:
            raise InputError(f"{source}.{name}: an accuracy is a fraction in [0, 1] (got {value!r})")
        else:
            budgets[name] = float(value)
    return budgets


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


def _p50(row: dict[str, Any] | None, threads: int, batch: int) -> float | None:
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
        base, mine = _p50(teacher, threads, batch), _p50(row, threads, batch)
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
    return evaluate_row(row, find_row(report, "teacher"), budgets)


def budgets_of_report(report: dict[str, Any]) -> dict[str, Any]:
    """The budgets a report was rendered with (its `budget_settings`), validated."""
    return normalize_budgets(report.get("budget_settings") or {}, "report.budget_settings")


# --------------------------------------------------------------------------------------------------
# Artifact choice


def choose_artifact(rows: list[dict[str, Any]], budgets: dict[str, Any],
                    not_deployable: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the deployed artifact; returns (choice, candidates).

    Rule: among deployable candidates (not the teacher or the no-KD baseline, not an int8 fallback), the
    fastest p50 at the budget's threads x batch that meets every budget; else the fastest meeting the
    accuracy budgets; else the most accurate. The teacher is deployed only when it is the only candidate.
    """
    threads, batch = budgets.get("latency_threads", 1), budgets.get("latency_batch", 1)
    not_deployable = not_deployable or {}
    teacher = find_row(rows, "teacher")
    candidates: list[dict[str, Any]] = []
    for row in rows:
        name = row["name"]
        verdicts = evaluate_row(row, teacher, budgets)
        excluded = None
        if name == "teacher":
            excluded = "the reference model (deployed only when it is the only candidate)"
        elif name == "student_baseline":
            excluded = "the no-KD control run (shows the KD gain); never deployed"
        elif name in not_deployable:
            excluded = f"not deployable: {not_deployable[name]}"
        candidates.append({
            "artifact": name, "eligible": excluded is None, "excluded_reason": excluded,
            "p50_ms": _p50(row, threads, batch), "accuracy": row.get("accuracy"),
            "passed_all": all(v["passed"] for v in verdicts),
            "passed_accuracy": all(v["passed"] for v in verdicts if v["name"] in ACCURACY_BUDGETS),
            "misses": [{k: v[k] for k in ("name", "limit", "value", "over", "over_pct", "message")}
                       for v in verdicts if not v["passed"]],
        })
    pool = [c for c in candidates if c["eligible"]]
    only_teacher = False
    if not pool:
        pool = [c for c in candidates if c["artifact"] == "teacher"]
        only_teacher = True
        if not pool:
            raise InputError("no artifact can be deployed (no candidates and no teacher row)")
        pool[0]["eligible"] = True

    def speed(c: dict[str, Any]) -> tuple[float, float]:
        return (c["p50_ms"] if c["p50_ms"] is not None else math.inf, -(c["accuracy"] or 0.0))

    setting = f"{threads} thread{'s' if threads != 1 else ''}, batch {batch}"
    has_accuracy_budget = any(budgets.get(n) is not None for n in ACCURACY_BUDGETS)
    passing = sorted((c for c in pool if c["passed_all"]), key=speed)
    accurate = sorted((c for c in pool if c["passed_accuracy"]), key=speed)
    if passing:
        best = passing[0]
        limits = active_limits(budgets)
        if not limits:
            what = "(no budgets set)"
        elif has_accuracy_budget:
            others = [n for n in limits if n not in ACCURACY_BUDGETS]
            what = "meeting the accuracy budgets" + (" and every other budget" if others else "")
        else:
            what = "meeting every budget (no accuracy budget set)"
        rule = f"fastest artifact {what}: p50 {_ms(best['p50_ms'])} at {setting}"
        reason = rule
    elif accurate:
        best = accurate[0]
        rule = (f"no artifact meets every budget; best candidate: the fastest meeting the accuracy budgets "
                f"(p50 {_ms(best['p50_ms'])} at {setting})")
        reason = f"{rule}; misses {_misses(best)}"
    else:
        best = max(pool, key=lambda c: (c["accuracy"] or 0.0, -speed(c)[0]))
        rule = "no artifact meets the accuracy budgets; best candidate: the most accurate"
        reason = f"{rule}, misses {_misses(best)}"
    if only_teacher:
        prefix = "the teacher is the only candidate (no other deployable artifact); "
        rule, reason = prefix + rule, prefix + reason
    speedup = next((r.get("speedup_vs_teacher") for r in rows if r["name"] == best["artifact"]), None)
    if speedup and best["artifact"] != "teacher" and best["passed_all"]:
        reason += f", {speedup:.2f}x the teacher's speed"
        rule = reason
    choice = {"artifact": best["artifact"], "reason": reason, "rule": rule, "budgets_passed": best["passed_all"],
              "threads": threads, "batch": batch}
    return choice, candidates


def _ms(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f} ms"


def _misses(candidate: dict[str, Any]) -> str:
    return "; ".join(m["message"] for m in candidate["misses"]) or "nothing"


# --------------------------------------------------------------------------------------------------
# Console lines, JUnit, compare (implementations in edgekd.report.*)


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """'PASS ...' / 'FAIL ...' lines, failures first, for the console."""
    ordered = sorted(verdicts, key=lambda v: v["passed"])
    return [f"{'PASS' if v['passed'] else 'FAIL'} {v['message']}" for v in ordered]


def write_junit_for_report(report_path: Path, junit_path: Path) -> None:
    """JUnit XML of report.json's budget verdicts (one test case per budget) for CI systems."""
    from edgekd.report.junit import write_junit_for_report as _write

    _write(Path(report_path), Path(junit_path))


def compare_reports(base: dict[str, Any], new: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Compare two reports; see edgekd.report.compare.compare_reports for the options and verdicts."""
    from edgekd.report.compare import compare_reports as _compare

    return _compare(base, new, **options)
