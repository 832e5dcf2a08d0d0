"""`edgekd compare BASE.json NEW.json`: did latency, accuracy or size regress?

Latency is compared two ways:
  absolute  the artifact's p50 (or p90/p99) in ms, NEW vs BASE. Meaningful only on the same machine type:
            use it on a dedicated, quiet benchmark machine.
  relative  the artifact's latency divided by the teacher's, both measured in the same run (the inverse of
            the speed-up). A slower or noisier CI runner slows the teacher too, so the ratio stays put: use it
            on shared CI runners and whenever the two reports come from different environments.
`auto` (default) gates absolute latency when the environment fingerprints match and only the ratio when they
differ (with a loud warning); --allow-env-mismatch gates absolute latency anyway.

Noise: each latency carries the 95% confidence half-width of the compared percentile, estimated from the
repeated timed runs (the raw batch-1 samples when the report has them, else from p50/p90 and the iteration
count), combined over the measurements involved. A change beyond the threshold whose noise is larger than
the threshold is "inconclusive" (exit 4), not a regression: rerun with more iterations on a quieter machine.
"""

from __future__ import annotations

import math
from typing import Any

from edgekd.gate.budgets import find_row, latency_at
from edgekd.errors import InputError
from edgekd.stages.teacher.config import MODEL as TEACHER

EXIT_CODES = {"pass": 0, "regression": 1, "inconclusive": 4}
_Z = {"p50": 0.0, "p90": 1.2816, "p99": 2.3263}
_Q = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def parse_fraction(text: str | float | None, option: str) -> float | None:
    """'10%' -> 0.10, '0.1' -> 0.1; a bare number above 1 is refused (ambiguous: 10 means 10% or 10x?)."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InputError(f"{option}: expected a percentage like 10% or a fraction like 0.1 (got {text!r})") from None
    if not math.isfinite(value) or value < 0 or (value > 1 and not raw.endswith("%")):
        raise InputError(f"{option}: expected a percentage like 10% or a fraction between 0 and 1 (got {text!r})")
    return value


def _environment(report: dict[str, Any]) -> dict[str, Any]:
    env = report.get("environment") or {}
    fingerprint = env.get("fingerprint")
    if not fingerprint:
        from edgekd.runtime.cpu import environment_fingerprint

        fingerprint = environment_fingerprint(env)
    flags = env.get("flags_enabled") or (sorted(k for k, v in env["flags"].items() if v) if isinstance(
        env.get("flags"), dict) else env.get("flags") or [])
    return {"fingerprint": fingerprint, "cpu": env.get("cpu"), "cores": env.get("cores"), "flags": list(flags),
            "onnxruntime": env.get("onnxruntime"), "execution_provider": env.get("execution_provider")}


def _describe(env: dict[str, Any]) -> str:
    return (f"{env['cpu'] or 'unknown CPU'} [{', '.join(env['flags']) or 'no flags'}], {env['cores']} cores, "
            f"onnxruntime {env['onnxruntime']}, {env['execution_provider']} (fingerprint {env['fingerprint']})")


def relative_noise(report: dict[str, Any], row: dict[str, Any] | None, percentile: str, threads: int,
                   batch: int) -> float | None:
    """95% confidence half-width of one latency percentile, relative to its value (None: cannot tell)."""
    entry = latency_at(row, threads, batch)
    value = entry.get(percentile) if entry else None
    if not value:
        return None
    settings = report.get("budget_settings") or {}
    # The raw samples are of one setting: the benchmark's `latency_samples_setting`, else budget threads x batch 1.
    sampled = (row or {}).get("latency_samples_setting") or {"threads": settings.get("latency_threads", 1), "batch": 1}
    samples = sorted(s for s in (row or {}).get("latency_samples_ms") or [] if isinstance(s, (int, float)))
    q, z = _Q[percentile], 1.96
    if len(samples) >= 5 and (sampled.get("threads"), sampled.get("batch")) == (threads, batch):
        n = len(samples)  # distribution-free CI of a quantile from order statistics
        spread = z * math.sqrt(n * q * (1 - q))
        lo, hi = max(0, math.floor(n * q - spread) - 1), min(n - 1, math.ceil(n * q + spread))
        return (samples[hi] - samples[lo]) / 2 / value
    n = entry.get("iterations")
    if not n:
        return None
    if entry.get("p90") is not None and entry.get("p50") is not None and entry["p90"] > entry["p50"]:
        sigma = (entry["p90"] - entry["p50"]) / 1.2816  # robust to the outliers that inflate std
    elif entry.get("std") is not None:
        sigma = entry["std"]
    else:
        return None
    density = math.exp(-_Z[percentile] ** 2 / 2) / math.sqrt(2 * math.pi)
    return z * sigma * math.sqrt(q * (1 - q) / n) / density / value


def _combine(*parts: float | None) -> float | None:
    known = [p for p in parts if p is not None]
    return math.sqrt(sum(p * p for p in known)) if len(known) == len(parts) else None


def _latency_row(label: str, metric: str, base: float | None, new: float | None, threshold: float, noise: float | None,
                 noise_floor: float, gated: bool, note: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"artifact": label, "metric": metric, "base": base, "new": new, "threshold": threshold,
                           "noise": None, "change": None, "gated": gated, "note": note}
    if base is None or new is None:
        row.update(verdict="inconclusive" if gated else "info", note=note or "not measured in both reports")
        return row
    change = new / base - 1
    noise = max(noise, noise_floor) if noise is not None else (noise_floor or None)
    row.update(change=round(change, 6), noise=round(noise, 6) if noise is not None else None)
    if not gated:
        row["verdict"] = "info"
    elif change <= threshold:
        row["verdict"] = "ok"
    elif noise is not None and noise > threshold:
        row.update(verdict="inconclusive", note=note or f"noise ±{noise:.1%} is larger than the {threshold:.0%} threshold")
    else:
        row["verdict"] = "regression"
    return row


def compare_reports(base: dict[str, Any], new: dict[str, Any], *, max_latency_regression: float = 0.10,
                    max_accuracy_drop: float | None = None, max_size_increase: float | None = None,
                    latency_mode: str = "auto", percentile: str = "p50", allow_env_mismatch: bool = False,
                    threads: int | None = None, batch: int | None = None, all_artifacts: bool = False,
                    noise_floor: float = 0.0) -> dict[str, Any]:
    """Verdicts NEW vs BASE; exit_code 0 pass, 1 regression, 4 inconclusive (noise larger than the threshold).

    Gated: the artifact NEW deploys (compared with the same artifact in BASE, else BASE's deployed one);
    every artifact with `all_artifacts`. Other artifacts appear as information.
    """
    if latency_mode not in ("auto", "absolute", "relative"):
        raise InputError(f"--latency-mode: expected auto, absolute or relative (got {latency_mode!r})")
    if percentile not in _Q:
        raise InputError(f"--percentile: expected p50, p90 or p99 (got {percentile!r})")
    settings = new.get("budget_settings") or {}
    threads = threads or settings.get("latency_threads", 1)
    batch = batch or settings.get("latency_batch", 1)
    env_base, env_new = _environment(base), _environment(new)
    same_env = all(env_base[key] == env_new[key] for key in ("fingerprint", "execution_provider"))
    warnings: list[str] = []
    gate_absolute = latency_mode in ("auto", "absolute")
    gate_relative = latency_mode == "relative" or (latency_mode == "auto" and not same_env)
    if not same_env:
        action = ("gating absolute latency anyway (--allow-env-mismatch)" if allow_env_mismatch else
                  "absolute latencies are shown but NOT gated; only the ratios to each run's teacher are compared "
                  "(--allow-env-mismatch gates absolute latency anyway)")
        warnings.append("WARNING: the reports come from DIFFERENT environments; absolute latencies are not "
                        f"comparable.\n  base: {_describe(env_base)}\n  new:  {_describe(env_new)}\n  {action}")
        if not allow_env_mismatch:
            gate_absolute, gate_relative = False, True
    mode = "both" if gate_absolute and gate_relative else ("absolute" if gate_absolute else "relative")

    deployed_new = (new.get("deployed") or {}).get("artifact")
    deployed_base = (base.get("deployed") or {}).get("artifact")
    pairs: list[tuple[str, dict | None, dict | None, bool]] = []
    if deployed_new:
        base_row = find_row(base, deployed_new)
        label = deployed_new
        if base_row is None and deployed_base:
            base_row, label = find_row(base, deployed_base), f"{deployed_base}→{deployed_new}"
        if deployed_base and deployed_base != deployed_new:
            warnings.append(f"the deployed artifact changed: {deployed_base} (base) → {deployed_new} (new)")
        pairs.append((label, base_row, find_row(new, deployed_new), True))
    for row in new["artifacts"]:
        if row["name"] != deployed_new and find_row(base, row["name"]) is not None:
            pairs.append((row["name"], find_row(base, row["name"]), row, all_artifacts))

    teacher_base, teacher_new = find_row(base, TEACHER), find_row(new, TEACHER)
    where = f"@{threads}t b{batch}"
    rows: list[dict[str, Any]] = []
    for label, b_row, n_row, gated in pairs:
        if b_row is None or n_row is None:
            rows.append({"artifact": label, "metric": "present", "base": b_row is not None, "new": n_row is not None,
                         "verdict": "inconclusive" if gated else "info", "gated": gated, "change": None,
                         "threshold": None, "noise": None, "note": "artifact missing from one report"})
            continue
        b_lat, n_lat = latency_at(b_row, threads, batch), latency_at(n_row, threads, batch)
        b_val, n_val = (b_lat or {}).get(percentile), (n_lat or {}).get(percentile)
        noise = _combine(relative_noise(base, b_row, percentile, threads, batch),
                         relative_noise(new, n_row, percentile, threads, batch))
        note = "" if same_env or gate_absolute else "different environments: not gated"
        rows.append(_latency_row(label, f"{percentile} ms {where}", b_val, n_val, max_latency_regression, noise,
                                 noise_floor, gated and gate_absolute, note))
        if n_row["name"] != TEACHER and teacher_base and teacher_new:
            tb, tn = (latency_at(teacher_base, threads, batch) or {}).get(percentile), (
                latency_at(teacher_new, threads, batch) or {}).get(percentile)
            b_ratio = b_val / tb if b_val and tb else None
            n_ratio = n_val / tn if n_val and tn else None
            ratio_noise = _combine(noise, relative_noise(base, teacher_base, percentile, threads, batch),
                                   relative_noise(new, teacher_new, percentile, threads, batch))
            rows.append(_latency_row(label, f"{percentile} / teacher {where}", b_ratio, n_ratio, max_latency_regression,
                                     ratio_noise, noise_floor, gated and gate_relative))
        b_acc, n_acc = b_row.get("accuracy"), n_row.get("accuracy")
        if isinstance(b_acc, (int, float)) and isinstance(n_acc, (int, float)):
            drop = b_acc - n_acc
            gate = gated and max_accuracy_drop is not None
            verdict = "info" if not gate else ("regression" if drop > max_accuracy_drop + 1e-12 else "ok")
            rows.append({"artifact": label, "metric": "accuracy", "base": b_acc, "new": n_acc,
                         "change": round(n_acc - b_acc, 6) + 0.0,
                         "threshold": max_accuracy_drop, "noise": None, "verdict": verdict, "gated": gate, "note": ""})
        b_size, n_size = b_row.get("size_bytes"), n_row.get("size_bytes")
        if b_size and n_size:
            change = n_size / b_size - 1
            gate = gated and max_size_increase is not None
            verdict = "info" if not gate else ("regression" if change > max_size_increase + 1e-12 else "ok")
            rows.append({"artifact": label, "metric": "size KiB", "base": round(b_size / 1024, 2),
                         "new": round(n_size / 1024, 2), "change": round(change, 6), "threshold": max_size_increase,
                         "noise": None, "verdict": verdict, "gated": gate, "note": ""})
    gated_verdicts = {r["verdict"] for r in rows if r["gated"]}
    verdict = "regression" if "regression" in gated_verdicts else (
        "inconclusive" if "inconclusive" in gated_verdicts else "pass")
    return {"verdict": verdict, "exit_code": EXIT_CODES[verdict], "mode": mode, "same_environment": same_env,
            "environments": {"base": env_base, "new": env_new},
            "setting": {"threads": threads, "batch": batch, "percentile": percentile}, "warnings": warnings, "rows": rows}


def _value(value: Any, metric: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if metric == "accuracy":
        return f"{value:.4f}"
    return f"{value:.4f}" if "teacher" in metric else f"{value:,.3f}"


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text table (what `edgekd compare` prints)."""
    header = ["artifact", "metric", "base", "new", "change", "limit", "noise ±", "verdict"]
    lines = []
    primary = "/ teacher" if result["mode"] == "relative" else " ms "
    for r in result["rows"]:
        # Other artifacts: only their primary latency (and anything that changed), to keep the table short.
        secondary = r["artifact"] != result["rows"][0]["artifact"] and primary not in r["metric"]
        if not r["gated"] and secondary and not r.get("change"):
            continue
        change = r.get("change")
        if r["metric"] == "accuracy":
            change_text = "–" if change is None else f"{change:+.4f}"
            limit = "–" if r.get("threshold") is None else f"-{r['threshold']:.4f}"
        else:
            change_text = "–" if change is None else f"{change:+.1%}"
            limit = "–" if r.get("threshold") is None else f"+{r['threshold']:.0%}"
        noise = "–" if r.get("noise") is None else f"{r['noise']:.1%}"
        verdict = r["verdict"].upper() if r["gated"] else "info"
        lines.append([r["artifact"], r["metric"], _value(r["base"], r["metric"]), _value(r["new"], r["metric"]),
                      change_text, limit, noise, verdict + (f" ({r['note']})" if r.get("note") else "")])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)]
    mode = {"both": "absolute and relative to the teacher", "absolute": "absolute",
            "relative": "relative to each run's teacher"}[result["mode"]]
    out.append(f"latency gated: {mode}; verdict: {result['verdict'].upper()} (exit {result['exit_code']})")
    return "\n".join(out)
