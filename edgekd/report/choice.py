"""Which artifact ships: the accuracy gate's refusals (`not_deployable`, `other_runtimes`) and the choice among the
rest by the budgets (`choose_artifact`), each with the reason the report prints."""

from __future__ import annotations

import math
from typing import Any

from edgekd.errors import InputError
from edgekd.gate.budgets import ACCURACY_BUDGETS, active_limits, evaluate_row, find_row, p50_at
from edgekd.runtime.evaluate import near_chance_accuracy
from edgekd.stages import distill as distill_stage
from edgekd.stages import teacher as teacher_stage

TEACHER, BASELINE = teacher_stage.MODEL, distill_stage.BASELINE_MODEL


def not_deployable(quant: dict[str, Any], rows: list[dict[str, Any]], num_classes: int,
                    mobile: dict[str, Any] | None = None) -> dict[str, str]:
    """Artifacts the accuracy gate refuses: an int8 fallback, an int8 file of another runtime that failed the
    gate (edgekd.gate.accuracy), any model that collapsed to one class on the test split or sits at chance
    level (a model that predicts about as well as guessing ships nothing, whatever its speed)."""
    blocked = {}
    if quant and not quant["deployable"]:
        blocked[quant["artifact_name"]] = f"int8 fallback ({quant['fallback_reason']})"
    for entry in (mobile or {}).get("artifacts") or []:
        if not entry.get("deployable") and entry.get("reason"):
            blocked[entry["name"]] = entry["reason"]
    for row in rows:
        if row.get("collapsed"):
            blocked.setdefault(row["name"], f"{row['collapsed']}; never deployed")
    floor = near_chance_accuracy(num_classes)
    for row in rows:
        if isinstance(row.get("accuracy"), (int, float)) and row["accuracy"] < floor:
            blocked.setdefault(row["name"], f"at chance level: test accuracy {row['accuracy']:.4f} < {floor:.4f} "
                                            f"(guessing scores {1 / num_classes:.4f} with {num_classes} classes)")
    return blocked


def other_runtimes(rows: list[dict[str, Any]], deploy_runtime: str) -> dict[str, str]:
    """Rows of runtimes other than report.deploy_runtime: measured and compared, not deployed."""
    return {row["name"]: f"a {row.get('runtime') or 'onnxruntime'} artifact, shown for comparison "
                         f"(report.deploy_runtime deploys {deploy_runtime} artifacts)"
            for row in rows if (row.get("runtime") or "onnxruntime") != deploy_runtime}



def choose_artifact(rows: list[dict[str, Any]], budgets: dict[str, Any],
                    not_deployable: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the deployed artifact; returns (choice, candidates).

    Rule: among deployable candidates (not the teacher or the no-KD baseline, not an int8 fallback), the
    fastest p50 at the budget's threads x batch that meets every budget; else the fastest meeting the
    accuracy budgets; else the most accurate. The teacher is deployed only when it is the only candidate.
    """
    threads, batch = budgets.get("latency_threads", 1), budgets.get("latency_batch", 1)
    not_deployable = not_deployable or {}
    teacher = find_row(rows, TEACHER)
    candidates: list[dict[str, Any]] = []
    for row in rows:
        name = row["name"]
        verdicts = evaluate_row(row, teacher, budgets)
        excluded = None
        if name == TEACHER:
            excluded = "the reference model (deployed only when it is the only candidate)"
        elif name == BASELINE:
            excluded = "the no-KD control run (shows the KD gain); never deployed"
        elif name in not_deployable:
            excluded = f"not deployable: {not_deployable[name]}"
        candidates.append({
            "artifact": name, "eligible": excluded is None, "excluded_reason": excluded,
            "p50_ms": p50_at(row, threads, batch), "accuracy": row.get("accuracy"),
            "passed_all": all(v["passed"] for v in verdicts),
            "passed_accuracy": all(v["passed"] for v in verdicts if v["name"] in ACCURACY_BUDGETS),
            "misses": [{k: v[k] for k in ("name", "limit", "value", "over", "over_pct", "message")}
                       for v in verdicts if not v["passed"]],
        })
    pool = [c for c in candidates if c["eligible"]]
    only_teacher = False
    if not pool:
        pool = [c for c in candidates if c["artifact"] == TEACHER]
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
    if speedup and best["artifact"] != TEACHER and best["passed_all"]:
        reason += f", {speedup:.2f}x the teacher's speed"
        rule = reason
    choice = {"artifact": best["artifact"], "reason": reason, "rule": rule, "budgets_passed": best["passed_all"],
              "threads": threads, "batch": batch}
    return choice, candidates


def _ms(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f} ms"


def _misses(candidate: dict[str, Any]) -> str:
    return "; ".join(m["message"] for m in candidate["misses"]) or "nothing"
