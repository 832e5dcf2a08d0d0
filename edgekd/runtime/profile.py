"""Per-operator profile of one model from ONNX Runtime's own profiler (numpy + onnxruntime only).

ONNX Runtime writes a Chrome-trace JSON when `SessionOptions.enable_profiling` is on: one "Session" event
`model_run` per `session.run`, and one "Node" event `<node>_kernel_time` per kernel executed inside it, with
`args.op_name` (the kernel that really ran after graph optimization: QLinearConv, FusedConv, ReorderOutput...)
and its duration in microseconds. The profiler cannot be paused, so the warm-up runs are recorded too; they
are dropped here by keeping only the node events inside the last `runs` model_run windows.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import RuntimeInputError
from .session import check_input, open_session

# Kernel families, so an fp32 graph and its int8 twin can be compared op by op (Conv vs QLinearConv).
OP_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger", "NhwcConv"), "conv"),
    **dict.fromkeys(("Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulInteger",
                     "MatMulIntegerToFloat", "DynamicQuantizeMatMul"), "matmul"),
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"), "quantize/dequantize"),
    **dict.fromkeys(("ReorderInput", "ReorderOutput", "Transpose"), "layout reorder"),
    **dict.fromkeys(("MaxPool", "NhwcMaxPool", "AveragePool", "QLinearAveragePool", "GlobalAveragePool",
                     "QLinearGlobalAveragePool", "GlobalMaxPool"), "pooling"),
    **dict.fromkeys(("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "QLinearSigmoid", "QLinearLeakyRelu",
                     "LeakyRelu", "Add", "QLinearAdd", "Mul", "QLinearMul"), "elementwise"),
}
_SUFFIXES = re.compile(r"(_kernel_time)$")
_TOKEN = re.compile(r"_token_\d+$")


def op_family(op_type: str) -> str:
    return OP_FAMILIES.get(op_type, "other")


def kernel_name(event_name: str) -> str:
    """'/conv1/Conv_token_3_kernel_time' -> '/conv1/Conv_token_3' (the executed node's name)."""
    return _SUFFIXES.sub("", event_name)


def source_name(node_name: str) -> str:
    """Best guess of the graph node an executed kernel came from: ORT appends `_token_N` to nodes its
    transformers create from a node, and `_nchwc` (after the fused output's name) to NCHWc convolutions."""
    name = _TOKEN.sub("", node_name)
    for suffix in ("_nchwc",):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def parse_trace(events: Iterable[Mapping[str, Any]], runs: int) -> dict[str, Any]:
    """Per node and per op type microseconds per run, over the last `runs` model_run windows.

    Each node's time is its median over the runs (a shared machine's preemptions hit single runs; the median
    ignores them), `mean_us` its mean. Returns {"runs", "run_us" (median model_run duration), "node_us" (sum
    of the node medians: the part of a run spent inside kernels), "op_types": [{op_type, family, nodes, us, share}], "nodes": [{name, op_type,
    provider, us}]}, both lists sorted by time, slowest first.
    """
    events = list(events)
    windows = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")
    if runs < 1:
        raise RuntimeInputError(f"runs must be >= 1, got {runs}")
    if len(windows) < runs:
        raise RuntimeInputError(f"the profile holds {len(windows)} runs, fewer than the {runs} asked for")
    windows = windows[-runs:]
    starts = np.array([w[0] for w in windows])
    ends = np.array([w[1] for w in windows])
    per_node: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        ts = float(event["ts"])
        slot = int(np.searchsorted(starts, ts, side="right")) - 1
        if slot < 0 or ts > ends[slot]:
            continue  # a warm-up run (or session set-up)
        name = kernel_name(event["name"])
        args = event.get("args") or {}
        entry = per_node.setdefault(name, {"name": name, "op_type": args.get("op_name", "?"),
                                           "provider": args.get("provider", ""), "per_run": np.zeros(runs),
                                           "order": len(per_node)})
        entry["per_run"][slot] += float(event["dur"])  # a node can run more than once per run (loops)
    nodes = [{"name": e["name"], "op_type": e["op_type"], "provider": e["provider"].replace("ExecutionProvider", ""),
              "us": float(np.median(e["per_run"])), "mean_us": float(np.mean(e["per_run"])), "order": e["order"]}
             for e in per_node.values()]
    node_us = sum(n["us"] for n in nodes)
    by_type: dict[str, dict[str, Any]] = defaultdict(lambda: {"nodes": 0, "us": 0.0})
    for node in nodes:
        by_type[node["op_type"]]["nodes"] += 1
        by_type[node["op_type"]]["us"] += node["us"]
    op_types = [{"op_type": op, "family": op_family(op), "nodes": v["nodes"], "us": v["us"],
                 "share": v["us"] / node_us if node_us > 0 else 0.0} for op, v in by_type.items()]
    return {"runs": runs, "run_us": float(np.median(ends - starts)), "node_us": node_us,
            "op_types": sorted(op_types, key=lambda r: -r["us"]),
            "nodes": sorted(nodes, key=lambda n: -n["us"])}


def profile_model(model_path: str | os.PathLike, inputs: np.ndarray | Mapping[str, np.ndarray], threads: int = 1,
                  warmup: int = 10, runs: int = 50, providers: Sequence[str] | None = None) -> dict[str, Any]:
    """Run `model_path` warmup + runs times with ONNX Runtime's profiler on; parse_trace() of the timed runs.

    The trace file goes to a temporary folder and is deleted; profiling adds a little time per kernel, so
    these figures explain where time goes, while the interleaved benchmark gives the latency itself.
    """
    if runs < 1 or warmup < 0:
        raise RuntimeInputError(f"profile runs must be >= 1 and warm-up >= 0, got {runs} and {warmup}")
    with tempfile.TemporaryDirectory(prefix="edgekd-profile-") as folder:
        session = open_session(model_path, threads=threads, providers=providers,
                               profile_prefix=str(Path(folder) / "ort"))
        feed = check_input(session, inputs)
        for _ in range(warmup + runs):
            session.run(None, feed)
        trace_path = session.end_profiling()
        with open(trace_path, encoding="utf-8") as handle:
            events = json.load(handle)
    result = parse_trace(events, runs)
    result.update(threads=threads, warmup=warmup, batch=int(np.asarray(next(iter(feed.values()))).shape[0]))
    return result


def family_table(profiles: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows {family, <label>: us, ...} for several profiles side by side (mean us per run), slowest first."""
    families: dict[str, dict[str, float]] = defaultdict(dict)
    for label, profile in profiles.items():
        for row in profile["op_types"]:
            families[row["family"]][label] = families[row["family"]].get(label, 0.0) + row["us"]
    rows = [{"family": family, **{label: values.get(label, 0.0) for label in profiles}}
            for family, values in families.items()]
    return sorted(rows, key=lambda r: -max(r[label] for label in profiles))


def format_profile(profile: Mapping[str, Any], top: int = 10) -> str:
    """Console view: time per op type, then the slowest nodes."""
    lines = [f"profile  {profile['runs']} runs after {profile.get('warmup', '?')} warm-up: {profile['run_us']:.1f} us "
             f"per run, {profile['node_us']:.1f} us inside kernels",
             f"{'op type':<28} {'nodes':>5} {'us/run':>9} {'share':>6}"]
    for row in profile["op_types"]:
        lines.append(f"{row['op_type']:<28} {row['nodes']:>5} {row['us']:>9.1f} {row['share']:>6.1%}")
    lines += ["", f"slowest nodes (of {len(profile['nodes'])})"]
    for node in profile["nodes"][:top]:
        lines.append(f"  {node['us']:>9.1f} us  {node['op_type']:<24} {node['name']}")
    return "\n".join(lines)
