"""report.json -> titled tables of display strings, shared by the Markdown and HTML renderers (one place
decides what the report shows; the renderers only decide how)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgekd.gate.budgets import BUDGET_SPECS, latency_at


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    css: str = ""  # html class (e.g. "artifacts" lets the browser test count rows)
    row_classes: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    key: str
    text: list[str] = field(default_factory=list)
    table: Table | None = None
    bullets: list[str] = field(default_factory=list)


def num(value: Any, fmt: str = "{:,}", none: str = "–") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return none if value is None else str(value)
    return fmt.format(value)


def kib(value: Any) -> str:
    return num(value / 1024 if isinstance(value, (int, float)) else None, "{:,.1f} KiB")


def mib(value: Any) -> str:
    return num(value / 2**20 if isinstance(value, (int, float)) else None, "{:,.1f} MiB")


def ms(value: Any) -> str:
    return num(value, "{:.3f}")


def acc(value: Any) -> str:
    return num(value, "{:.4f}")


def setting(report: dict[str, Any]) -> tuple[int, int]:
    s = report.get("budget_settings") or {}
    return s.get("latency_threads", 1), s.get("latency_batch", 1)


def limit_text(name: str, value: Any) -> str:
    _, unit, fmt = BUDGET_SPECS[name]
    text = num(value, fmt)
    return f"{text} {unit}".strip() if unit != "x" else f"{text}x"


def verdict_line(report: dict[str, Any]) -> str:
    budgets, deployed = report.get("budgets") or [], report.get("deployed") or {}
    failed = [b for b in budgets if not b["passed"]]
    if not budgets:
        head = "No budgets set."
    elif failed:
        head = f"FAIL: {len(failed)} of {len(budgets)} budgets breached ({', '.join(b['name'] for b in failed)})."
    else:
        head = f"PASS: all {len(budgets)} budgets met."
    return f"{head} Deployed: {deployed.get('artifact')} ({deployed.get('path')})."


def budgets_table(report: dict[str, Any]) -> Table:
    rows, classes = [], []
    for b in report.get("budgets") or []:
        rows.append([b["name"], limit_text(b["name"], b["limit"]),
                     limit_text(b["name"], b["value"]) if b["value"] is not None else "not measured",
                     "PASS" if b["passed"] else "FAIL", b["message"].split(": ", 1)[-1]])
        classes.append("pass" if b["passed"] else "fail")
    return Table(["Budget", "Limit", f"Value ({report['deployed']['artifact']})", "Verdict", "Detail"], rows,
                 "budgets", classes)


def artifacts_table(report: dict[str, Any]) -> Table:
    threads, batch = setting(report)
    deployed = (report.get("deployed") or {}).get("artifact")
    rows, classes = [], []
    for r in report["artifacts"]:
        entry = latency_at(r, threads, batch) or {}
        name = r["name"] + (" (deployed)" if r["name"] == deployed else "")
        rows.append([name, str(r.get("kind", "")), num(r.get("params")), num(r.get("macs")), kib(r.get("size_bytes")),
                     acc(r.get("accuracy")), acc(r.get("agreement")), ms(entry.get("p50")), ms(entry.get("p90")),
                     ms(entry.get("p99")), num(r.get("speedup_vs_teacher"), "{:.2f}x"),
                     num(r.get("throughput_ips"), "{:,.0f}"), mib(r.get("peak_memory_bytes"))])
        classes.append("deployed" if r["name"] == deployed else "")
    unit = f"ms @{threads}t b{batch}"
    return Table(["Artifact", "Kind", "Params", "MACs", "Size", "Accuracy", "Agreement", f"p50 {unit}", f"p90 {unit}",
                  f"p99 {unit}", "Speed-up vs teacher", "Throughput (img/s)", "Peak memory"], rows, "artifacts", classes)


def latency_table(report: dict[str, Any]) -> Table:
    rows = []
    for r in report["artifacts"]:
        for e in sorted(r.get("latency_ms") or [], key=lambda e: (e.get("threads", 0), e.get("batch", 0))):
            rows.append([r["name"], num(e.get("threads")), num(e.get("batch")), ms(e.get("p50")), ms(e.get("p90")),
                         ms(e.get("p99")), ms(e.get("mean")), num(e.get("throughput_ips"), "{:,.0f}"),
                         num(e.get("speedup_vs_teacher"), "{:.2f}x")])
    return Table(["Artifact", "Threads", "Batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s", "vs teacher"],
                 rows, "latency")


def candidates_table(report: dict[str, Any]) -> Table:
    rows = []
    for c in report.get("candidates") or []:
        misses = "; ".join(m["message"] for m in c["misses"]) or "meets every budget"
        status = "candidate" if c["eligible"] else (c.get("excluded_reason") or "not a candidate")
        rows.append([c["artifact"], status, ms(c.get("p50_ms")), acc(c.get("accuracy")), misses])
    return Table(["Artifact", "Candidate?", "p50 ms", "Accuracy", "Budgets missed (by how much)"], rows, "candidates")


def _kv(pairs: list[tuple[str, str]], css: str) -> Table:
    return Table(["", ""], [[k, v] for k, v in pairs if v not in ("", "–")], css)


def environment_table(report: dict[str, Any]) -> Table:
    env = report.get("environment") or {}
    gflops = env.get("peak_gflops") or {}
    return _kv([
        ("CPU", str(env.get("cpu") or "unknown")), ("Architecture", str(env.get("arch") or "")),
        ("Cores", f"{num(env.get('cores'))} (usable {num(env.get('usable_cores'))})"),
        ("CPU flags", ", ".join(env.get("flags_enabled") or []) or "none detected"),
        ("OS", str(env.get("os") or "")), ("Python", str(env.get("python") or "")),
        ("torch", str(env.get("torch") or "")), ("onnxruntime", str(env.get("onnxruntime") or "")),
        ("Execution provider", str(env.get("execution_provider") or "")),
        ("Budget threads", str(env.get("threads") or "")),
        ("Peak GFLOP/s", ", ".join(f"{t} thread(s): {num(v, '{:.1f}')}" for t, v in gflops.items())),
        ("Fingerprint", str(env.get("fingerprint") or "")),
    ], "environment")


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
    return "–" if value is None else str(value)


def stage_sections(report: dict[str, Any]) -> list[Section]:
    out = []
    d = report.get("distill")
    if d:
        out.append(Section("Knowledge distillation", "distill", table=_kv([
            ("Teacher test accuracy", acc(d.get("teacher_accuracy"))),
            ("Student (KD) test accuracy", acc(d.get("student_accuracy"))),
            ("Baseline (no KD) test accuracy", acc(d.get("baseline_accuracy"))),
            ("KD gain vs baseline", num(d.get("kd_gain"), "{:+.4f}")),
            ("Student agreement with teacher", acc(d.get("student_agreement"))),
            ("Params teacher -> student", f"{num(d.get('teacher_params'))} -> {num(d.get('student_params'))}"),
        ], "kv")))
    p = report.get("pruning")
    if p:
        out.append(Section("Pruning", "pruning", table=_kv([
            ("Source / importance / target", f"{p.get('source')} / {p.get('importance')} / {_plain(p.get('target'))}"),
            ("Params", f"{num(p.get('params_before'))} -> {num(p.get('params_after'))} "
                       f"({num(p.get('params_kept'), '{:.0%}')} kept)"),
            ("MACs", f"{num(p.get('macs_before'))} -> {num(p.get('macs_after'))} ({num(p.get('macs_kept'), '{:.0%}')} kept)"),
            ("Accuracy before / after pruning / after recovery",
             f"{acc(p.get('accuracy_before_prune'))} / {acc(p.get('accuracy_after_prune'))} / "
             f"{acc(p.get('accuracy_after_recovery'))}"),
            ("Test accuracy", acc(p.get("test_accuracy"))),
        ], "kv")))
    choice = (d or {}).get("student_choice")
    if choice:
        out.append(student_choice_section(choice))
    latency = (p or {}).get("latency")
    if latency and latency.get("per_step"):
        out.append(latency_pruning_section(latency))
    if latency and latency.get("round_to_auto"):
        out.append(round_to_section(latency["round_to_auto"]))
    q = report.get("quantization")
    if q:
        chosen = q.get("chosen")
        chosen_text = _plain(chosen) if chosen else ""
        out.append(Section("Quantization", "quantization", table=_kv([
            ("Source -> artifact", f"{q.get('source')} -> {q.get('artifact_name')}"),
            ("Chosen settings", chosen_text),
            ("Attempts", str(len(q["attempts"])) if isinstance(q.get("attempts"), list) else ""),
            ("Accuracy drop vs fp32", num(q.get("accuracy_drop"), "{:.4f}")),
            ("Agreement with fp32", acc(q.get("agreement"))),
            ("Speed-up vs fp32", num(q.get("speedup_vs_fp32"), "{:.2f}x")),
            ("Deployable", "yes" if q.get("deployable", True) else f"no: {q.get('fallback_reason')}"),
        ], "kv")))
    return out


def runtimes_section(report: dict[str, Any]) -> Section | None:
    """Runtime x precision (ONNX Runtime / LiteRT / ExecuTorch, fp32 / int8) when the run exported for more
    than one runtime: accuracy, agreement, p50, size and the accuracy gate's verdict."""
    entries = report.get("runtimes") or []
    if len({e.get("runtime") for e in entries}) < 2:
        return None
    threads, batch = setting(report)
    deployed = report["deployed"]["artifact"]
    rows = [[e["runtime"], str(e.get("kind")), e["artifact"] + (" (deployed)" if e["artifact"] == deployed else ""),
             acc(e.get("accuracy")), acc(e.get("agreement")), ms(e.get("p50_ms")), kib(e.get("size_bytes")),
             "passed" if e.get("gate") in (None, "passed") else f"refused: {e['gate']}"] for e in entries]
    return Section("Runtimes", "runtimes",
                   [f"The same models on each runtime, measured in one interleaved loop on the same test images "
                    f"(p50 at {threads} thread(s), batch {batch}; LiteRT and ExecuTorch files take batch 1). Each "
                    "runtime's int8 file comes from its own quantizer on the same calibration images and passes "
                    "the same accuracy gate; report.deploy_runtime says which runtime is deployed."],
                   Table(["Runtime", "Precision", "Artifact", "Accuracy", "Agreement", "p50 ms", "Size", "Gate"],
                         rows, "runtimes"))


def student_choice_section(choice: dict[str, Any]) -> Section:
    """The candidates timed untrained before distillation, and which one was distilled and why."""
    decision = choice.get("decision") or {}
    rows = [[c["label"], num(c.get("params")), num(c.get("macs")), ms(c.get("fp32_p50_ms")), ms(c.get("int8_p50_ms")),
             ("yes (" + ", ".join(c.get("fits_in") or []) + ")") if c.get("fits") else "no",
             "distilled" if c["label"] == decision.get("chosen") else ""] for c in choice.get("candidates") or []]
    limits = ", ".join(f"{k} <= {v:.3f} ms" for k, v in (decision.get("limits_ms") or {}).items())
    settings = (choice.get("settings") or {}).get("latency") or {}
    text = [f"Each candidate exported untrained and timed on ONNX Runtime (fp32 and a quick int8, "
            f"{settings.get('threads', 1)} thread(s), batch {settings.get('batch', 1)}, interleaved"
            + (f" with the teacher: p50 {choice['teacher_p50_ms']:.3f} ms" if choice.get("teacher_p50_ms") else "")
            + f"); budget {limits}.", f"Chosen: {decision.get('reason', '–')}."]
    return Section("Student choice", "student-choice", text,
                   Table(["candidate", "params", "MACs", "fp32 p50 ms", "int8 p50 ms", "fits?", ""], rows,
                         "student-choice"))


def latency_pruning_section(latency: dict[str, Any]) -> Section:
    """MACs ratio vs measured latency ratio per pruning step: they differ (overheads do not shrink with MACs)."""
    rows = [[str(r["step"]), num(r.get("macs_speedup"), "{:.2f}x"), num(r.get("latency_speedup"), "{:.2f}x"),
             str(r.get("trials", ""))] for r in latency.get("per_step") or []]
    settings = latency.get("settings") or {}
    text = [f"Latency timed on ONNX Runtime in the loop ({settings.get('precision')}, {settings.get('threads')} "
            f"thread(s), batch {settings.get('batch')}, interleaved with the unpruned model). Final: "
            f"{num(latency.get('final_p50_ms'), '{:.4f}')} ms vs {num(latency.get('final_reference_p50_ms'), '{:.4f}')} ms"
            f" = {num(latency.get('speedup'), '{:.2f}x')} faster from {num(latency.get('macs_speedup'), '{:.2f}x')} "
            f"fewer MACs; goal {num(latency.get('goal_fraction'), '{:.3f}')} of the unpruned latency, "
            + ("reached within 10 %." if latency.get("reached") else "NOT reached within 10 %.")]
    return Section("Pruning to a latency target", "latency-pruning", text,
                   Table(["step", "MACs ratio", "latency ratio", "trials timed"], rows, "latency-pruning"))


def round_to_section(auto: dict[str, Any]) -> Section:
    rows = [[str(r["round_to"]), num(r.get("macs")), ms(r.get("p50_ms")), num(r.get("macs_per_ms")),
             "chosen" if r["round_to"] == auto.get("chosen") else ""] for r in auto.get("candidates") or []]
    return Section("Channel rounding (round_to: auto)", "round-to",
                   [f"The model pruned at channel ratio {auto.get('ratio')} with each rounding, timed side by side; "
                    f"rule: {auto.get('rule')}."],
                   Table(["round_to", "MACs", "p50 ms", "MACs per ms", ""], rows, "round-to"))
def _us(value: Any) -> str:
    return num(value, "{:,.1f}")


def profile_sections(report: dict[str, Any]) -> list[Section]:
    """Where the time goes per op type (ONNX Runtime's profiler), teacher / fp32 source / int8 side by side,
    and which kernel families int8 sped up or slowed down."""
    from edgekd.runtime.profile import family_table

    prof = report.get("profile")
    if not prof:
        return []
    names, profiles = prof["models"], prof["profiles"]
    label = {n: n + (" (deployed)" if n == prof.get("deployed") else "") for n in names}
    src, int8 = prof.get("int8_source"), prof.get("int8")
    compare = src in profiles and int8 in profiles
    families = family_table(profiles)
    rows = []
    for row in families:
        cells = [row["family"], *[_us(row[n]) for n in names]]
        if compare:
            before, after = row[src], row[int8]
            cells.append("int8 only" if before == 0 else "gone" if after == 0 else
                         "same" if abs(before / after - 1) < 0.02 else
                         f"{before / after:.2f}x faster" if after < before else f"{after / before:.2f}x slower")
        rows.append(cells)
    rows.append(["whole run (median)", *[_us(profiles[n]["run_us"]) for n in names],
                 *([f"{profiles[src]['run_us'] / profiles[int8]['run_us']:.2f}x"] if compare else [])])
    headers = ["kernel family (µs per run)", *[label[n] for n in names], *(["int8 vs fp32 source"] if compare else [])]
    sections = [Section("Per-operator profile", "profile",
                        [f"ONNX Runtime's own profiler, {prof.get('runs')} runs per model after the warm-up, median "
                         f"µs per run at the budgets' threads and batch; profiling adds a little time per kernel, "
                         f"so the latency figures above stay the reference. Q/DQ = QuantizeLinear/DequantizeLinear "
                         f"at float/int8 boundaries; layout reorder = NCHWc/NHWC conversions."],
                        Table(headers, rows, "profile"))]
    op_rows = []
    for n in names:
        for row in profiles[n]["op_types"]:
            op_rows.append([label[n], row["op_type"], num(row["nodes"]), _us(row["us"]), num(row["share"], "{:.0%}")])
    bullets = [f"{label[n]}: " + "; ".join(f"{node['op_type']} `{node['name']}` {_us(node['us'])} µs"
                                            for node in profiles[n]["nodes"][:5]) for n in names]
    sections.append(Section("Time per op type", "profile-ops", ["Slowest nodes per model below the table."],
                            Table(["model", "op type", "nodes", "µs per run", "share"], op_rows, "profile-ops"),
                            bullets))
    return sections


def mixed_precision_section(report: dict[str, Any]) -> Section | None:
    mixed = (report.get("quantization") or {}).get("mixed_precision")
    if not mixed:
        return None
    kept = mixed.get("kept_fp32") or []
    rows = [[f"`{k['node']}`", k.get("why", ""), num(k.get("error_recovered"), "{:.4f}"),
             num(k.get("accuracy_recovered"), "{:+.4f}"), _us(k.get("fp32_us")), _us(k.get("int8_us")),
             num(k.get("gain_us"), "{:+.1f}")] for k in kept]
    eight = [r["node"] for r in mixed.get("weight_ranges") or [] if r.get("eight_bit")]
    limits = f"accuracy drop <= {mixed.get('max_accuracy_drop')}" + (
        f", agreement >= {mixed['min_agreement']}" if mixed.get("min_agreement") is not None else "")
    text = [f"`quantize.mixed_precision: auto`: {len(kept)} of {mixed.get('nodes')} weighted nodes kept in float "
            f"({limits}: {'met' if mixed.get('met') else 'not met by any mix'}); searched in "
            f"{num(mixed.get('search_s'), '{:.1f}')} s over {num(mixed.get('candidates_quantized'))} quantized "
            f"candidate graphs, each measured whole (validation split, interleaved timing vs fp32).",
            "8-bit weights (instead of 7-bit) where they measurably lowered the logit error: "
            + (", ".join(f"`{n}`" for n in eight) if eight else "none") + "."]
    return Section("Mixed precision", "mixed-precision", text,
                   Table(["node kept fp32", "why", "logit error recovered", "accuracy recovered", "fp32 µs",
                          "int8 µs", "int8 gain µs"], rows, "mixed-precision") if rows else None)


def training_checks_section(report: dict[str, Any]) -> Section | None:
    """Eval-mode vs batch-statistics accuracy per trained model, shown when any of them disagree or sit at
    chance level (then the exported model does not do what training measured)."""
    checks = report.get("training_checks") or []
    if not any(c.get("message") for c in checks):
        return None
    rows = [[c["model"], acc(c.get("eval_accuracy")), acc(c.get("batch_stats_accuracy")), acc(c.get("chance")),
             "at chance" if c.get("at_chance") else "diverged" if c.get("diverged") else "ok"] for c in checks]
    return Section("Train-mode vs eval-mode accuracy", "training-checks",
                   ["Validation accuracy of each trained model in eval mode (BatchNorm running statistics, as "
                    "exported) and with per-batch statistics (train-mode BatchNorm)."],
                   Table(["model", "eval mode", "batch statistics", "chance", "verdict"], rows, "training-checks"))


def data_loading_section(report: dict[str, Any]) -> Section | None:
    """How long each training waited for its batches; shown for image files streamed from disk, or whenever
    the loader held training back."""
    loading = report.get("data_loading") or []
    if not any(row.get("streamed") or row.get("bottleneck") for row in loading):
        return None
    rows = [[row["training"], f"{row['wait_fraction']:.1%}" if row.get("wait_fraction") is not None else "",
             num(row.get("images_per_s")), num(row.get("num_workers")),
             "bottleneck" if row.get("bottleneck") else "ok"] for row in loading]
    advice = [row["advice"] for row in loading if row.get("advice")]
    return Section("Data loading", "data-loading",
                   ["Share of each training's step time spent waiting for the next batch (decoding and resizing "
                    "the image files in the loader's worker processes)."] + advice[:1],
                   Table(["training", "loader wait", "images/s", "workers", "verdict"], rows, "data-loading"))


def arm_section(report: dict[str, Any]) -> Section | None:
    arm = report.get("arm_check")
    if not arm:
        return None
    return Section("ARM (aarch64, emulated)", "arm", text=[f"{arm['label']}."], table=_kv([
        ("Status", f"{arm.get('status')}" + (f" ({arm['reason']})" if arm.get("reason") else "")),
        ("Top-1 agreement with x86", acc(arm.get("agreement"))),
        ("Max abs logit difference", num(arm.get("max_abs_diff"), "{:.3g}")),
        ("Accuracy aarch64 / x86", f"{acc(arm.get('arm_accuracy'))} / {acc(arm.get('x86_accuracy'))}"),
        ("Samples", num(arm.get("samples"))),
        ("onnxruntime (aarch64)", str(arm.get("onnxruntime_version") or "")),
        ("Emulated CPU", str(arm.get("cpu") or "")),
    ], "kv"))


def devices_section(report: dict[str, Any]) -> Section | None:
    rows = []
    for device in report.get("devices") or []:
        for r in device.get("artifacts") or []:
            for e in r.get("latency_ms") or []:
                rows.append([str(device.get("label")), str(r.get("artifact") or r.get("name")), num(e.get("threads")),
                             num(e.get("batch")), ms(e.get("p50")), ms(e.get("p90")), ms(e.get("p99")),
                             acc(r.get("accuracy")), mib(r.get("peak_memory_bytes"))])
    if not rows:
        return None
    return Section("Measured on devices", "devices", text=["Merged with `edgekd report RUN_DIR --merge device.json`."],
                   table=Table(["Device", "Artifact", "Threads", "Batch", "p50 ms", "p90 ms", "p99 ms", "Accuracy",
                                "Peak memory"], rows, "devices"))
