"""device.json (written by run_on_device.py on a board): schema check and merge into report.json."""

from __future__ import annotations

import copy
import json
import os
from numbers import Real
from typing import Any

from .cpu import describe, environment_fingerprint
from .errors import RuntimeInputError

DEVICE_SCHEMA_VERSION = 1
_LATENCY_KEYS = ("threads", "batch", "p50", "p90", "p99", "mean")


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise RuntimeInputError(f"{where}: {message}")


def validate_device_json(device: Any, source: str = "device.json") -> dict[str, Any]:
    """Check the parts of a device.json that reports rely on; return it unchanged or raise
    RuntimeInputError naming the first field at fault."""
    _require(isinstance(device, dict), source, "not a JSON object")
    version = device.get("schema_version")
    _require(isinstance(version, int), source, "no integer 'schema_version' (not a device.json?)")
    _require(version <= DEVICE_SCHEMA_VERSION, source,
             f"schema_version {version} is newer than this edgekd understands ({DEVICE_SCHEMA_VERSION})")
    _require(isinstance(device.get("device"), dict), source, "'device' must be an object (cpu_info)")
    artifacts = device.get("artifacts")
    _require(isinstance(artifacts, list) and len(artifacts) > 0, source, "'artifacts' must be a non-empty list")
    for index, row in enumerate(artifacts):
        where = f"{source}: artifacts[{index}]"
        _require(isinstance(row, dict) and isinstance(row.get("name"), str), where, "needs a string 'name'")
        _require(isinstance(row.get("latency_ms"), list), where, "'latency_ms' must be a list")
        for number, latency in enumerate(row["latency_ms"]):
            _require(isinstance(latency, dict), f"{where}.latency_ms[{number}]", "must be an object")
            missing = [key for key in _LATENCY_KEYS
                       if not isinstance(latency.get(key), Real) or isinstance(latency.get(key), bool)]
            _require(not missing, f"{where}.latency_ms[{number}]", f"missing or non-numeric {missing}")
        for key in ("accuracy", "agreement", "peak_memory_bytes", "size_bytes"):
            value = row.get(key)
            _require(value is None or (isinstance(value, Real) and not isinstance(value, bool)), where,
                     f"'{key}' must be a number or null")
    return device


def load_device_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a device.json; a missing, truncated or foreign file raises RuntimeInputError."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise RuntimeInputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"{path}: not valid JSON, truncated? ({exc})") from None
    return validate_device_json(document, str(path))


def _match_artifact(row: dict[str, Any], report: dict[str, Any]) -> str | None:
    """Which report artifact a device row measured: by sha256 when the report records hashes, else the
    bundle's model.onnx is the report's deployed artifact."""
    for artifact in report.get("artifacts") or []:
        if row.get("sha256") and artifact.get("sha256") == row.get("sha256"):
            return artifact.get("name")
    deployed = report.get("deployed") or {}
    stem = os.path.splitext(os.path.basename(str(row.get("path") or row["name"])))[0]
    deployed_stem = os.path.splitext(os.path.basename(str(deployed.get("path") or "")))[0]
    if deployed.get("artifact") and stem and stem == deployed_stem:
        return deployed["artifact"]
    return None


def merge_device_json(report: dict[str, Any], device: dict[str, Any]) -> dict[str, Any]:
    """A copy of `report` with the device's measurements in `report['devices']`.

    One entry per device (keyed by its environment fingerprint): merging the same device.json twice, or
    a newer run from the same board, replaces that board's entry instead of adding a duplicate. Each
    artifact row is labelled with the device description and, when it can be told, the report artifact
    it measured (`artifact`).
    """
    validate_device_json(device)
    if not isinstance(report, dict):
        raise RuntimeInputError("report: not a JSON object")
    merged = copy.deepcopy(report)
    environment = device["device"]
    fingerprint = device.get("fingerprint") or environment_fingerprint(environment)
    label = device.get("label") or describe(environment)
    rows = []
    for row in device["artifacts"]:
        rows.append({**copy.deepcopy(row), "device": label, "artifact": _match_artifact(row, report)})
    entry = {"label": label, "fingerprint": fingerprint, "created_at": device.get("created_at"),
             "schema_version": device["schema_version"], "environment": copy.deepcopy(environment),
             "runner": copy.deepcopy(device.get("runner")), "artifacts": rows}
    devices = [d for d in merged.get("devices") or [] if d.get("fingerprint") != fingerprint]
    merged["devices"] = devices + [entry]
    return merged
