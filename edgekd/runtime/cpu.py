"""What machine a benchmark ran on: CPU model, usable cores, SIMD features, runtime versions.

Never raises: anything that cannot be read is None, so a report from an exotic board still merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from typing import Any

# Features that change which int8/fp32 kernels ORT can use. Values: True / False / None (unknown).
# x86: avx512_vnni and avx_vnni speed up int8 dot products; amx_* are Sapphire Rapids tiles.
# ARM: asimd (NEON), asimddp (SDOT/UDOT int8 dot product), i8mm (int8 matrix multiply).
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx", "neon", "asimd", "asimddp", "i8mm")

# /proc/cpuinfo on ARM often has no model name, only the implementer/part codes (from Linux's cputype.h).
_ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710",
    (0x41, 0xD48): "Cortex-X2", (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD4B): "Cortex-A78C", (0x41, 0xD8A): "Cortex-A720", (0x41, 0xD81): "Cortex-A720",
    (0x4E, 0x004): "NVIDIA Carmel", (0x61, 0x022): "Apple M1", (0x61, 0x023): "Apple M1",
}


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _parse_cpuinfo(text: str) -> tuple[str | None, set[str], str | None]:
    """(CPU name, feature flags, board) from /proc/cpuinfo text, x86 (`flags`) or ARM (`Features`)."""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    parts: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features") and not flags:
            flags = set(value.lower().split())
        elif key == "cpu part" and value not in parts:
            parts.append(value)
        else:
            fields.setdefault(key, value)
    name = fields.get("model name")
    if not name or name.lower().startswith("armv"):  # ARM kernels print "ARMv8 Processor rev 1 (v8l)"
        try:
            implementer = int(fields.get("cpu implementer", ""), 16)
            cores = [_ARM_PARTS.get((implementer, int(part, 16))) for part in parts]
            name = " + ".join(dict.fromkeys(core for core in cores if core)) or name
        except ValueError:
            pass
        name = name or fields.get("hardware")
    board = fields.get("model")  # Raspberry Pi: "Raspberry Pi 4 Model B Rev 1.4"; x86: a number
    return name, flags, None if not board or board.isdigit() else board


def _flags_of_interest(flags: set[str], arch: str) -> dict[str, bool | None]:
    if not flags:
        return {flag: None for flag in FLAGS_OF_INTEREST}
    result: dict[str, bool | None] = {flag: flag in flags for flag in FLAGS_OF_INTEREST}
    result["amx"] = any(flag.startswith("amx") for flag in flags)
    if arch in ("aarch64", "arm64"):
        result["neon"] = result["asimd"] = "asimd" in flags or "neon" in flags  # NEON is mandatory on ARMv8
    elif arch.startswith("arm"):
        result["neon"] = "neon" in flags
    return result


def _sysctl(name: str) -> str | None:
    try:
        proc = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _macos_cpu(arch: str) -> tuple[str | None, dict[str, bool | None]]:
    name = _sysctl("machdep.cpu.brand_string")
    flags = {flag: None for flag in FLAGS_OF_INTEREST}
    if arch == "arm64":
        def feature(key: str) -> bool | None:
            value = _sysctl(key)
            return None if value is None else value == "1"
        flags.update(neon=True, asimd=True, asimddp=feature("hw.optional.arm.FEAT_DotProd"),
                     i8mm=feature("hw.optional.arm.FEAT_I8MM"))
    else:
        words = " ".join(filter(None, (_sysctl("machdep.cpu.features"),
                                       _sysctl("machdep.cpu.leaf7_features")))).lower().split()
        if words:
            flags.update({"avx2": "avx2" in words, "avx512f": "avx512f" in words,
                          "avx512_vnni": "avx512vnni" in words, "avx_vnni": "avxvnni" in words})
    return name, flags


def _cpu_quota() -> float | None:
    """CPUs allowed by the cgroup v2 quota (containers), e.g. 2.0; None when unlimited or unknown."""
    text = _read_text("/sys/fs/cgroup/cpu.max")
    if not text:
        return None
    quota, _, period = text.strip().partition(" ")
    try:
        return None if quota == "max" else round(int(quota) / int(period or "100000"), 2)
    except ValueError:
        return None


def cpu_info() -> dict[str, Any]:
    """Describe this machine; keys are stable, unknown values are None."""
    arch = platform.machine() or None
    name, flags = None, {flag: None for flag in FLAGS_OF_INTEREST}
    try:
        if sys.platform == "darwin":
            name, flags = _macos_cpu(arch or "")
        else:
            text = _read_text("/proc/cpuinfo")
            board = None
            if text:
                name, raw_flags, board = _parse_cpuinfo(text)
                flags = _flags_of_interest(raw_flags, (arch or "").lower())
            board = (_read_text("/proc/device-tree/model") or "").strip("\x00\n ") or board
            if board:  # the board says more than the core on SBCs and phones
                name = f"{board} ({name})" if name else board
        name = name or platform.processor() or None
    except Exception:  # noqa: BLE001 - description only: never let it stop a benchmark
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    versions: dict[str, Any] = {"onnxruntime": None, "numpy": None, "providers": []}
    try:
        import numpy
        import onnxruntime

        versions = {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                    "providers": list(onnxruntime.get_available_providers())}
    except Exception:  # noqa: BLE001
        pass
    return {"cpu": name, "cores": os.cpu_count(), "usable_cores": usable, "cpu_quota": _cpu_quota(),
            "arch": arch, "os": f"{platform.system()} {platform.release()}".strip() or None,
            "flags": flags, "python": platform.python_version(), **versions}


def describe(info: dict[str, Any]) -> str:
    """One line for tables and device labels, e.g. 'Cortex-A72 (aarch64, 4 cores)'."""
    cores = info.get("usable_cores") or info.get("cores")
    return f"{info.get('cpu') or 'unknown CPU'} ({info.get('arch') or '?'}, {cores or '?'} cores)"


def environment_fingerprint(info: dict[str, Any]) -> str:
    """Stable id of 'same CPU, same features, same cores, same onnxruntime' (16 hex chars of sha256)."""
    key = {name: info.get(name) for name in ("cpu", "arch", "flags", "cores", "usable_cores", "onnxruntime")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
