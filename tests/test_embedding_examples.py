"""The app-embedding examples run for real: deploy/js (onnxruntime-node from npm) and deploy/cpp (ONNX Runtime
C/C++ API), and agree with Python onnxruntime on the evaluation samples and on preprocess.json.

JS: `npm install` of deploy/js/package.json goes to a cache outside the repo ($EDGEKD_NPM_CACHE, default
~/.cache/edgekd/js-<hash of package.json>), ~10 s cold, reused after. Skipped, with the reason, when
node/npm are missing or the install fails (no registry).
C++: built when $ONNXRUNTIME_ROOT points at an ONNX Runtime package with headers (the official release
tarball, or deploy/cpp/get_onnxruntime.sh), else skipped with that reason. The build dir is cached too.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[1]
JS_DIR, CPP_DIR = REPO / "deploy" / "js", REPO / "deploy" / "cpp"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekd"

# The tiny-model bundle builder lives in test_arm.py; loaded by path so it works whatever the import mode.
_spec = importlib.util.spec_from_file_location("_edgekd_test_arm_helpers", Path(__file__).with_name("test_arm.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_bundle, LABELS = _helpers.make_bundle, _helpers.LABELS


def python_logits(deploy: Path, inputs: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(deploy / "model.onnx")).run(None, {"input": inputs})[0]


def normalize(pixels_nchw: np.ndarray, deploy: Path) -> np.ndarray:
    """preprocess.json in numpy: x = (pixel * scale - mean[c]) / std[c]."""
    pre = json.loads((deploy / "preprocess.json").read_text())
    mean, std = np.array(pre["mean"])[:, None, None], np.array(pre["std"])[:, None, None]
    return ((pixels_nchw * pre["scale"] - mean) / std).astype(np.float32)


def save_ort_format(deploy: Path) -> None:
    """The bundle's optional model.ort (ORT format), as the export stage writes it."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable across CPUs
    so.optimized_model_filepath = str(deploy / "model.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(deploy / "model.onnx"), so)


def _locked_dir(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.parent / f".{path.name}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)  # parallel test runs share the cache
    return handle


# ---------------------------------------------------------------- JavaScript (onnxruntime-node)

@pytest.fixture(scope="module")
def node_modules() -> Path:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are not installed")
    digest = hashlib.sha256((JS_DIR / "package.json").read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("EDGEKD_NPM_CACHE") or CACHE / f"js-{digest}")
    with _locked_dir(root):
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            shutil.copy(JS_DIR / "package.json", root / "package.json")
            # --ignore-scripts: onnxruntime-node's postinstall only fetches optional CUDA binaries from NuGet;
            # the CPU binaries for linux/darwin/win32 x64+arm64 are inside the npm package.
            proc = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--omit=dev"],
                                  cwd=root, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                pytest.skip(f"npm install onnxruntime-node failed: {proc.stderr.strip().splitlines()[-1:]}")
            (root / ".complete").touch()
    return root / "node_modules"


def run_js(node_modules: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    proc = subprocess.run(["node", str(JS_DIR / "classify.js"), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_js_example_eval_top1_matches_python_onnxruntime(tmp_path, node_modules):
    deploy = make_bundle(tmp_path, samples=64)
    data = np.load(deploy / "eval.npz")
    expected = python_logits(deploy, data["inputs"]).argmax(1)
    out = json.loads(run_js(node_modules, str(deploy), "--eval", "--json").stdout)
    assert out["samples"] == 64 and out["top1"] == expected.tolist()
    assert out["accuracy"] == pytest.approx(float((expected == data["labels"]).mean()))
    human = run_js(node_modules, str(deploy), "--eval").stdout
    assert f"top-1 accuracy {out['accuracy']:.4f}" in human


def test_js_example_reads_compressed_npz_and_the_ort_format_copy(tmp_path, node_modules):
    deploy = make_bundle(tmp_path, samples=40)
    data = dict(np.load(deploy / "eval.npz"))
    np.savez_compressed(deploy / "eval.npz", **data)  # deflated zip entries
    save_ort_format(deploy)
    out = json.loads(run_js(node_modules, str(deploy), "--eval", "--json", "--model", "model.ort").stdout)
    assert out["top1"] == python_logits(deploy, data["inputs"]).argmax(1).tolist()


def test_js_example_preprocesses_images_like_preprocess_json(tmp_path, node_modules):
    deploy = make_bundle(tmp_path, samples=4)
    rng = np.random.default_rng(7)
    files, expected = [], []
    for i in range(3):
        hwc = np.clip(rng.integers(0, 256, (1, 1, 3)) + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"img{i}.ppm"
        path.write_bytes(b"P6\n# edgekd test\n8 8\n255\n" + hwc.tobytes())
        files.append(str(path))
        logits = python_logits(deploy, normalize(hwc.transpose(2, 0, 1)[None].astype(np.float64), deploy))[0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        expected.append((np.argsort(-logits)[:5].tolist(), probs))
    out = json.loads(run_js(node_modules, str(deploy), *files, "--json", "--top", "5").stdout)
    for result, (top5, probs) in zip(out, expected):
        assert [t["index"] for t in result["top"]] == top5
        assert [t["label"] for t in result["top"]] == [LABELS[i] for i in top5]
        assert [t["prob"] for t in result["top"]] == pytest.approx(probs[top5].tolist(), abs=1e-5)
    text = run_js(node_modules, str(deploy), files[0]).stdout
    assert LABELS[expected[0][0][0]] in text.splitlines()[1] and text.count("%") == 5


# ---------------------------------------------------------------- C++ (ONNX Runtime C/C++ API)

@pytest.fixture(scope="module")
def cpp_binary() -> Path:
    root = os.environ.get("ONNXRUNTIME_ROOT")
    if not root:
        pytest.skip("ONNXRUNTIME_ROOT is not set (an ONNX Runtime C/C++ package with headers; see deploy/cpp/README.md)")
    if not Path(root, "include").is_dir():
        pytest.skip(f"ONNXRUNTIME_ROOT={root} has no include/ folder")
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("cmake and a C++ compiler are needed")
    key = hashlib.sha256(f"{CPP_DIR}|{Path(root).resolve()}".encode()).hexdigest()[:12]
    build = CACHE / f"cpp-build-{key}"  # CMake cache is tied to the source dir: key by it
    with _locked_dir(build):
        for cmd in (["cmake", "-S", str(CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DONNXRUNTIME_ROOT={root}"], ["cmake", "--build", str(build), "-j", "2"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return build / "edgekd_classify"


def run_cpp(binary: Path, *args: str) -> list[list[int]]:
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("sample ")]
    return [[int(m) for m in re.findall(r'(?:: |\| )(\d+) "', row)] for row in rows]


def test_cpp_example_top1_matches_python_onnxruntime_on_eval_samples(tmp_path, cpp_binary):
    deploy = make_bundle(tmp_path, samples=70)  # > 64: two batches
    inputs = np.load(deploy / "eval.npz")["inputs"]
    inputs.astype("<f4").tofile(tmp_path / "inputs.f32")
    save_ort_format(deploy)
    expected = np.argsort(-python_logits(deploy, inputs), axis=1)[:, :3].tolist()
    assert run_cpp(cpp_binary, str(deploy), str(tmp_path / "inputs.f32"), "--top", "3") == expected
    assert run_cpp(cpp_binary, str(deploy), str(tmp_path / "inputs.f32"), "--model", "model.ort") == \
        np.argsort(-python_logits(deploy, inputs), axis=1)[:, :5].tolist()


def test_cpp_example_pixels_mode_normalizes_like_preprocess_json(tmp_path, cpp_binary):
    deploy = make_bundle(tmp_path, samples=4)
    rng = np.random.default_rng(3)
    hwc = np.clip(rng.integers(0, 256, (5, 1, 1, 3)) + rng.normal(0, 40, (5, 8, 8, 3)), 0, 255).astype(np.uint8)
    hwc.tofile(tmp_path / "pixels.u8")
    expected = python_logits(deploy, normalize(hwc.transpose(0, 3, 1, 2).astype(np.float64), deploy)).argmax(1)
    top = run_cpp(cpp_binary, str(deploy), str(tmp_path / "pixels.u8"), "--pixels", "--top", "1")
    assert [row[0] for row in top] == expected.tolist()


def test_cpp_example_rejects_a_truncated_tensor_file(tmp_path, cpp_binary):
    deploy = make_bundle(tmp_path, samples=2)
    (tmp_path / "bad.f32").write_bytes(b"\0" * 10)
    proc = subprocess.run([str(cpp_binary), str(deploy), str(tmp_path / "bad.f32")], capture_output=True, text=True)
    assert proc.returncode == 1 and "not N*C*H*W*4" in proc.stderr
