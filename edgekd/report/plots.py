"""The report's plots, drawn from report.json alone with matplotlib's Agg canvas (no display, no pyplot
global state, so it is safe inside the pipeline and in tests)."""

from __future__ import annotations

import io
from typing import Any

from edgekd.gate.budgets import find_row, latency_at
from edgekd.stages.export import MODEL_ORDER
from edgekd.stages.quantize import MODELS

PLOTS = {
    "accuracy_vs_latency": "Accuracy vs p50 latency",
    "size": "Model file size",
    "latency_distribution": "Latency distribution",
    "runtimes": "Runtime x precision: accuracy, p50, size",
}
RUNTIME_COLORS = {"onnxruntime": "#1f77b4", "litert": "#ff7f0e", "executorch": "#2ca02c"}
COLORS = dict(zip((*MODEL_ORDER, *MODELS.values()), ("#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b")))


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return buffer.getvalue()


def _color(name: str) -> str:
    return COLORS.get(name, "#17becf")


def _setting(report: dict[str, Any]) -> tuple[int, int]:
    settings = report.get("budget_settings") or {}
    return settings.get("latency_threads", 1), settings.get("latency_batch", 1)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another one that is both faster (lower x) and at least as accurate (higher y)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def accuracy_vs_latency(report: dict[str, Any]) -> bytes:
    figure, _ = accuracy_vs_latency_figure(report)
    return _png(figure)


# Where a point's name may go, in points from the point (dx, dy, horizontal alignment), nearest first; the
# farther rings get a thin leader line back to the point.
_LABEL_OFFSETS = [(6, 5, "left"), (6, -12, "left"), (-6, 5, "right"), (-6, -12, "right"), (0, 9, "center"),
                  (0, -17, "center")]
_LABEL_RINGS = (1, 2, 3, 4.5)


def accuracy_vs_latency_figure(report: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The accuracy-vs-latency figure and its point labels (matplotlib Annotations, placed so none overlaps
    another label or a point, inside the axes). Latency is on a log axis when it spans more than 4x, so small
    models do not pile up at the left edge next to a slow teacher."""
    threads, batch = _setting(report)
    figure = _figure(7.4, 4.2)
    axes = figure.add_subplot()
    points: list[tuple[float, float]] = []
    named: list[tuple[str, float, float]] = []
    for row in report["artifacts"]:
        entry = latency_at(row, threads, batch)
        if not entry or not isinstance(row.get("accuracy"), (int, float)):
            continue
        x, y = entry["p50"], row["accuracy"]
        points.append((x, y))
        named.append((row["name"], x, y))
        teacher = row["name"] == MODEL_ORDER[0]
        axes.scatter([x], [y], s=160 if teacher else 60, marker="*" if teacher else "o", color=_color(row["name"]),
                     zorder=3, label=row["name"] + (" (reference)" if teacher else ""))
    deployed = find_row(report, (report.get("deployed") or {}).get("artifact", ""))
    entry = latency_at(deployed, threads, batch)
    if entry and isinstance(deployed.get("accuracy"), (int, float)):
        axes.scatter([entry["p50"]], [deployed["accuracy"]], s=320, facecolors="none", edgecolors="black",
                     linewidths=1.5, zorder=4, label="deployed")
    front = pareto_front(points)
    if len(front) > 1:
        axes.plot([p[0] for p in front], [p[1] for p in front], "--", color="black", linewidth=1, alpha=0.6,
                  drawstyle="steps-post", zorder=2, label="Pareto front")
    settings = report.get("budget_settings") or {}
    if settings.get("latency_p50_ms"):
        axes.axvline(settings["latency_p50_ms"], color="#ff7f0e", linestyle=":", label="p50 budget")
    if settings.get("min_accuracy") is not None:
        axes.axhline(settings["min_accuracy"], color="#ff7f0e", linestyle="-.", label="min accuracy")
    log_scale = len(points) > 1 and min(p[0] for p in points) > 0 and max(p[0] for p in points) > 4 * min(p[0] for p in points)
    if log_scale:
        from matplotlib.ticker import FuncFormatter

        axes.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axes.margins(x=0.18, y=0.15)  # room for the point labels
    axes.set_xlabel(f"p50 latency (ms, {'log scale' if log_scale else 'linear'}), {threads} thread(s), batch {batch}")
    axes.set_ylabel("test accuracy")
    axes.set_title("Accuracy vs latency (up and left is better)")
    axes.grid(True, which="both" if log_scale else "major", alpha=0.3)
    labels: list[Any] = []
    if points:  # the legend sits outside the axes: it never hides a point or a label
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        labels = _place_labels(figure, axes, named)
    else:
        axes.text(0.5, 0.5, "no latency measured at this setting", ha="center", transform=axes.transAxes)
    return figure, labels


def _place_labels(figure: Any, axes: Any, named: list[tuple[str, float, float]]) -> list[Any]:
    """Annotate each point with its name at the first candidate offset whose text box overlaps no label
    placed before, no point and stays inside the axes (the least-overlapping candidate when none is free)."""
    from matplotlib.transforms import Bbox

    figure.canvas.draw()  # final layout and limits: display coordinates are now what the PNG shows
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    scale = figure.dpi / 72.0
    markers = [Bbox.from_bounds(px - 5 * scale, py - 5 * scale, 10 * scale, 10 * scale)
               for px, py in (axes.transData.transform((x, y)) for _, x, y in named)]
    placed: list[Any] = []
    boxes: list[Any] = []

    def overlap(a: Any, b: Any) -> float:
        width = min(a.x1, b.x1) - max(a.x0, b.x0)
        height = min(a.y1, b.y1) - max(a.y0, b.y0)
        return width * height if width > 0 and height > 0 else 0.0

    for index, (name, x, y) in sorted(enumerate(named), key=lambda item: (item[1][1], -item[1][2])):
        best = None
        for ring in _LABEL_RINGS:
            for dx, dy, align in _LABEL_OFFSETS:
                offset = (dx * ring, dy + (ring - 1) * (8 if dy > 0 else -8))
                label = axes.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=8,
                                      ha=align, zorder=5, annotation_clip=False,
                                      arrowprops={"arrowstyle": "-", "color": "#59636e", "linewidth": 0.6,
                                                  "shrinkA": 0, "shrinkB": 4} if ring > 1 else None)
                label.set_in_layout(False)
                box = label.get_window_extent(renderer).padded(1.5 * scale)
                outside = 0.0 if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) else 1e9
                cost = outside + sum(overlap(box, other) for other in boxes) + sum(
                    overlap(box, marker) for i, marker in enumerate(markers) if i != index)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, label, box)
                else:
                    label.remove()
                if best[0] == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        placed.append(best[1])
        boxes.append(best[2])
    return placed


def size(report: dict[str, Any]) -> bytes:
    rows = [r for r in report["artifacts"] if isinstance(r.get("size_bytes"), (int, float))]
    figure = _figure(6.4, 0.5 + 0.45 * max(len(rows), 2))
    axes = figure.add_subplot()
    names = [r["name"] for r in rows]
    kib = [r["size_bytes"] / 1024 for r in rows]
    bars = axes.barh(names, kib, color=[_color(n) for n in names])
    axes.bar_label(bars, labels=[f"{v:,.1f} KiB" for v in kib], fontsize=8, padding=3)
    limit = (report.get("budget_settings") or {}).get("size_kb")
    if limit:
        axes.axvline(limit, color="#ff7f0e", linestyle=":", label=f"size budget {limit:g} KiB")
        axes.legend(fontsize=7, loc="lower right")
    axes.invert_yaxis()
    axes.set_xlabel("file size (KiB)")
    axes.set_title("Model file size per artifact")
    axes.set_xlim(0, max(kib + [limit or 0, 1]) * 1.25)
    axes.grid(True, axis="x", alpha=0.3)
    return _png(figure)


def latency_distribution(report: dict[str, Any]) -> bytes:
    threads, batch = _setting(report)
    figure = _figure()
    axes = figure.add_subplot()
    names, data, sampled_batch = [], [], 1
    for row in report["artifacts"]:
        samples = [s for s in row.get("latency_samples_ms") or [] if isinstance(s, (int, float))]
        if samples:
            names.append(row["name"])
            data.append(samples)
            sampled_batch = (row.get("latency_samples_setting") or {}).get("batch", sampled_batch)
    if data:
        import matplotlib

        # `orientation` replaced `vert` in matplotlib 3.10 (vert is deprecated from 3.11).
        new_api = tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) >= (3, 10)
        direction = {"orientation": "horizontal"} if new_api else {"vert": False}
        parts = axes.boxplot(data, **direction, whis=(1, 99), showfliers=True, patch_artist=True,
                             flierprops={"markersize": 2, "alpha": 0.4})
        axes.set_yticks(range(1, len(names) + 1), names)
        for patch, name in zip(parts["boxes"], names):
            patch.set_facecolor(_color(name))
            patch.set_alpha(0.5)
        axes.set_title(f"Latency per run, batch {sampled_batch}, {threads} thread(s)")
        axes.text(1.0, -0.16, "box: p25-p75, line: p50, whiskers: p1-p99", transform=axes.transAxes, ha="right",
                  fontsize=7, color="#59636e")
    else:  # no raw samples: show p50 / p90 / p99 markers per artifact
        rows = [(r["name"], latency_at(r, threads, batch)) for r in report["artifacts"]]
        rows = [(n, e) for n, e in rows if e]
        for index, (name, entry) in enumerate(rows):
            for key, marker in (("p50", "o"), ("p90", "s"), ("p99", "^")):
                if entry.get(key) is not None:
                    axes.scatter([entry[key]], [index], marker=marker, color=_color(name),
                                 label=key if index == 0 else None)
        axes.set_yticks(range(len(rows)), [n for n, _ in rows])
        axes.legend(fontsize=7)
        axes.set_title(f"Latency percentiles, batch {batch}, {threads} thread(s)")
    axes.invert_yaxis()
    axes.set_xlabel("latency (ms)")
    axes.grid(True, axis="x", alpha=0.3)
    return _png(figure)


def runtimes(report: dict[str, Any]) -> bytes | None:
    """Runtime x precision side by side: accuracy, p50 and size bars per (runtime, fp32/int8) of the chain's
    deployable model (report["runtimes"]); None when the run used one runtime. Refused artifacts are hatched."""
    entries = report.get("runtimes") or []
    if len({e.get("runtime") for e in entries}) < 2:
        return None
    threads, batch = _setting(report)
    figure = _figure(9.6, 3.4)
    labels = [f"{e['runtime']}\n{e.get('kind')}" for e in entries]
    colors = [RUNTIME_COLORS.get(e["runtime"], "#17becf") for e in entries]
    refused = [e.get("gate") not in (None, "passed") for e in entries]
    panels = (("accuracy", "test accuracy", lambda v: f"{v:.3f}"), ("p50_ms", f"p50 ms ({threads} thr, batch {batch})",
              lambda v: f"{v:.3f}"), ("size_bytes", "size (KiB)", lambda v: f"{v:,.1f}"))
    for index, (key, title, fmt) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        values = [(e.get(key) or 0) / (1024 if key == "size_bytes" else 1) for e in entries]
        bars = axes.barh(labels, values, color=colors, alpha=0.8)
        for bar, is_refused in zip(bars, refused):
            if is_refused:
                bar.set_hatch("//")
                bar.set_alpha(0.4)
        axes.bar_label(bars, labels=[fmt(v) if v else "–" for v in values], fontsize=7, padding=2)
        axes.set_title(title, fontsize=9)
        axes.set_xlim(0, max(values + [1e-9]) * 1.35)
        axes.tick_params(labelsize=7)
        axes.invert_yaxis()
        if index:
            axes.set_yticks([])
        axes.grid(True, axis="x", alpha=0.3)
    figure.suptitle("Runtimes (hatched: refused by the accuracy gate)", fontsize=9)
    return _png(figure)


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """{plot name: PNG bytes}; names as in PLOTS (files plots/<name>.png); `runtimes` only with several runtimes."""
    images = {"accuracy_vs_latency": accuracy_vs_latency(report), "size": size(report),
              "latency_distribution": latency_distribution(report)}
    runtime_plot = runtimes(report)
    if runtime_plot is not None:
        images["runtimes"] = runtime_plot
    return images
