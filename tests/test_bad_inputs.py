"""Bad-input matrix through the real command line: every case exits 2 (bad input) with one line naming the
cause, no traceback, and no new or partial artifact; nothing of the user's (a config, a file in the way of an
output, a finished run's files) is changed or deleted. (Exit 3, a run-time failure, is test_safety's NaN guard.)

Config, CLI-argument, environment, output-path, ONNX and report cases fail before torch is imported (under a
second each); model cases fail in `edgekd run`'s pre-flight (models built on the meta device, before anything
is written); only data that has to be decoded (a corrupt image, a decompression bomb) fails
in the teacher stage, before any training. The cases run as subprocesses two at a time (one module-scoped
pool); each test then asserts on its own case.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bad_input_matrix import (LOCAL_IMPORTS, RUN_DIR, Case, assert_refused, config_case, run_cases, sitecustomize,
                              stage_case, tool_case)
from conftest import run_edgekd, write_config

# --------------------------------------------------------------------------------------------------
# Case builders


def write_png(path: Path, mode: str, size: int = 12, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 255 - value)).save(path)


def imagefolder(**extra: Any) -> dict[str, Any]:
    return {"data": {"dataset": "imagefolder", "root": "images", "image_size": 12, **extra}}


def one_class(folder: Path) -> None:
    for i in range(3):
        write_png(folder / "images" / "cat" / f"{i}.png", "L", value=40 * i)


def corrupt_image(folder: Path) -> None:
    one_class(folder)
    write_png(folder / "images" / "dog" / "ok.png", "L")
    (folder / "images" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


def filelist(**extra: Any) -> dict[str, Any]:
    return {"data": {"dataset": "filelist", "root": "list.csv", "image_size": 12, **extra}}


def image_list(rows: str) -> Callable[[Path], None]:
    """list.csv with `rows` after the header, and the images cat/0..2.png, dog/0..2.png it may name."""
    def write(folder: Path) -> None:
        for i in range(3):
            write_png(folder / "cat" / f"{i}.png", "L", value=40 * i)
            write_png(folder / "dog" / f"{i}.png", "L", value=200 - 40 * i)
        good = "".join(f"{name}/{i}.png,{name}\n" for name in ("cat", "dog") for i in range(3))
        (folder / "list.csv").write_text("path,label,split\n" + good.replace("\n", ",train\n") + rows)
    return write


def empty_class(folder: Path) -> None:
    one_class(folder)
    write_png(folder / "images" / "dog" / "0.png", "L")
    (folder / "images" / "empty").mkdir()
    (folder / "images" / "empty" / "notes.txt").write_text("no images here\n")


def png_bomb(path: Path, side: int = 50_000) -> None:
    """A 300-byte PNG whose header claims side x side grey pixels (2.5 gigapixels: PIL's bomb guard)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def decompression_bomb(folder: Path) -> None:
    one_class(folder)
    write_png(folder / "images" / "dog" / "0.png", "L")
    png_bomb(folder / "images" / "dog" / "1.png")


FACTORIES = '''
import torch


def explode(num_classes, in_channels, input_size):
    raise RuntimeError("boom: out of widgets")


def seven_logits(num_classes, in_channels, input_size):
    # ignores num_classes: the run would train a 7-way head on 4 classes
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * input_size * input_size, 7))
'''


def factory_module(folder: Path) -> None:
    (folder / "bad_factories.py").write_text(FACTORIES)


def small_checkpoint(name: str, model: str = "cnn_tiny") -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        from edgekd.models import create_model, model_meta
        from edgekd.models.checkpoint import save_checkpoint

        built = create_model(model, num_classes=4, in_channels=1, input_size=16)
        save_checkpoint(built, folder / name, model_meta(model, {}, "teacher"))

    return make


def truncated_checkpoint(folder: Path) -> None:
    small_checkpoint("full.pt", "cnn_small")(folder)
    data = (folder / "full.pt").read_bytes()
    (folder / "cut.pt").write_bytes(data[: len(data) // 2])
    (folder / "full.pt").unlink()


def list_pickle(folder: Path) -> None:
    import torch

    torch.save([1, 2, 3], folder / "list.pt")


def foreign_checkpoints(folder: Path) -> None:
    """Files named .pt that torch.save did not write: text, a zip of notes, a plain pickle."""
    import pickle
    import zipfile

    (folder / "notes.pt").write_text("epoch 12: val 0.98, saved to the cluster\n")
    with zipfile.ZipFile(folder / "archive.pt", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    (folder / "plain.pt").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))


def finished_run(folder: Path) -> None:
    """A finished run's files (stand-ins): a refused config must leave every one of them in place."""
    run = folder / RUN_DIR
    run.mkdir(parents=True)
    stages = {name: {"fingerprint": "0" * 16, "status": "done", "artifacts": {f"{name}.pt": "0" * 64}}
              for name in ("teacher", "distill")}
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "stages": stages}))
    for name in ("teacher.pt", "distill.pt", "student.pt"):
        (run / name).write_bytes(b"PK\x03\x04 stand-in weights")


def manifest_not_an_object(folder: Path) -> None:
    (folder / RUN_DIR).mkdir(parents=True)
    (folder / RUN_DIR / "manifest.json").write_text("[1, 2, 3]\n")


def a_file(folder: Path) -> None:
    (folder / "afile").write_text("the user's notes\n")


def unwritable_dir() -> str:
    """A folder this process cannot create: under /sys for root (permissions do not stop root)."""
    return "/sys/edgekd-bad-input" if os.geteuid() == 0 else "/proc/edgekd-bad-input"


SITE_BLOCK_PIPELINE = (  # a runtime-only install (`pip install edgekd`): none of the pipeline extra
    "import sys\nfor name in ('torch', 'torchvision', 'torch_pruning', 'onnx', 'onnxscript', 'yaml'):\n"
    "    sys.modules[name] = None\n")
SITE_BLOCK_MOBILE = (  # an install without the litert / executorch extras, whatever this machine has
    "import sys\nfor name in ('litert_torch', 'executorch'):\n    sys.modules[name] = None\n")
SITE_DISK_FULL = (  # no byte can be written: stands in for a full disk (ENOSPC) at the start of a run
    "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n")


ALIAS_BOMB = "name: tiny\nteacher:\n  model_kwargs:\n    l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))


def onnx_files(folder: Path) -> None:
    """tiny.onnx ([N, 1, 8, 8] -> logits [N, 4]), rgb.npz (3-channel inputs: the wrong shape), constant.onnx
    (no inputs at all), afile (a file where an output folder would go)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from report_fixture import tiny_model

    tiny_model(folder / "tiny.onnx", hidden=8)
    value = numpy_helper.from_array(np.zeros((1, 4), np.float32))
    graph = helper.make_graph([helper.make_node("Constant", [], ["logits"], value=value)], "constant", [],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "constant.onnx")
    a_file(folder)
    rng = np.random.default_rng(0)
    np.savez(folder / "rgb.npz", inputs=rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
             labels=np.zeros(4, np.int64))
    (folder / "notes.onnx").write_text("this is a text file, not a protobuf\n")


VALID_REPORT = {"schema_version": 1, "artifacts": [{"name": "teacher", "latency_ms": []}]}


def report_files(folder: Path) -> None:
    (folder / "good.json").write_text(json.dumps(VALID_REPORT))
    text = json.dumps({**VALID_REPORT, "budgets": []}, indent=2)
    (folder / "truncated.json").write_text(text[: len(text) // 2])
    (folder / "future.json").write_text(json.dumps({**VALID_REPORT, "schema_version": 99}))
    (folder / "no_rows.json").write_text(json.dumps({"schema_version": 1, "artifacts": {}}))
    (folder / "budgets.json").write_text(json.dumps({"latency_p90": 2.0}))
    a_file(folder)


def run_dir_with_truncated_manifest(folder: Path) -> None:
    run = folder / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"schema_version": 1, "stages": {"teacher": {"status": "do')


def run_dir_with_list_manifest(folder: Path) -> None:
    (folder / "run").mkdir()
    (folder / "run" / "manifest.json").write_text("[]\n")


# --------------------------------------------------------------------------------------------------
# The matrix

CASES = [
    # -- config: rejected before anything is written --------------------------------------------
    config_case("yaml-syntax", text="name: tiny\nseed: [0, 1\n", cause=r"^pipeline\.yaml:\d+:\d+: YAML syntax error"),
    config_case("top-level-not-a-mapping", text="- teacher\n- student\n", cause=r"the top level must be a mapping"),
    config_case("unknown-key-with-suggestion", {"teacher": {"modle": "cnn_small"}},
                r"^pipeline\.yaml: teacher\.modle: unknown key; did you mean 'model'\?$"),
    config_case("unknown-section", {"distil": {"epochs": 2}}, r"^pipeline\.yaml: distil: unknown key; did you mean 'distill'\?$"),
    config_case("wrong-type-int", {"seed": "zero"}, r"^pipeline\.yaml: seed: must be an integer \(got 'zero'\)$"),
    config_case("wrong-type-list", {"benchmark": {"threads": 2}}, r"^pipeline\.yaml: benchmark\.threads: must be a list"),
    config_case("wrong-type-section", {"teacher": "cnn_large"}, r"^pipeline\.yaml: teacher: must be a mapping of settings"),
    config_case("wrong-literal", {"quantize": {"mode": "int4"}}, r"^pipeline\.yaml: quantize\.mode: must be one of 'static' or 'dynamic'"),
    config_case("out-of-range-temperature", {"distill": {"temperature": -1}},
                r"^pipeline\.yaml: distill\.temperature: must be > 0 \(got -1\)$"),
    config_case("out-of-range-fraction", {"data": {"val_fraction": 1.5}}, r"^pipeline\.yaml: data\.val_fraction: must be < 1"),
    config_case("out-of-range-opset", {"export": {"opset": 9}}, r"^pipeline\.yaml: export\.opset: must be >= 11 \(got 9\)$"),
    config_case("wrong-literal-export-target", {"export": {"targets": ["onnx", "coreml"]}},
                r"^pipeline\.yaml: export\.targets\[1\]: must be one of 'onnx', 'tflite' or 'pte' \(got 'coreml'\)$"),
    config_case("conflict-export-target-twice", {"export": {"targets": ["onnx", "tflite", "tflite"]}},
                r"^pipeline\.yaml: export\.targets: 'tflite' is listed twice"),
    config_case("conflict-export-targets-without-onnx", {"export": {"targets": ["tflite"]}},
                r"^pipeline\.yaml: export\.targets: must include 'onnx' \(quantize, benchmark and the device runner"),
    config_case("conflict-deploy-runtime-not-exported", {"report": {"deploy_runtime": "pte"}},
                r"^pipeline\.yaml: report\.deploy_runtime: 'pte' is not in export\.targets \['onnx'\]"),
    config_case("conflict-prune-targets", {"prune": {"ratio": 0.3, "target_macs": 0.5}},
                r"^pipeline\.yaml: prune: set only one of ratio, target_macs, target_params"),
    config_case("conflict-prune-latency-and-ratio", {"prune": {"target_speedup": 1.5}},
                r"^pipeline\.yaml: prune: set only one of ratio, target_macs, target_params, target_latency_ms, "
                r"target_speedup \(got ratio, target_speedup\)$"),
    config_case("wrong-prune-round-to", {"prune": {"round_to": "fast"}},
                r"^pipeline\.yaml: prune\.round_to: must be a positive integer or auto \(got 'fast'\)$"),
    config_case("conflict-student-candidates-and-model", {"student": {"candidates": ["cnn_small"]}},
                r"^pipeline\.yaml: student: set candidates or model, not both \(got model 'cnn_tiny'"),
    config_case("conflict-student-auto-without-latency-budget", {"student": {"model": "auto"}},
                r"^pipeline\.yaml: student\.model: auto: needs a latency budget to choose by"),
    config_case("conflict-prune-needs-distill", {"distill": None}, r"prune\.source: 'student' needs the distill stage"),
    config_case("conflict-latency-threads", {"budgets": {"latency_threads": 4}},
                r"budgets\.latency_threads: 4 is not in benchmark\.threads \[1\]"),
    config_case("conflict-histogram-samples", {"quantize": {"calibration": {"method": "entropy", "samples": 5000}}},
                r"quantize\.calibration\.samples: at most 4096 with method 'entropy'"),
    config_case("imagefolder-without-root", {"data": {"dataset": "imagefolder"}}, r"^pipeline\.yaml: data\.root: required"),
    config_case("name-escapes-runs-folder", {"name": "../../elsewhere"}, r"^pipeline\.yaml: name: must be letters, digits"),
    config_case("empty-file", text="", cause=r"^pipeline\.yaml: empty config \(no settings\); `edgekd init --force pipeline\.yaml`"),
    config_case("comments-only", text="# todo: fill in\n", cause=r"^pipeline\.yaml: empty config"),
    config_case("yaml-complex-key", text="name: tiny\n? [teacher, student]\n: cnn_small\n",
                cause=r"^pipeline\.yaml:2:3: valid YAML but not a config: a mapping key must be a plain value, not a list$"),
    config_case("yaml-alias-bomb", text=ALIAS_BOMB, within_s=20,
                cause=r"^pipeline\.yaml:\d+:\d+: valid YAML but not a config: aliases expand to more than 100,000 values"),
    config_case("yaml-recursive-alias", text="name: tiny\nteacher:\n  model_kwargs: &k {inner: *k}\n",
                cause=r"^pipeline\.yaml:3:17: valid YAML but not a config: an alias refers to a node that contains it"),
    config_case("yaml-nested-too-deep", text="name: tiny\nseed: " + "[" * 3000 + "]" * 3000 + "\n", within_s=30,
                cause=r"^pipeline\.yaml: YAML nested too deeply to be a config$"),
    config_case("seed-negative", {"seed": -1}, r"^pipeline\.yaml: seed: must be >= 0 \(got -1\)$"),
    config_case("seed-overflowing", {"seed": 2**64}, r"^pipeline\.yaml: seed: must be <= 4294967295 \(got 18446744073709551616\)$"),
    config_case("parity-batch-sizes-empty", {"export": {"parity_batch_sizes": []}},
                r"^pipeline\.yaml: export\.parity_batch_sizes: must not be empty$"),
    config_case("parity-batch-sizes-non-positive", {"export": {"parity_batch_sizes": [1, 0]}},
                r"^pipeline\.yaml: export\.parity_batch_sizes: must be >= 1 \(got 0\)$"),
    config_case("exclude-nodes-empty-name", {"quantize": {"exclude_nodes": ["/stage1/Conv", " "]}},
                r"^pipeline\.yaml: quantize\.exclude_nodes: names must not be empty \(got ' '\)$"),
    config_case("exclude-nodes-listed-twice", {"quantize": {"exclude_nodes": ["/head/Gemm", "/head/Gemm"]}},
                r"^pipeline\.yaml: quantize\.exclude_nodes: '/head/Gemm' is listed twice$"),
    config_case("mixed-precision-unknown", {"quantize": {"mixed_precision": "yes"}},
                r"^pipeline\.yaml: quantize\.mixed_precision: must be one of 'off' or 'auto'"),
    config_case("mixed-precision-dynamic", {"quantize": {"mode": "dynamic", "mixed_precision": "auto"}},
                r"^pipeline\.yaml: quantize\.mixed_precision: auto needs mode: static"),
    config_case("min-agreement-out-of-range", {"quantize": {"mixed_precision": "auto", "min_agreement": 1.5}},
                r"^pipeline\.yaml: quantize\.min_agreement: must be <= 1 \(got 1\.5\)$"),
    config_case("min-agreement-without-auto", {"quantize": {"min_agreement": 0.99}},
                r"^pipeline\.yaml: quantize\.min_agreement: only used by mixed_precision: auto"),
    config_case("mixed-precision-steps-zero", {"quantize": {"mixed_precision": "auto", "mixed_precision_steps": 0}},
                r"^pipeline\.yaml: quantize\.mixed_precision_steps: must be >= 1 \(got 0\)$"),
    config_case("profile-runs-negative", {"benchmark": {"profile_runs": -1}},
                r"^pipeline\.yaml: benchmark\.profile_runs: must be >= 0 \(got -1\)$"),
    # -- command-line arguments -------------------------------------------------------------------
    config_case("cli-unknown-from-stage", args=("--from", "distil"), usage=True,
                cause=r"^Error: Invalid value for '--from': 'distil' is not one of 'teacher', 'distill'"),
    config_case("cli-unknown-only-stage", args=("--only", "quantise"), usage=True,
                cause=r"^Error: Invalid value for '--only': 'quantise' is not one of"),
    config_case("cli-bad-device", args=("--device", "gpu"), cause=r"device: must be auto, cpu, cuda, cuda:N or mps \(got 'gpu'\)"),
    tool_case("cli-missing-config", ["run", "missing.yaml"], r"^missing\.yaml: no such file$"),
    tool_case("cli-config-is-a-folder", ["run", "."], r"^Error: Invalid value for 'CONFIG': File '\.' is a directory", usage=True),
    # -- data: fail when the teacher stage loads them ---------------------------------------------
    config_case("data-missing-root", imagefolder(), r"^pipeline\.yaml: data\.root: no such folder: .*/images$"),
    config_case("data-empty-folder", imagefolder(),
                r"^pipeline\.yaml: data\.root: .*/images: no class sub-folders \(expected root/<class>/<image>\)$",
                extra=lambda folder: (folder / "images").mkdir()),
    config_case("data-one-class", imagefolder(),
                r"^pipeline\.yaml: data\.root: .*/images: needs at least 2 classes with images \(found \['cat'\]\)$",
                extra=one_class),
    config_case("data-class-folder-without-images", imagefolder(),
                r"^pipeline\.yaml: data\.root: .*/images/empty: class folder without images \(add images or remove",
                extra=empty_class),
    stage_case("data-corrupt-image", imagefolder(val_fraction=0.2), r"/images/dog/broken\.png: unreadable image \((OSError|UnidentifiedImageError)",
               extra=corrupt_image),
    config_case("data-list-missing-file", filelist(),
                r"^pipeline\.yaml: data\.root: .*/list\.csv: line 8: no such image file: .*/cat/9\.png$",
                extra=image_list("cat/9.png,cat,test\n")),
    config_case("data-list-unknown-label", filelist(),
                r"^pipeline\.yaml: data\.root: .*/list\.csv: line 8: unknown label 'cow' \(the training labels are: "
                r"cat, dog\)$", extra=image_list("cat/0.png,cow,val\n")),
    config_case("data-list-not-a-list", {"data": {"dataset": "filelist", "root": "images"}},
                r"^pipeline\.yaml: data\.root: a filelist is a \.csv or \.jsonl file \(got images\)$"),
    config_case("data-crop-larger-than-resize", imagefolder(image_size=None, resize=32, crop=48),
                r"^pipeline\.yaml: data\.crop: \[48, 48\] does not fit in resize 32 \(crop <= resize\)$"),
    stage_case("data-decompression-bomb", imagefolder(val_fraction=0.2), r"/images/dog/1\.png: refused: image too large, a decompression bomb\?",
               extra=decompression_bomb),
    # -- models -------------------------------------------------------------------------------------
    config_case("model-unknown-name", {"teacher": {"model": "resnet_nope"}},
                r"^pipeline\.yaml: teacher\.model: unknown model 'resnet_nope' \(available: cnn,"),
    config_case("model-unknown-student", {"student": {"model": "cnn_nano"}},
                r"^pipeline\.yaml: student\.model: unknown model 'cnn_nano' \(available: cnn,"),
    config_case("model-unknown-student-candidate",
                {"student": {"model": "auto", "candidates": ["cnn_nano"]}, "budgets": {"latency_p50_ms": 1}},
                r"^pipeline\.yaml: student\.candidates: unknown model 'cnn_nano' \(available: cnn,"),
    config_case("model-unknown-torchvision-name", {"student": {"model": "torchvision:resnet_nope"}},
                r"^pipeline\.yaml: student\.model: torchvision has no model 'resnet_nope'"),
    config_case("model-kwargs-unknown", {"student": {"model_kwargs": {"widthz": [4, 8]}}},
                r"^pipeline\.yaml: student\.model: cnn_tiny: .*unexpected keyword argument 'widthz'$"),
    config_case("model-kwargs-bad-value", {"teacher": {"model_kwargs": {"blocks": 0}}},
                r"^pipeline\.yaml: teacher\.model: cnn_small: blocks must be >= 1 \(got 0\)$"),
    config_case("model-factory-raises", {"teacher": {"model": "bad_factories:explode"}},
                r"^pipeline\.yaml: teacher\.model: factory bad_factories:explode raised RuntimeError: boom: out of widgets$",
                extra=factory_module, env=LOCAL_IMPORTS),
    config_case("model-factory-wrong-logits", {"student": {"model": "bad_factories:seven_logits"}},
                r"^pipeline\.yaml: student\.model: bad_factories:seven_logits gives \(2, 7\) for inputs of shape "
                r"\(2, 1, 16, 16\); expected logits \(2, 4\)", extra=factory_module, env=LOCAL_IMPORTS),
    config_case("model-hint-unknown-teacher-layer", {"distill": {"hint": {"teacher_layer": "stage9", "student_layer": "stage2"}}},
                r"^pipeline\.yaml: distill\.hint\.teacher_layer: no module 'stage9' in the teacher \(valid: stage1,"),
    config_case("model-hint-unknown-student-layer", {"distill": {"hint": {"teacher_layer": "stage2", "student_layer": "stage2.9"}}},
                r"^pipeline\.yaml: distill\.hint\.student_layer: no module 'stage2\.9' in the student"),
    config_case("model-hint-typo-over-a-finished-run",
                {"distill": {"hint": {"teacher_layer": "stage2", "student_layer": "stgae2"}}},
                r"^pipeline\.yaml: distill\.hint\.student_layer: no module 'stgae2'", extra=finished_run),
    config_case("model-prune-ignore-unknown", {"prune": {"ignore": ["stage7"]}},
                r"^pipeline\.yaml: prune\.ignore: no module 'stage7' in the student"),
    config_case("model-prune-ignore-empty-name", {"prune": {"ignore": [""]}},
                r"^pipeline\.yaml: prune\.ignore: names must not be empty \(got ''\)$"),
    config_case("model-checkpoint-of-other-architecture", {"teacher": {"checkpoint": "tiny.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: .*/tiny\.pt: does not fit the architecture: '.+' has shape "
                r"\(.+\), the model expects \(.+\)$", extra=small_checkpoint("tiny.pt")),
    config_case("model-checkpoint-text-file", {"teacher": {"checkpoint": "notes.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: .*/notes\.pt: not a PyTorch checkpoint \(expected a torch\.save file",
                extra=foreign_checkpoints),
    config_case("model-checkpoint-zip-of-notes", {"teacher": {"checkpoint": "archive.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: .*/archive\.pt: corrupt or truncated checkpoint",
                extra=foreign_checkpoints),
    config_case("model-checkpoint-plain-pickle", {"teacher": {"checkpoint": "plain.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: .*/plain\.pt: (corrupt or truncated checkpoint|refused to load)",
                extra=foreign_checkpoints),
    config_case("model-checkpoint-missing", {"teacher": {"checkpoint": "nope.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: no such file: .*/nope\.pt$"),
    config_case("model-checkpoint-truncated", {"teacher": {"checkpoint": "cut.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: .*/cut\.pt: corrupt or truncated checkpoint", extra=truncated_checkpoint),
    config_case("model-checkpoint-not-a-state-dict", {"teacher": {"checkpoint": "list.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: .*/list\.pt: not a state_dict \(expected a mapping of parameter "
                r"names to tensors\)$", extra=list_pickle),
    config_case("model-unknown-provider", {"benchmark": {"providers": ["warpdrive"]}},
                r"^pipeline\.yaml: benchmark\.providers: execution provider 'warpdrive' is not available in this onnxruntime"),
    # -- ONNX files (edgekd bench) -------------------------------------------------------------------
    tool_case("onnx-not-onnx", ["bench", "notes.onnx", "--no-memory", "--no-mobile"], r"^notes\.onnx: not an ONNX model",
              onnx_files),
    tool_case("onnx-wrong-input-shape", ["bench", "tiny.onnx", "--data", "rgb.npz", "--no-memory", "--no-mobile"],
              r"input shape \(1, 3, 8, 8\) does not match the model's input 'input' \[N, 1, 8, 8\]", onnx_files),
    tool_case("onnx-missing-file", ["bench", "gone.onnx", "--no-memory", "--no-mobile"], r"^gone\.onnx: not an ONNX model \(file not found\)$"),
    tool_case("onnx-unknown-provider", ["bench", "tiny.onnx", "--providers", "warpdrive", "--no-memory", "--no-mobile"],
              r"^execution provider 'warpdrive' is not available", onnx_files),
    tool_case("onnx-model-without-inputs", ["bench", "constant.onnx", "--no-memory", "--no-mobile"],
              r"^constant\.onnx: the model has no inputs; nothing to benchmark$", onnx_files),
    tool_case("onnx-bench-json-under-a-file", ["bench", "tiny.onnx", "--json", "afile/out.json", "--no-memory", "--no-mobile"],
              r"^--json: afile/out\.json: is under afile, which is a file, not a folder$", onnx_files),
    # -- report files (check / compare / report) ------------------------------------------------------
    tool_case("report-check-truncated", ["check", "truncated.json"], r"^truncated\.json: not valid JSON, truncated\?", report_files),
    tool_case("report-check-wrong-schema-version", ["check", "future.json"],
              r"^future\.json: report schema_version 99 is not supported", report_files),
    tool_case("report-check-unknown-budget", ["check", "good.json", "--budgets", "budgets.json"],
              r"^budgets\.json: latency_p90: unknown key; did you mean 'latency_p90_ms'\?", report_files),
    tool_case("report-compare-truncated", ["compare", "truncated.json", "good.json"], r"^truncated\.json: not valid JSON", report_files),
    tool_case("report-compare-wrong-schema", ["compare", "good.json", "no_rows.json"],
              r"^no_rows\.json: 'artifacts' must be a non-empty list$", report_files),
    tool_case("report-render-truncated-manifest", ["report", "run"], r"^run/manifest\.json: not valid JSON",
              run_dir_with_truncated_manifest),
    tool_case("report-render-not-a-run-dir", ["report", "empty"], r"^empty: no manifest\.json",
              lambda folder: (folder / "empty").mkdir()),
    tool_case("report-render-manifest-not-an-object", ["report", "run"], r"^run/manifest\.json: not a JSON object",
              run_dir_with_list_manifest),
    tool_case("report-check-junit-under-a-file", ["check", "good.json", "--junit", "afile/j.xml"],
              r"^--junit: afile/j\.xml: is under afile, which is a file, not a folder$", report_files),
    tool_case("report-compare-json-under-a-file", ["compare", "good.json", "good.json", "--json", "afile/c.json"],
              r"^--json: afile/c\.json: is under afile, which is a file", report_files),
    tool_case("report-compare-junit-is-a-folder", ["compare", "good.json", "good.json", "--junit", "."],
              r"^Error: Invalid value for '--junit': File '\.' is a directory", report_files, usage=True),
    # -- output paths of `edgekd run`: refused before any work, nothing created ---------------------
    config_case("output-dir-is-a-file", {"output_dir": "afile"}, r"^pipeline\.yaml: output_dir: .*/afile: is a file, not a folder$",
                extra=a_file),
    config_case("output-dir-under-a-file", args=("--output-dir", "afile/run"),
                cause=r"^--output-dir: .*/afile/run: is under .*/afile, which is a file, not a folder$", extra=a_file),
    config_case("output-dir-unwritable", {"output_dir": unwritable_dir()},
                r"^pipeline\.yaml: output_dir: /(sys|proc)/edgekd-bad-input: cannot write there \("),
    config_case("output-dir-name-too-long", {"output_dir": "runs/" + "n" * 300},
                r"^pipeline\.yaml: output_dir: .*/n{300}: cannot write there \(File name too long\)$"),
    config_case("output-dir-disk-full-at-start", cause=r"^pipeline\.yaml: output_dir: .*/runs/tiny: cannot write there \(File too large\)$",
                extra=sitecustomize(SITE_DISK_FULL), env=LOCAL_IMPORTS),
    tool_case("output-init-under-a-file", ["init", "afile/pipeline.yaml"],
              r"^PATH: afile/pipeline\.yaml: is under afile, which is a file, not a folder$", a_file),
    config_case("output-junit-under-a-file", args=("--junit", "afile/junit.xml"),
                cause=r"^--junit: afile/junit\.xml: is under afile, which is a file, not a folder$", extra=a_file),
    config_case("output-manifest-not-an-object", cause=r"^.*/runs/tiny/manifest\.json: not a JSON object; delete it",
                extra=manifest_not_an_object),
    # -- environment --------------------------------------------------------------------------------
    config_case("env-world-size-without-torchrun", env={"RANK": "0", "WORLD_SIZE": "2"},
                cause=r"^environment: WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set: launch with torchrun"),
    config_case("env-rank-without-world-size", env={"RANK": "1"},
                cause=r"^environment: RANK=1 without WORLD_SIZE: launch with torchrun, or unset them"),
    config_case("env-target-without-litert-extra", {"export": {"targets": ["onnx", "tflite"]}},
                extra=sitecustomize(SITE_BLOCK_MOBILE), env=LOCAL_IMPORTS,
                cause=r'^pipeline\.yaml: export\.targets: tflite \(LiteRT \(\.tflite\) export\) needs the litert extra, '
                      r'which is not installed \(litert_torch not found\): pip install "edgekd\[litert\]"$'),
    config_case("env-target-without-executorch-extra", {"export": {"targets": ["onnx", "pte"]}},
                extra=sitecustomize(SITE_BLOCK_MOBILE), env=LOCAL_IMPORTS,
                cause=r'^pipeline\.yaml: export\.targets: pte \(ExecuTorch \(\.pte\) export\) needs the executorch extra, '
                      r'which is not installed \(executorch not found\): pip install "edgekd\[executorch\]"$'),
    config_case("env-runtime-only-install", extra=sitecustomize(SITE_BLOCK_PIPELINE), env=LOCAL_IMPORTS,
                cause=r'^edgekd run needs the pipeline extra \(torch, torchvision, onnx, torch_pruning, yaml not installed\): '
                      r'pip install "edgekd\[pipeline\]"$'),
    tool_case("env-runtime-only-models", ["models"], r'^edgekd models needs the pipeline extra \(torch not installed\)',
              sitecustomize(SITE_BLOCK_PIPELINE), env=LOCAL_IMPORTS),
]


# --------------------------------------------------------------------------------------------------
# Running the matrix


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    return run_cases(request, tmp_path_factory, CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_with_one_line_naming_the_cause_and_writes_nothing(case: Case, outcomes: dict[str, Future]) -> None:
    assert_refused(case, outcomes[case.id].result())


def test_bad_input_matrix_covers_every_category_with_at_least_60_cases() -> None:
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)
    kinds = {case.id.split("-")[0] for case in CASES}
    assert {"cli", "data", "model", "onnx", "report", "output", "env", "yaml"} <= kinds
    assert sum(1 for case in CASES if case.id.split("-")[0] not in {"cli", "data", "model", "onnx", "report"}) >= 10


def test_run_writes_junit_with_an_error_case_when_a_stage_fails(tmp_path: Path) -> None:
    """CI reads a failed run from --junit too: one <error> case naming the stage and the cause."""
    write_config(tmp_path, imagefolder(val_fraction=0.2))  # 6 images: one for validation
    corrupt_image(tmp_path)
    proc = run_edgekd("run", "pipeline.yaml", "--junit", "ci/junit.xml", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    xml = (tmp_path / "ci" / "junit.xml").read_text()
    assert '<testcase name="stage teacher" classname="edgekd.run"' in xml, xml
    assert 'errors="1"' in xml and "broken.png: unreadable image" in xml, xml
