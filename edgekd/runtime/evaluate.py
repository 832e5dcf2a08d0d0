"""Accuracy on held-out data with ONNX Runtime, and the eval `.npz` the pipeline writes."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import RuntimeInputError
from .session import as_feed, check_input, input_spec


@dataclass
class EvalData:
    """`inputs` float32 NCHW already normalized; `labels` int64; `teacher_predictions` int64 top-1 or None."""

    inputs: np.ndarray
    labels: np.ndarray
    teacher_predictions: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_eval_npz(path: str | os.PathLike) -> EvalData:
    """Load and validate an eval `.npz` (keys `inputs`, `labels`, optional `teacher_predictions`)."""
    try:
        # allow_pickle=False: an .npz from a device or a colleague must never run code on load.
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise RuntimeInputError(f"{path}: eval data file not found") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise RuntimeInputError(f"{path}: not a readable .npz eval file ({exc})") from None
    missing = [key for key in ("inputs", "labels") if key not in arrays]
    if missing:
        raise RuntimeInputError(f"{path}: missing key(s) {missing}; found {sorted(arrays)}")
    inputs, labels = arrays["inputs"], arrays["labels"]
    if inputs.dtype != np.float32 or inputs.ndim < 2:
        raise RuntimeInputError(f"{path}: 'inputs' must be float32 with a batch axis, "
                                f"got {inputs.dtype} {inputs.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise RuntimeInputError(f"{path}: 'labels' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != inputs.shape[0] or labels.shape[0] == 0:
        raise RuntimeInputError(f"{path}: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
    teacher = arrays.get("teacher_predictions")
    if teacher is not None and (teacher.ndim != 1 or not np.issubdtype(teacher.dtype, np.integer)
                                or teacher.shape[0] != labels.shape[0]):
        raise RuntimeInputError(f"{path}: 'teacher_predictions' must be 1-D integers, one per label; "
                                f"got {teacher.dtype} {teacher.shape}")
    return EvalData(inputs, labels.astype(np.int64, copy=False),
                    None if teacher is None else teacher.astype(np.int64, copy=False))


def predict_logits(session: Any, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the model's first output over `inputs` in chunks; a fixed-batch model gets its own batch size."""
    spec = input_spec(session)[0]
    if spec.shape and spec.shape[0] is not None:  # fixed-batch export: only that batch size runs
        if inputs.shape[0] % spec.shape[0]:
            raise RuntimeInputError(f"the model takes batches of exactly {spec.shape[0]}; "
                                    f"{inputs.shape[0]} inputs do not split evenly")
        batch_size = spec.shape[0]
    check_input(session, inputs[:batch_size])
    outputs = [session.run(None, as_feed(session, inputs[start:start + batch_size]))[0]
               for start in range(0, inputs.shape[0], batch_size)]
    return np.concatenate(outputs, axis=0)


def _as_predictions(logits_or_preds: np.ndarray) -> np.ndarray:
    array = np.asarray(logits_or_preds)
    return array.argmax(axis=-1) if array.ndim == 2 else array


def accuracy(logits_or_preds: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; accepts (N, C) logits or (N,) predicted classes."""
    predictions, labels = _as_predictions(logits_or_preds), np.asarray(labels)
    if predictions.shape != labels.shape or labels.size == 0:
        raise RuntimeInputError(f"predictions {predictions.shape} and labels {labels.shape} do not match")
    return float(np.mean(predictions == labels))


def near_chance_accuracy(num_classes: int) -> float:
    """Accuracy below which a classifier is at chance level: guessing scores 1/num_classes; anything under
    a tenth of the way from there to perfect has learned (or kept) nothing usable."""
    chance = 1.0 / max(num_classes, 1)
    return chance + 0.1 * (1.0 - chance)


def agreement(preds_a: np.ndarray, preds_b: np.ndarray) -> float:
    """Fraction of samples where both models pick the same top-1 class (logits or classes)."""
    return accuracy(preds_a, _as_predictions(preds_b))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise |a - b| (parity check between two runtimes or two artifacts)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise RuntimeInputError(f"shapes {a.shape} and {b.shape} differ")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices, best first (ties broken by lower index, like argmax)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or not 1 <= k <= logits.shape[1]:
        raise RuntimeInputError(f"top_k needs (N, C) logits and 1 <= k <= C; got {logits.shape}, k={k}")
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def evaluate_session(session: Any, data: EvalData, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy (and agreement with the teacher when the data carries its predictions)."""
    predictions = predict_logits(session, data.inputs, batch_size).argmax(axis=-1)
    result: dict[str, Any] = {"accuracy": accuracy(predictions, data.labels), "agreement": None,
                              "samples": len(data)}
    if data.teacher_predictions is not None:
        result["agreement"] = agreement(predictions, data.teacher_predictions)
    return result
