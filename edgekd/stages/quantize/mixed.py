"""Per-layer int8 sensitivity and automatic mixed precision (`quantize.mixed_precision: auto`).

Everything is measured, never summed from parts:
- time gain of each weighted node: ONNX Runtime's per-kernel profile of the fp32 graph and of the all-int8 graph,
  each kernel attributed to the weighted node it came from (an int8 node also pays for the Quantize/Dequantize
  kernels at its float boundaries);
- weight range per layer: 7-bit weights (reduce_range) avoid u8 x s8 saturation on x86 without VNNI but cost a
  bit of precision everywhere; each layer is tried with 8-bit weights alone, and keeps them where the logit error
  on the validation split goes down;
- sensitivity of each node: the validation logit error / accuracy / agreement with fp32 of the all-int8 graph
  with only that node kept in float (how much keeping it float recovers);
- the search: start from all-int8, keep in float the nodes int8 makes slower (if the candidate graph is measured
  faster), then the nodes that recover the most error per microsecond of int8 gain, one at a time, each candidate
  graph quantized and measured (QDQ propagation moves Q/DQ pairs when a node stays float), until the accuracy
  drop (and agreement floor) hold; then nodes that turned out not to be needed are given back to int8. The
  fastest measured candidate within the limits wins.

The measurements come from a `Measurer` (quantize + evaluate on the validation split + interleaved timing vs
fp32); tests inject a deterministic one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.stages.quantize.quantization import QuantSettings, graph_nodes

log = logging.getLogger("edgekd")

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_PASS_THROUGH = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization")
PAIR_THRESHOLD = 0.01  # pairs are measured when no single node recovers more than 1 % of the logit error
RACE_FINALISTS = 3  # candidates within the limits re-timed head to head at the end
WEIGHT_RANGE_GAIN = 0.02  # 8-bit weights kept for a layer only when they cut the logit error by more than 2 %


class Measurer(Protocol):
    def accuracy(self, settings: QuantSettings) -> dict[str, float]:
        """{accuracy_drop, agreement, logit_error} of the quantized candidate on the validation split."""

    def latency(self, settings: QuantSettings) -> dict[str, float]:
        """{p50_ms, p50_ms_fp32, speedup} of the candidate vs its fp32 source, timed side by side."""


def quantizable_nodes(path: str | Path) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes whose weight is an initializer (what int8 changes), graph order."""
    nodes = graph_nodes(path)
    import onnx

    initializers = {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}
    return [n.name for n in nodes if n.op_type in WEIGHTED_OPS and n.name and len(n.input) > 1
            and n.input[1] in initializers]


def weight_names(path: str | Path) -> dict[str, str]:
    """node name -> its weight initializer's name (for per-layer TensorQuantOverrides)."""
    return {n.name: n.input[1] for n in graph_nodes(path) if n.op_type in WEIGHTED_OPS and len(n.input) > 1}


# --------------------------------------------------------------------------------------------------
# Time per weighted node, from the per-kernel profiles


def attribute_kernels(profile_nodes: Sequence[Mapping[str, Any]], graph_path: str | Path) -> dict[str, float]:
    """Weighted node name -> microseconds of the executed kernels it accounts for.

    ORT renames what it fuses: `<node>_token_N` (QDQ -> QLinearConv), `<fused output>_nchwc` (Conv+Relu in
    NCHWc), plain node names otherwise. A kernel is traced back to a graph node (by name, else by the tensor it
    is named after), then through activations to the Conv/Gemm feeding it; a QuantizeLinear counts for the
    weighted node it feeds, a DequantizeLinear for the one it comes from. Other kernels (reorders, pools) stay
    unattributed: they show in the op-type table.
    """
    from edgekd.runtime.profile import source_name

    nodes = graph_nodes(graph_path)
    by_name = {n.name: n for n in nodes}
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for tensor in n.input:
            consumers.setdefault(tensor, []).append(n)

    def upstream(node: Any, hops: int = 6) -> Any | None:
        while node is not None and hops > 0:
            if node.op_type in WEIGHTED_OPS:
                return node
            if node.op_type not in (*_PASS_THROUGH, "QuantizeLinear", "DequantizeLinear") or not node.input:
                return None
            node, hops = producer.get(node.input[0]), hops - 1
        return None

    def downstream(node: Any, hops: int = 3) -> Any | None:
        while node is not None and hops > 0:
            if node.op_type in WEIGHTED_OPS:
                return node
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                return None
            following = consumers.get(node.output[0], [])
            node, hops = (following[0] if len(following) == 1 else None), hops - 1
        return None

    times: dict[str, float] = {}
    for kernel in profile_nodes:
        base = source_name(str(kernel["name"]))
        node = by_name.get(base) or producer.get(base) or producer.get(base + "_output_0")
        if node is None:
            continue
        target = downstream(node) if node.op_type == "QuantizeLinear" else upstream(node)
        if target is not None and target.name:
            times[target.name] = times.get(target.name, 0.0) + float(kernel["us"])
    return times


def node_time_gains(fp32_profile: Mapping[str, Any], fp32_graph: str | Path, int8_profile: Mapping[str, Any],
                    int8_graph: str | Path, nodes: Sequence[str]) -> dict[str, dict[str, float]]:
    """node -> {fp32_us, int8_us, gain_us} (gain < 0: int8 makes this node slower)."""
    fp32 = attribute_kernels(fp32_profile["nodes"], fp32_graph)
    int8 = attribute_kernels(int8_profile["nodes"], int8_graph)
    gains = {}
    for name in nodes:
        if name in fp32 or name in int8:
            f, q = fp32.get(name, 0.0), int8.get(name, 0.0)
            gains[name] = {"fp32_us": f, "int8_us": q, "gain_us": f - q}
    return gains


# --------------------------------------------------------------------------------------------------
# Per-layer weight range and sensitivity


def with_weight_range(settings: QuantSettings, overrides: Mapping[str, bool]) -> QuantSettings:
    merged = dict(settings.weight_range_overrides)
    merged.update(overrides)
    return replace(settings, weight_range_overrides=tuple(sorted(merged.items())))


def choose_weight_ranges(base: QuantSettings, nodes: Sequence[str], measurer: Measurer,
                         reference_error: float) -> tuple[QuantSettings, list[dict[str, Any]]]:
    """Per layer, 7-bit (reduce_range) or 8-bit weights, by the measured validation logit error.

    Only meaningful when the base uses 7-bit weights (x86 without VNNI); each node is tried with 8-bit weights
    alone; the ones that cut the error are combined, and the combination kept only if it is measured better.
    """
    rows: list[dict[str, Any]] = []
    if not base.reduce_range:
        return base, rows
    better = []
    log.info("  mixed precision: trying 8-bit weights layer by layer (%d graphs, one per weighted node)", len(nodes))
    started = time.perf_counter()
    for index, name in enumerate(nodes, start=1):
        result = measurer.accuracy(with_weight_range(base, {name: False}))
        helps = result["logit_error"] < reference_error * (1 - WEIGHT_RANGE_GAIN)
        _progress("8-bit weights", index, len(nodes), started, name, result["logit_error"], helps)
        rows.append({"node": name, "logit_error_8bit": result["logit_error"], "logit_error_7bit": reference_error,
                     "accuracy_drop_8bit": result["accuracy_drop"], "eight_bit": helps})
        if helps:
            better.append((result["logit_error"], name))
    if not better:
        return base, rows
    combined = with_weight_range(base, {name: False for _, name in better})
    result = measurer.accuracy(combined)
    if len(better) > 1 and result["logit_error"] >= min(better)[0]:  # the layers interact: keep the best one alone
        best = min(better)[1]
        combined = with_weight_range(base, {best: False})
        for row in rows:
            row["eight_bit"] = row["node"] == best
    return combined, rows


def _progress(what: str, index: int, total: int, started: float, node: str, error: float, helps: bool) -> None:
    """One log line per node measured, with the time left at this pace: these loops run a quantization and a
    validation pass per weighted node, minutes on a large model."""
    elapsed = time.perf_counter() - started
    left = elapsed / index * (total - index)
    log.info("    %d/%d %s %s: logit error %.4f%s (%.0f s, ~%.0f s left)", index, total, node, what, error,
             " (better)" if helps else "", elapsed, left)


def sensitivities(base: QuantSettings, nodes: Sequence[str], measurer: Measurer,
                  reference: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per node, the all-int8 graph with only that node kept in float: what it recovers vs all-int8.

    Sorted most sensitive first (largest logit-error recovery, then accuracy recovery).
    """
    rows = []
    log.info("  mixed precision: per-node sensitivity (%d graphs, each with one node kept in float)", len(nodes))
    started = time.perf_counter()
    for index, name in enumerate(nodes, start=1):
        result = measurer.accuracy(replace(base, exclude_nodes=tuple(dict.fromkeys((*base.exclude_nodes, name)))))
        _progress("float", index, len(nodes), started, name, result["logit_error"],
                  result["logit_error"] < reference["logit_error"])
        rows.append({"node": name, "logit_error": result["logit_error"], "accuracy_drop": result["accuracy_drop"],
                     "agreement": result["agreement"],
                     "error_recovered": reference["logit_error"] - result["logit_error"],
                     "accuracy_recovered": reference["accuracy_drop"] - result["accuracy_drop"]})
    return sorted(rows, key=lambda r: (-r["error_recovered"], -r["accuracy_recovered"]))


# --------------------------------------------------------------------------------------------------
# The search


def meets(row: Mapping[str, float], max_drop: float, min_agreement: float | None) -> bool:
    return row["accuracy_drop"] <= max_drop and (min_agreement is None or row["agreement"] >= min_agreement)


def search_mixed_precision(base: QuantSettings, nodes: Sequence[str], measurer: Measurer,
                           gains: Mapping[str, Mapping[str, float]], max_drop: float,
                           min_agreement: float | None = None, max_steps: int = 16,
                           clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Greedy, measured search for the fastest mix of int8 and float nodes within the accuracy limits.

    Returns {"settings" (the chosen QuantSettings), "chosen" (its measured row), "kept_fp32" ([{node, why,
    error_recovered, gain_us, ...}]), "weight_ranges" (per-layer rows), "sensitivity", "steps" (every
    candidate graph measured), "met" (limits held), "search_s"}.
    """
    start = clock()
    steps: list[dict[str, Any]] = []
    settings_of: list[QuantSettings] = []

    def measure(settings: QuantSettings, what: str) -> dict[str, Any]:
        row = {"step": len(steps), "what": what, "kept_fp32": list(settings.exclude_nodes),
               "eight_bit_weights": [n for n, reduce in settings.weight_range_overrides if not reduce],
               **measurer.accuracy(settings), **measurer.latency(settings)}
        row["meets"] = meets(row, max_drop, min_agreement)
        steps.append(row)
        settings_of.append(settings)
        log.info("  mixed precision step %d (%s): drop %+.4f agreement %.4f logit error %.4f x%.2f vs fp32",
                 row["step"], what, row["accuracy_drop"], row["agreement"], row["logit_error"], row["speedup"])
        return row

    reference = measurer.accuracy(base)
    current, weight_rows = choose_weight_ranges(base, nodes, measurer, reference["logit_error"])
    row = measure(current, "all int8" + (" with per-layer weight range" if weight_rows else ""))
    sens = sensitivities(current, nodes, measurer, row)
    sensitivity = {r["node"]: r for r in sens}
    why: dict[str, str] = {}

    slower = [n for n in nodes if n in gains and gains[n]["gain_us"] <= 0]
    if slower and len(steps) < max_steps:
        candidate = replace(current, exclude_nodes=tuple(dict.fromkeys((*current.exclude_nodes, *slower))))
        trial = measure(candidate, f"keep {len(slower)} node(s) int8 makes slower in float")
        why.update({n: "int8 slower" for n in slower})  # the reason, should the final race pick this graph
        if trial["speedup"] >= row["speedup"]:  # the whole graph measured faster, not just the sum of parts
            current, row = candidate, trial

    def score(names: tuple[str, ...]) -> float:
        recovered = max(pair_recovery.get(names, sensitivity[names[0]]["error_recovered"]), 0.0)
        gain = max(sum(gains.get(n, {}).get("gain_us", 1.0) for n in names), 1.0)  # unknown gain: as if 1 us
        return recovered / gain

    # When no node recovers anything alone (an activation between two weighted nodes stays quantized unless
    # both are float: QDQ propagation), measure producer/consumer pairs too.
    pair_recovery: dict[tuple[str, ...], float] = {}
    pairs: list[dict[str, Any]] = []
    units: list[tuple[str, ...]] = [(n,) for n in nodes if n not in current.exclude_nodes]
    if not meets(row, max_drop, min_agreement) and len(units) > 1 and \
            max(sensitivity[u[0]]["error_recovered"] for u in units) <= PAIR_THRESHOLD * row["logit_error"]:
        for first, second in zip(units, units[1:]):
            pair = (first[0], second[0])
            result = measurer.accuracy(replace(current, exclude_nodes=(*current.exclude_nodes, *pair)))
            pair_recovery[pair] = row["logit_error"] - result["logit_error"]
            pairs.append({"nodes": list(pair), "error_recovered": pair_recovery[pair],
                          "accuracy_drop": result["accuracy_drop"], "agreement": result["agreement"]})
        units = [p for p in pair_recovery if pair_recovery[p] > 0] + units
    remaining = sorted(units, key=score, reverse=True)
    while not meets(row, max_drop, min_agreement) and remaining and len(steps) < max_steps:
        unit = [n for n in remaining.pop(0) if n not in current.exclude_nodes]
        if not unit:
            continue
        current = replace(current, exclude_nodes=(*current.exclude_nodes, *unit))
        row = measure(current, f"keep {' and '.join(unit)} in float")
        why.update({n: "accuracy" for n in unit})

    # Give back to int8 the accuracy-driven nodes that turned out not to be needed (latest first).
    if meets(row, max_drop, min_agreement):
        for name in [n for n in reversed(current.exclude_nodes) if why.get(n) == "accuracy"][1:]:
            if len(steps) >= max_steps:
                break
            candidate = replace(current, exclude_nodes=tuple(n for n in current.exclude_nodes if n != name))
            trial = measure(candidate, f"give {name} back to int8")
            if trial["meets"] and trial["speedup"] >= row["speedup"]:
                current, row = candidate, trial

    within = [i for i, s in enumerate(steps) if s["meets"]]
    race: list[dict[str, Any]] = []
    if within:
        best = max(within, key=lambda i: steps[i]["speedup"])
        # Each step was timed against fp32 at a different moment; on a noisy machine, settle the fastest few
        # distinct candidates within the limits head to head, in one interleaved run.
        distinct = list({settings_of[i].key(): i for i in sorted(within, key=lambda i: steps[i]["speedup"])}.values())
        finalists = sorted(distinct, key=lambda i: -steps[i]["speedup"])[:RACE_FINALISTS]
        if len(finalists) > 1 and hasattr(measurer, "race"):
            p50s = measurer.race([settings_of[i] for i in finalists])
            race = [{"step": i, "p50_ms": p50} for i, p50 in zip(finalists, p50s)]
            best = finalists[int(np.argmin(p50s))]
    else:
        best = min(range(len(steps)), key=lambda i: (steps[i]["accuracy_drop"], -steps[i]["agreement"]))
    chosen = settings_of[best]
    kept = [{"node": n, "why": "configured" if n in base.exclude_nodes else why.get(n, "configured"),
             "error_recovered": sensitivity.get(n, {}).get("error_recovered"),
             "accuracy_recovered": sensitivity.get(n, {}).get("accuracy_recovered"),
             **{k: v for k, v in gains.get(n, {}).items()}} for n in chosen.exclude_nodes]
    return {"settings": chosen, "chosen": steps[best], "kept_fp32": kept, "weight_ranges": weight_rows,
            "sensitivity": sens, "pairs": pairs, "steps": steps, "race": race, "met": bool(within), "search_s": clock() - start,
            "reference": reference}


# --------------------------------------------------------------------------------------------------
# The real measurements


def logits_of(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    from edgekd.runtime.evaluate import predict_logits
    from edgekd.runtime.session import open_session

    return predict_logits(open_session(path, threads=1), inputs, batch_size=256)


class OrtMeasurer:
    """Quantizes candidates with onnxruntime.quantization and measures them on the validation split (accuracy,
    agreement with fp32, mean absolute logit error vs fp32) and side by side with fp32 (p50, batch 1, 1 thread).
    Each candidate is quantized once (files cached by recipe)."""

    def __init__(self, fp32: Path, pre: Path, work: Path, reader: Any, cache: Any, inputs: np.ndarray,
                 labels: np.ndarray, iterations: int = 100) -> None:
        self.fp32, self.pre, self.work, self.reader, self.cache = fp32, pre, work, reader, cache
        self.inputs, self.labels, self.iterations = inputs, labels, iterations
        self.fp32_logits = logits_of(fp32, inputs)
        self.fp32_pred = self.fp32_logits.argmax(axis=-1)
        self.fp32_accuracy = float(np.mean(self.fp32_pred == labels))
        self.files: dict[tuple, Path] = {}
        self.accuracies: dict[tuple, dict[str, float]] = {}
        self.latencies: dict[tuple, dict[str, float]] = {}

    def file(self, settings: QuantSettings) -> Path:
        from edgekd.stages.quantize.quantization import quantize_model

        key = settings.key()
        if key not in self.files:
            target = self.work / f"mixed{len(self.files)}.onnx"
            quantize_model(self.pre, target, settings, self.reader, self.cache)
            self.files[key] = target
        return self.files[key]

    def accuracy(self, settings: QuantSettings) -> dict[str, float]:
        key = settings.key()
        if key not in self.accuracies:
            logits = logits_of(self.file(settings), self.inputs)
            predicted = logits.argmax(axis=-1)
            self.accuracies[key] = {
                "accuracy_drop": self.fp32_accuracy - float(np.mean(predicted == self.labels)),
                "agreement": float(np.mean(predicted == self.fp32_pred)),
                "logit_error": float(np.mean(np.abs(logits - self.fp32_logits)))}
        return self.accuracies[key]

    def race(self, candidates: Sequence[QuantSettings]) -> list[float]:
        """p50 ms of several candidates timed together (interleaved, batch 1, 1 thread)."""
        from edgekd.runtime.timing import interleaved_benchmark

        models = {f"candidate{i}": self.file(c) for i, c in enumerate(candidates)}
        rows = interleaved_benchmark(models, {1: self.inputs[:1]}, [1], warmup=10, iterations=2 * self.iterations,
                                     chunk=10)
        return [rows[label][0]["p50"] for label in models]

    def latency(self, settings: QuantSettings) -> dict[str, float]:
        from edgekd.stages.quantize.quantization import time_pair

        key = settings.key()
        if key not in self.latencies:
            self.latencies[key] = time_pair(self.fp32, self.file(settings), self.inputs, self.iterations)
        return self.latencies[key]


def profile_gains(fp32: Path, int8: Path, sample: np.ndarray, nodes: Sequence[str], runs: int = 30) -> dict[str, Any]:
    """Per-kernel profiles of fp32 and all-int8 (batch 1, 1 thread) and each node's time gain from int8."""
    from edgekd.runtime.profile import profile_model

    fp32_profile = profile_model(fp32, sample[:1], threads=1, warmup=10, runs=runs)
    int8_profile = profile_model(int8, sample[:1], threads=1, warmup=10, runs=runs)
    return {"gains": node_time_gains(fp32_profile, fp32, int8_profile, int8, nodes),
            "fp32_us": fp32_profile["run_us"], "int8_us": int8_profile["run_us"]}
