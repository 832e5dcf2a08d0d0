"""Emulated aarch64 check: does the deploy bundle compute the same logits on aarch64 ONNX Runtime?

A script runs under qemu-user with a Debian arm64 Python 3.11 sysroot and aarch64 numpy + onnxruntime
wheels, computes logits on eval.npz and saves them; the host compares them with x86 onnxruntime logits.
The bundle's own run_on_device.py, if any, is run under emulation too. Downloads go to a cache outside
the repo ($EDGEKD_ARM_CACHE, default ~/.cache/edgekd/arm64) via apt-get with private lists (no root, the
host's apt/dpkg untouched) and pip download. Emulation proves correctness only: no timings are recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgekd import atomic
from edgekd.errors import EdgekdError, InputError

SCHEMA_VERSION = 1
# onnxruntime 1.28+ aarch64 wheels crash at import under Debian bookworm's qemu 7.2; 1.26 is the newest that runs.
ARM_ORT_VERSION = os.environ.get("EDGEKD_ARM_ORT_VERSION", "1.26.0")
ARM_NUMPY_VERSION = os.environ.get("EDGEKD_ARM_NUMPY_VERSION", "2.4.6")
DEBIAN_SUITE = "bookworm"  # pinned: the sysroot must not change with the host's release
DEBIAN_MIRROR = os.environ.get("EDGEKD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# What `python3.11 -S -c "import numpy, onnxruntime"` plus zipfile/json/argparse need, and no more.
ARM64_PACKAGES = (
    "libc6", "libgcc-s1", "libstdc++6", "python3.11-minimal", "libpython3.11-minimal",
    "libpython3.11-stdlib", "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5",
    "libcrypt1", "libuuid1", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "media-types",
)
# Tolerances: fp32 kernels differ only in summation order; int8 kernels (NEON vs AVX2/VNNI) may round
# an intermediate requantization differently, which moves a logit by a quantization step.
TOLERANCE = {"fp32": {"min_agreement": 0.999, "max_abs_diff_rel": 1e-3},
             "int8": {"min_agreement": 0.98, "max_abs_diff_rel": 0.1}}
QUANT_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
             "MatMulInteger"}


class ArmUnavailable(EdgekdError):
    """Emulation cannot be set up here (no apt-get/qemu, no network, unsupported host). Exit code 3."""

    exit_code = 3

    def __init__(self, reason: str) -> None:
        super().__init__(f"aarch64 emulation unavailable: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class EmulatorEnv:
    """A ready qemu-aarch64 + sysroot + site-packages; `command()` builds an emulated python call."""

    qemu: Path
    sysroot: Path
    site: Path
    cpu: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        cpu = ["-cpu", self.cpu] if self.cpu else []
        # -S: no site module, so the host's x86 dist-packages (visible through qemu's -L fallback) stay out.
        return [str(self.qemu), "-L", str(self.sysroot), *cpu, str(self.sysroot / "usr/bin/python3.11"),
                "-S", *args]

    def env(self, extra_path: Path | None = None) -> dict[str, str]:
        paths = [str(self.site)] + ([str(extra_path)] if extra_path else [])
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": os.pathsep.join(paths),
                "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def default_cache_dir() -> Path:
    if os.environ.get("EDGEKD_ARM_CACHE"):
        return Path(os.environ["EDGEKD_ARM_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgekd" / "arm64"


def _run(cmd: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 900), **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ArmUnavailable(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ArmUnavailable(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    # Two test processes (or a test and setup_arm_env.sh) may build the cache at once.
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _apt_download(cache: Path, packages: list[str], dest: Path) -> None:
    """apt-get download into `dest` with private lists and status: the host's apt/dpkg state is untouched."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise ArmUnavailable("apt-get and dpkg-deb are needed (a Debian-based host)")
    if not KEYRING.exists():
        raise ArmUnavailable(f"{KEYRING} is missing (apt-get install debian-archive-keyring)")
    apt = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc/preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    security = DEBIAN_MIRROR.replace("/debian", "/debian-security")
    opts = f"[arch=amd64,arm64 signed-by={KEYRING}]"
    (apt / "etc/sources.list").write_text("".join(
        f"deb {opts} {url} {DEBIAN_SUITE}{suffix} main\n"
        for url, suffix in ((DEBIAN_MIRROR, ""), (DEBIAN_MIRROR, "-updates"), (security, "-security"))))
    base = ["apt-get", "-q", "-o", f"Dir::Etc::SourceList={apt}/etc/sources.list",
            "-o", f"Dir::Etc::SourceParts={apt}/etc/none", "-o", f"Dir::Etc::PreferencesParts={apt}/etc/preferences.d",
            "-o", f"Dir::State::Lists={apt}/lists", "-o", f"Dir::State::status={apt}/status",
            "-o", f"Dir::Cache={apt}/cache", "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root",
            "-o", "APT::Architecture=amd64", "-o", "APT::Architectures::=amd64", "-o", "APT::Architectures::=arm64"]
    try:
        _run(base + ["update", "--error-on=any"], f"apt-get update from {DEBIAN_MIRROR}", timeout=300)
        _run(base + ["download", *packages], "apt-get download", cwd=dest, timeout=600)
    finally:
        shutil.rmtree(apt, ignore_errors=True)  # ~40 MB of package lists, only needed during setup


def _find_qemu(cache: Path) -> Path:
    for candidate in (os.environ.get("EDGEKD_QEMU"), shutil.which("qemu-aarch64-static"),
                      shutil.which("qemu-aarch64"), str(cache / "qemu-aarch64-static")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    # No system qemu: unpack the static binary from Debian's qemu-user-static (no root, no binfmt needed).
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _apt_download(cache, ["qemu-user-static:amd64"], Path(tmp))
        deb = next(Path(tmp).glob("qemu-user-static_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], "dpkg-deb -x qemu-user-static")
        shutil.move(f"{tmp}/x/usr/bin/qemu-aarch64-static", cache / "qemu-aarch64-static")
    return cache / "qemu-aarch64-static"


def _ensure_sysroot(cache: Path) -> Path:
    sysroot, marker = cache / f"sysroot-{DEBIAN_SUITE}", "\n".join(ARM64_PACKAGES) + "\n"
    if (sysroot / ".complete").is_file() and (sysroot / ".complete").read_text() == marker:
        return sysroot
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        debs, root = Path(tmp) / "debs", Path(tmp) / "root"
        debs.mkdir()
        _apt_download(cache, [f"{p}:arm64" if p != "media-types" else p for p in ARM64_PACKAGES], debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
        (root / ".complete").write_text(marker)
        shutil.rmtree(sysroot, ignore_errors=True)
        root.rename(sysroot)
    return sysroot


def _ensure_site(cache: Path) -> Path:
    site = cache / f"site-ort{ARM_ORT_VERSION}-np{ARM_NUMPY_VERSION}"
    if (site / ".complete").exists():
        return site
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheels, root = Path(tmp) / "wheels", Path(tmp) / "site"
        # --no-deps: only the compiled core is needed to run a session (no protobuf/sympy/flatbuffers).
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
              "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-d", str(wheels),
              f"onnxruntime=={ARM_ORT_VERSION}", f"numpy=={ARM_NUMPY_VERSION}"],
             "pip download of aarch64 wheels", timeout=600)
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(root)
        (root / ".complete").write_text(f"onnxruntime=={ARM_ORT_VERSION}\nnumpy=={ARM_NUMPY_VERSION}\n")
        shutil.rmtree(site, ignore_errors=True)
        root.rename(site)
    return site


_PROBE = ("import json, platform, sys, numpy, onnxruntime; print(json.dumps({'machine': platform.machine(), "
          "'python': platform.python_version(), 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__}))")


def ensure_emulator(cache_dir: Path | None = None, *, cpu: str | None = None) -> EmulatorEnv:
    """Build (once) and return the emulated aarch64 Python; raise ArmUnavailable(reason) if it cannot be."""
    if sys.platform != "linux":
        raise ArmUnavailable(f"user-mode emulation needs a Linux host, not {sys.platform}")
    if platform.machine() in ("aarch64", "arm64"):
        raise ArmUnavailable("the host is already aarch64: run deploy/run_on_device.py natively")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise ArmUnavailable(f"set-up is implemented for x86-64 hosts, not {platform.machine()}")
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    cpu = cpu or os.environ.get("EDGEKD_QEMU_CPU") or None
    with _locked(cache):
        qemu, sysroot, site = _find_qemu(cache), _ensure_sysroot(cache), _ensure_site(cache)
        env = EmulatorEnv(qemu, sysroot, site, cpu)
        ready = cache / "ready.json"
        key = f"{qemu}:{qemu.stat().st_size}:{sysroot}:{site}:{cpu}"
        known = json.loads(ready.read_text()) if ready.exists() else {}
        if key not in known:  # probe once per combination: an emulated import costs ~6 s
            what = f"emulated `import numpy, onnxruntime` (onnxruntime {ARM_ORT_VERSION}; 1.28+ crash under qemu 7.2)"
            out = _run(env.command("-c", _PROBE), what, env=env.env(), timeout=300)
            versions = json.loads(out.stdout.strip().splitlines()[-1])
            versions["qemu"] = _run([str(qemu), "--version"], "qemu --version").stdout.splitlines()[0]
            known[key] = versions
            ready.write_text(json.dumps(known))
    return EmulatorEnv(qemu, sysroot, site, cpu, known[key])


# Runs under emulation: stdlib + numpy + onnxruntime only, one thread, fixed batch.
_LOGITS_SCRIPT = """
import sys
import numpy as np, onnxruntime as ort
model, inputs, out, in_name, out_name, batch = sys.argv[1:7]
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
x = np.load(inputs); b = int(batch)
y = np.concatenate([sess.run([out_name], {in_name: x[i:i + b]})[0] for i in range(0, len(x), b)])
np.save(out, y.astype(np.float32))
"""


def host_logits(model: Path, inputs: np.ndarray, in_name: str, out_name: str, batch: int = 64) -> np.ndarray:
    """x86 reference: the same computation in this process (one thread, same batching)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    parts = [sess.run([out_name], {in_name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(parts).astype(np.float32)


def compare_outputs(x86_logits: np.ndarray, arm_logits: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Top-1 agreement, logit differences and each side's top-1 accuracy (None without labels)."""
    a, b = np.asarray(x86_logits, dtype=np.float64), np.asarray(arm_logits, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"logits must be two equal non-empty [N, classes] arrays, got {a.shape} and {b.shape}")
    if labels is not None and len(labels) != len(a):
        raise ValueError(f"{len(labels)} labels for {len(a)} samples")
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    stat = lambda v: float(v) if finite else None  # noqa: E731 - JSON has no NaN/Infinity: None instead
    top_a, top_b = a.argmax(axis=1), b.argmax(axis=1)
    acc = (lambda top: float((top == np.asarray(labels)).mean())) if labels is not None else (lambda top: None)
    return {"samples": int(len(a)), "classes": int(a.shape[1]), "agreement": float((top_a == top_b).mean()),
            "max_abs_diff": stat(np.abs(a - b).max()), "mean_abs_diff": stat(np.abs(a - b).mean()),
            "max_abs_logit": stat(np.abs(a).max()), "finite": finite,
            "x86_accuracy": acc(top_a), "arm_accuracy": acc(top_b)}


def judge(comparison: dict[str, Any], precision: str) -> tuple[bool, str, dict[str, float]]:
    """Pass/fail with the reason; the allowed max abs diff scales with the logits' magnitude."""
    tol = TOLERANCE[precision]
    if not comparison["finite"]:
        return False, "non-finite logits", {"min_agreement": tol["min_agreement"], "max_abs_diff": None}
    limit = tol["max_abs_diff_rel"] * max(1.0, comparison["max_abs_logit"])
    tolerance = {"min_agreement": tol["min_agreement"], "max_abs_diff": limit}
    if comparison["agreement"] < tol["min_agreement"]:
        return False, f"top-1 agreement {comparison['agreement']:.4f} < {tol['min_agreement']}", tolerance
    if comparison["max_abs_diff"] > limit:
        return False, f"max abs logit diff {comparison['max_abs_diff']:.3g} > {limit:.3g}", tolerance
    return True, "aarch64 logits match x86 within tolerance", tolerance


def _bundle(run_dir: Path) -> tuple[Path, Path]:
    """(bundle folder, run dir): accepts runs/<name> or runs/<name>/deploy."""
    run_dir = Path(run_dir)
    bundle = run_dir / "deploy" if (run_dir / "deploy" / "model.onnx").exists() else run_dir
    for name in ("model.onnx", "eval.npz"):
        if not (bundle / name).is_file():
            raise InputError(f"{bundle / name} not found: arm-check needs a deploy bundle (model.onnx, eval.npz)")
    return bundle, (bundle.parent if bundle.name == "deploy" else bundle)


def _precision(model: Path) -> str:
    # The op type names are stored as plain strings in the protobuf; a byte search avoids needing `onnx`.
    data = model.read_bytes()
    return "int8" if any(op.encode() in data for op in QUANT_OPS) else "fp32"


def _run_device_runner(env: EmulatorEnv, bundle: Path, tmp: Path) -> dict[str, Any]:
    """Run the bundle's own run_on_device.py under emulation: does the shipped runner work on aarch64?"""
    out = tmp / "device.json"
    # Few timed iterations (emulated latency is meaningless) and no memory subprocess (qemu-user without
    # binfmt cannot exec an aarch64 child process).
    cmd = env.command(str(bundle / "run_on_device.py"), "--model", str(bundle / "model.onnx"), "--data",
                      str(tmp / "eval.npz"), "--threads", "1", "--batch", "1", "--out", str(out),
                      "--iterations", "3", "--warmup", "1", "--no-memory")
    result: dict[str, Any] = {"script": "run_on_device.py", "exit_code": None, "ok": False, "accuracy": None}
    try:  # the bundle folder goes on PYTHONPATH for the runner's companion package
        proc = subprocess.run(cmd, env=env.env(bundle), capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {**result, "error": "timed out after 1800 s"}
    result.update(exit_code=proc.returncode, ok=proc.returncode == 0 and out.exists())
    if not result["ok"]:
        return {**result, "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    rows = json.loads(out.read_text()).get("artifacts") or [{}]
    result["accuracy"] = rows[0].get("accuracy")
    return result


def _emulated_logits(env: EmulatorEnv, model: Path, inputs: np.ndarray, names: tuple[str, str], tmp: Path,
                     ) -> np.ndarray:
    np.save(tmp / "inputs.npy", inputs)
    (tmp / "logits.py").write_text(_LOGITS_SCRIPT)
    cmd = env.command(str(tmp / "logits.py"), str(model), str(tmp / "inputs.npy"), str(tmp / "arm.npy"), *names, "64")
    proc = subprocess.run(cmd, env=env.env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not (tmp / "arm.npy").exists():
        raise RuntimeError(" | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]))
    return np.load(tmp / "arm.npy")


def arm_check(run_dir: Path, *, cache_dir: Path | None = None, samples: int | None = None,
              cpu: str | None = None) -> dict[str, Any]:
    """Run the bundle under emulated aarch64, compare with x86, write <run dir>/arm_check.json and return it.

    `cpu`: a qemu CPU model (e.g. cortex-a72 for a Raspberry Pi 4; default $EDGEKD_QEMU_CPU or qemu's "max").
    Raises InputError for a missing/invalid bundle and ArmUnavailable when emulation cannot be set up
    (after writing arm_check.json with status "unavailable", so the report can say why).
    """
    import onnxruntime as ort

    if samples is not None and samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    bundle, run_root = _bundle(Path(run_dir))
    pre = json.loads((bundle / "preprocess.json").read_text()) if (bundle / "preprocess.json").exists() else {}
    names = (pre.get("input_name", "input"), pre.get("output_name", "logits"))
    try:
        with np.load(bundle / "eval.npz") as data:
            inputs = np.ascontiguousarray(data["inputs"][:samples], dtype=np.float32)
            labels = data["labels"][:samples].astype(np.int64) if "labels" in data else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{bundle / 'eval.npz'}: not an eval set with an 'inputs' array ({exc})") from exc
    if len(inputs) == 0:
        raise InputError(f"{bundle / 'eval.npz'} has no samples")
    model = bundle / "model.onnx"
    try:  # the x86 reference first: a model that fails here is bad input, not an aarch64 problem
        x86 = host_logits(model, inputs, *names)
    except Exception as exc:  # onnxruntime raises its own exception types for invalid models/feeds
        raise InputError(f"{model}: onnxruntime cannot run it on eval.npz inputs: {exc}") from exc
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "status": "unavailable", "reason": None, "emulated": True,
        "note": "correctness under qemu user-mode emulation; emulation timings are not device speed",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": model.relative_to(run_root).as_posix(), "precision": _precision(model),
                  "size_bytes": model.stat().st_size},
        "host": {"machine": platform.machine(), "onnxruntime": ort.__version__, "numpy": np.__version__},
        "emulator": None, "comparison": None, "tolerance": None, "device_runner": None}
    try:
        env = ensure_emulator(cache_dir, cpu=cpu)
    except ArmUnavailable as exc:
        result["reason"] = exc.reason
        atomic.write_json(run_root / "arm_check.json", result)  # never half a file
        raise
    result["emulator"] = {"kind": "qemu-user", "target": "aarch64", "cpu": env.cpu or "max (qemu default)",
                          "sysroot": f"Debian {DEBIAN_SUITE} arm64", **env.versions}
    with tempfile.TemporaryDirectory(prefix="edgekd-arm-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            arm = _emulated_logits(env, model, inputs, names, tmp)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result.update(status="failed", reason=f"emulated onnxruntime run failed: {exc}")
        else:
            comparison = compare_outputs(x86, arm, labels)
            passed, reason, tolerance = judge(comparison, result["model"]["precision"])
            result.update(status="passed" if passed else "failed", reason=reason, comparison=comparison,
                          tolerance=tolerance)
            if (bundle / "run_on_device.py").is_file():
                np.savez(tmp / "eval.npz", inputs=inputs, **({} if labels is None else {"labels": labels}))
                runner = result["device_runner"] = _run_device_runner(env, bundle, tmp)
                if passed and not runner["ok"]:
                    result.update(status="failed", reason=f"run_on_device.py failed under emulation: "
                                                          f"{runner.get('error')}")
    atomic.write_json(run_root / "arm_check.json", result)  # never half a file
    return result


def summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal; the report renders arm_check.json itself (edgekd.report)."""
    cmp_, emu = result.get("comparison"), result.get("emulator") or {}
    lines = [f"arm-check (aarch64, emulated: correctness only, no latency): {result['status']} - {result['reason']}"]
    if cmp_:
        fmt = lambda v, spec=".4f": "n/a" if v is None else format(v, spec)  # noqa: E731
        lines += [f"  onnxruntime {emu.get('onnxruntime')} aarch64 under {emu.get('qemu')} (cpu {emu.get('cpu')}) "
                  f"vs {result['host']['onnxruntime']} {result['host']['machine']}; {cmp_['samples']} samples",
                  f"  top-1 agreement {fmt(cmp_['agreement'])}, max abs logit diff {fmt(cmp_['max_abs_diff'], '.3g')}, "
                  f"accuracy aarch64 {fmt(cmp_['arm_accuracy'])} / x86 {fmt(cmp_['x86_accuracy'])}"]
    runner = result.get("device_runner")
    if runner:
        lines.append("  run_on_device.py: " + (f"ran, accuracy {runner.get('accuracy')}" if runner["ok"]
                                               else f"FAILED: {runner.get('error')}"))
    return "\n".join(lines)
