"""The accuracy-vs-latency plot keeps every artifact's name readable: small models close together and a slow
teacher (log latency axis), labels that overlap neither each other nor another point, inside the axes. The
boxes are the rendered text extents matplotlib reports for the PNG (the pixels a browser shows)."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from edgekd.report.plots import accuracy_vs_latency, accuracy_vs_latency_figure  # noqa: E402


def row(name: str, p50: float, accuracy: float) -> dict[str, Any]:
    return {"name": name, "accuracy": accuracy,
            "latency_ms": [{"threads": 1, "batch": 1, "p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2}]}


CROWDED = {  # four small models within 10% of each other's latency and 0.5 points of accuracy; a 40x slower teacher
    "artifacts": [row("teacher", 2.1, 0.99), row("student", 0.050, 0.975), row("student_baseline", 0.049, 0.970),
                  row("pruned", 0.047, 0.972), row("int8", 0.046, 0.971)],
    "deployed": {"artifact": "int8"},
    "budget_settings": {"latency_threads": 1, "latency_batch": 1, "min_accuracy": 0.96},
}


def overlaps(a: Any, b: Any) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def test_labels_of_crowded_small_models_do_not_overlap_and_stay_inside_the_axes() -> None:
    figure, labels = accuracy_vs_latency_figure(CROWDED)
    accuracy_vs_latency(CROWDED)  # the PNG path draws the same way
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"  # 0.046 .. 2.1 ms
    assert sorted(label.get_text() for label in labels) == sorted(r["name"] for r in CROWDED["artifacts"])
    boxes = {label.get_text(): label.get_window_extent(renderer) for label in labels}
    for (a, box_a), (b, box_b) in combinations(boxes.items(), 2):
        assert not overlaps(box_a, box_b), f"labels {a} and {b} overlap: {box_a} {box_b}"
    frame = axes.get_window_extent(renderer)
    for name, box in boxes.items():
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
    points = {r["name"]: axes.transData.transform((r["latency_ms"][0]["p50"], r["accuracy"])) for r in CROWDED["artifacts"]}
    for name, box in boxes.items():
        for other, (px, py) in points.items():
            if other != name:
                assert not box.contains(px, py), f"label {name} covers the point of {other}"
    legend = axes.get_legend().get_window_extent(renderer)
    assert legend.x0 >= frame.x1  # outside the axes: it hides no point and no label

    # The fixture is crowded for real: every label at the usual spot (6 pt right, 5 pt up) would collide.
    naive = [axes.annotate(n, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8).get_window_extent(renderer)
             for n, x, y in ((r["name"], r["latency_ms"][0]["p50"], r["accuracy"]) for r in CROWDED["artifacts"])]
    assert any(overlaps(a, b) for a, b in combinations(naive, 2))


def test_a_narrow_latency_range_keeps_a_linear_axis() -> None:
    narrow = {**CROWDED, "artifacts": [row("teacher", 0.060, 0.99), row("student", 0.050, 0.975)]}
    figure, labels = accuracy_vs_latency_figure(narrow)
    assert figure.axes[0].get_xscale() == "linear" and len(labels) == 2
