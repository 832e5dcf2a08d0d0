"""The accuracy gate every quantized artifact passes, whatever runtime made it (ONNX Runtime, LiteRT,
ExecuTorch): torch-free, on predicted classes only.

Two ways an int8 model fails it:
- it *collapsed*: one class for every input although the data (or its fp32 source) has several. Converters
  do this (a mis-calibrated or mis-fused quantized graph whose logits no longer depend on the input); a
  collapsed model can still show a plausible accuracy on a skewed split, so this is checked on its own;
- it loses more validation accuracy against its fp32 source than `quantize.max_accuracy_drop`.
Either way the artifact is flagged and never deployed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GateVerdict:
    """The gate's decision on one quantized artifact (measured on the validation split)."""

    accuracy: float
    source_accuracy: float
    accuracy_drop: float
    classes_predicted: int
    collapsed: bool
    deployable: bool
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collapse_reason(predictions: np.ndarray, reference: np.ndarray | None = None, *,
                    what: str = "inputs") -> str | None:
    """Why `predictions` (N,) collapsed, or None: one class for every input while the reference (labels or
    the fp32 source's predictions) has several."""
    predictions = np.asarray(predictions)
    if predictions.size < 2:
        return None
    classes = np.unique(predictions)
    expected = len(np.unique(reference)) if reference is not None and np.size(reference) else 2
    if len(classes) == 1 and expected > 1:
        return (f"collapsed: predicts class {int(classes[0])} for all {predictions.size} {what} "
                f"(the reference has {expected} classes)")
    return None


def int8_verdict(int8_predictions: np.ndarray, source_predictions: np.ndarray, labels: np.ndarray,
                 max_accuracy_drop: float, source: str, *, fallback: bool = True) -> GateVerdict:
    """Gate an int8 artifact against its fp32 source on labelled data (both as predicted classes).

    A collapse is never deployable (not even with `fallback: false`: no budget setting makes a constant
    classifier shippable); an accuracy drop beyond the limit is deployable only when fallback is off.
    """
    int8_predictions, labels = np.asarray(int8_predictions), np.asarray(labels)
    accuracy = float(np.mean(int8_predictions == labels))
    source_accuracy = float(np.mean(np.asarray(source_predictions) == labels))
    drop = source_accuracy - accuracy
    collapsed = collapse_reason(int8_predictions, labels, what="validation images")
    reason = None
    if collapsed:
        reason = f"int8 {collapsed}; never deployed"
    elif drop > max_accuracy_drop and fallback:
        reason = (f"int8 validation accuracy drops {drop:.4f} vs {source} fp32 (limit quantize.max_accuracy_drop "
                  f"{max_accuracy_drop:g}); {source} fp32 stays the deployable candidate")
    return GateVerdict(accuracy=accuracy, source_accuracy=source_accuracy, accuracy_drop=drop,
                       classes_predicted=int(len(np.unique(int8_predictions))), collapsed=collapsed is not None,
                       deployable=reason is None, reason=reason)
