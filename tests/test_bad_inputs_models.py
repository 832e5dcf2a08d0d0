"""Bad inputs of pretrained models and ONNX teachers through the real command line (tests/test_bad_inputs.py's
rules: exit 2, one line naming the cause, no traceback, nothing written), and two end-to-end runs: an NHWC
softmax ONNX teacher (Keras-like), and a pretrained torchvision teacher fine-tuned with a frozen backbone plus a
student started from a checkpoint."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_input_matrix import LOCAL_IMPORTS, Case, assert_refused, config_case, run_cases, sitecustomize
from conftest import TINY_CONFIG, run_edgekd, write_config
from teacher_models import Features, NHWCInput, TwoInputs, export

SIZE, CLASSES = TINY_CONFIG["data"]["synthetic"]["image_size"], 4  # synthetic: 1 channel, 4 classes


def tiny_teacher() -> torch.nn.Module:
    from edgekd.models import create_model

    torch.manual_seed(0)
    return create_model("cnn_tiny", num_classes=CLASSES, in_channels=1, input_size=SIZE).eval()


def onnx_file(kind: str) -> Any:
    def make(folder: Path) -> None:
        x = torch.zeros(2, 1, SIZE, SIZE)
        model = tiny_teacher()
        if kind == "two-inputs":
            export(TwoInputs(model), folder / "teacher.onnx", (x, x))
        elif kind == "features":
            export(Features(model), folder / "teacher.onnx", x)
        elif kind == "other-size":
            export(model, folder / "teacher.onnx", torch.zeros(1, 1, 24, 24), dynamic_batch=False)
        elif kind == "fixed-batch":
            export(model, folder / "teacher.onnx", x, dynamic_batch=False)
        elif kind == "nhwc":
            export(NHWCInput(model), folder / "teacher.onnx", x.permute(0, 2, 3, 1))
        else:
            (folder / "teacher.onnx").write_bytes(b"\x08\x07 not a protobuf model")

    return make


def student_checkpoint(model: str) -> Any:
    def make(folder: Path) -> None:
        from edgekd.models import create_model, model_meta
        from edgekd.models.checkpoint import save_checkpoint

        built = create_model(model, num_classes=CLASSES, in_channels=1, input_size=SIZE)
        save_checkpoint(built, folder / "start.pt", model_meta(model, {}, "student"))

    return make


ONNX_TEACHER = {"teacher": {"onnx": "teacher.onnx"}}
WITHOUT_TEACHER = {key: value for key, value in TINY_CONFIG.items() if key != "teacher"}


def onnx_case(id: str, override: dict[str, Any], cause: str, extra: Any) -> Case:
    """TINY_CONFIG with `teacher: {onnx: teacher.onnx}` in place of its torch teacher."""

    def setup(folder: Path) -> list[str]:
        write_config(folder, {**override, **ONNX_TEACHER}, base=WITHOUT_TEACHER)
        extra(folder)
        return ["run", "pipeline.yaml"]

    return Case(id, setup, 2, cause)
NO_TIMM = "import sys\nsys.modules['timm'] = None\n"  # a machine without the [timm] extra
EMPTY_CACHES = {"TORCH_HOME": "torch-cache", "HF_HUB_CACHE": "hf-cache"}

CASES: list[Case] = [
    config_case("model-weights-unknown-name", {"teacher": {"model": "torchvision:resnet18", "weights": "IMAGENET1K_V9"}},
                r"^pipeline\.yaml: teacher\.weights: 'IMAGENET1K_V9' is not a weights name of torchvision:resnet18 "
                r"\(valid: DEFAULT, IMAGENET1K_V1\)$"),
    config_case("model-weights-not-in-cache", {"student": {"model": "torchvision:mobilenet_v3_small", "weights": "DEFAULT"}},
                r"^pipeline\.yaml: student\.weights: the pretrained weights of torchvision:mobilenet_v3_small \(weights "
                r"DEFAULT\) are not in the local cache \(torch-cache/hub/checkpoints/mobilenet_v3_small-047dcff4\.pth\); "
                r"edgekd downloads nothing during a run: fetch them once with: python -c \"import torchvision; "
                r"torchvision\.models\.get_model\('mobilenet_v3_small', weights='DEFAULT'\)\"$", env=EMPTY_CACHES),
    config_case("model-weights-on-a-builtin-model", {"student": {"weights": "DEFAULT"}},
                r"^pipeline\.yaml: student\.weights: only torchvision:<name> models take weights \(model is 'cnn_tiny'\)$"),
    config_case("model-pretrained-on-torchvision", {"teacher": {"model": "torchvision:resnet18", "pretrained": True}},
                r"^pipeline\.yaml: teacher\.pretrained: only timm:<name> models take pretrained: true \(model is "
                r"'torchvision:resnet18'; torchvision models take weights: DEFAULT\)$"),
    config_case("model-timm-not-installed", {"student": {"model": "timm:mobilenetv3_small_100"}},
                r"^pipeline\.yaml: student\.model: timm models need timm, which is not installed: "
                r"pip install 'edgekd\[timm\]'$", extra=sitecustomize(NO_TIMM), env=LOCAL_IMPORTS),
    config_case("model-timm-pretrained-not-in-cache",
                {"student": {"model": "timm:mobilenetv3_small_100", "pretrained": True}},
                r"^pipeline\.yaml: student\.pretrained: the pretrained weights of timm:mobilenetv3_small_100 "
                r"\(pretrained\) are not in the local cache \(hf-cache/models--timm--mobilenetv3_small_100\.lamb_in1k "
                r"or torch-cache/hub/checkpoints/mobilenetv3_small_100_lamb-266a294c\.pth\); .*fetch them once with: "
                r"python -c \"import timm; timm\.create_model\('mobilenetv3_small_100', pretrained=True\)\"$",
                env=EMPTY_CACHES),
    config_case("model-student-checkpoint-does-not-fit", {"student": {"checkpoint": "start.pt"}},
                r"^pipeline\.yaml: student\.checkpoint: .*start\.pt: does not fit the architecture: 'stage1\.0\.0\.weight' "
                r"has shape \(8, 1, 3, 3\), the model expects \(4, 1, 3, 3\)$", extra=student_checkpoint("cnn_small")),
    config_case("model-student-checkpoint-missing", {"student": {"checkpoint": "nope.pt"}},
                r"^pipeline\.yaml: student\.checkpoint: no such file: .*/nope\.pt$"),
    onnx_case("onnx-teacher-two-inputs", {},
                r"^pipeline\.yaml: teacher\.onnx: teacher\.onnx has 2 inputs \(image \[batch, 1, 16, 16\], mask "
                r"\[batch, 1, 16, 16\]\); a teacher takes one image batch", extra=onnx_file("two-inputs")),
    onnx_case("onnx-teacher-not-logits", {},
                r"^pipeline\.yaml: teacher\.onnx: teacher\.onnx's output 'scores' is \[batch, 4, 16, 16\]; a teacher "
                r"gives logits \[batch, 4\] \(one score per class of the data\)$", extra=onnx_file("features")),
    onnx_case("onnx-teacher-other-input-size", {},
                r"^pipeline\.yaml: teacher\.onnx: teacher\.onnx's input 'image' \[1, 1, 24, 24\] \(NCHW\) takes 24x24 "
                r"images, the data's preprocessing gives 16x16: set data\.crop \(or data\.image_size\) to 24x24, or re-export",
                extra=onnx_file("other-size")),
    onnx_case("onnx-teacher-fixed-batch", {},
                r"^pipeline\.yaml: teacher\.onnx: teacher\.onnx takes batches of exactly 2, benchmark\.batch_sizes "
                r"asks for \[1\]: re-export it with a dynamic batch axis", extra=onnx_file("fixed-batch")),
    onnx_case("onnx-teacher-not-a-model", {},
                r"^pipeline\.yaml: teacher\.onnx: .*teacher\.onnx: not a usable ONNX model \(", extra=onnx_file("junk")),
    onnx_case("onnx-teacher-with-hint",
              {"distill": {**TINY_CONFIG["distill"], "hint": {"teacher_layer": "stage1", "student_layer": "stage1"}}},
                r"^pipeline\.yaml: distill\.hint: hint losses need the teacher's features, which an ONNX teacher "
              r"\(teacher\.onnx\) does not expose", extra=onnx_file("nhwc")),
]


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    return run_cases(request, tmp_path_factory, CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_model_input_exits_2_with_one_line_and_writes_nothing(case: Case, outcomes: dict[str, Future]) -> None:
    outcome = outcomes[case.id].result()
    assert_refused(case, outcome)
    cache = outcome.folder / "torch-cache"  # nothing fetched or half-written into the weights cache
    assert not cache.exists() or not any(cache.rglob("*.pth"))


# --------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_run_with_an_nhwc_softmax_onnx_teacher_distills_and_benchmarks_against_it(tmp_path: Path) -> None:
    """A Keras-like teacher (NHWC input, softmax output): the run says what it adapts, distils from it, and the
    benchmark's teacher row is the ONNX file (with a Transpose in front), agreeing with the torch original."""
    from edgekd.config import validate_config
    from edgekd.data.bundle import load_data
    from edgekd.train.loop import fit

    cfg = validate_config({**TINY_CONFIG, "name": "t"})
    data = load_data(cfg.data, seed=0)
    teacher = tiny_teacher()
    fit(teacher, data, cfg.teacher.train, device=torch.device("cpu"), seed=0, batch_size=32, log=lambda _: None)
    teacher.eval()
    export(NHWCInput(teacher, softmax=True), tmp_path / "keras_like.onnx", torch.zeros(2, SIZE, SIZE, 1))
    write_config(tmp_path, {"name": "onnx-teacher", "teacher": {"onnx": "keras_like.onnx"}, "prune": None,
                            "quantize": None, "distill": {"epochs": 3, "augment": False}}, base=WITHOUT_TEACHER)
    stages = [arg for stage in ("teacher", "distill", "export", "benchmark") for arg in ("--only", stage)]
    proc = run_edgekd("run", "pipeline.yaml", *stages, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NHWC input: the NCHW batch is transposed to NHWC" in proc.stderr
    assert "softmax output: log-probabilities are used as logits" in proc.stderr
    manifest = json.loads((tmp_path / "runs" / "onnx-teacher" / "manifest.json").read_text())
    teacher_metrics = manifest["stages"]["teacher"]["metrics"]
    assert teacher_metrics["onnx"]["layout"] == "NHWC" and teacher_metrics["onnx"]["output"] == "probabilities"
    rows = {row["name"]: row for row in manifest["stages"]["benchmark"]["metrics"]["artifacts"]}
    x, labels = data.normalized("test")
    with torch.no_grad():
        torch_accuracy = float((teacher(torch.from_numpy(x)).argmax(1).numpy() == labels).mean())
    assert rows["teacher"]["accuracy"] == pytest.approx(torch_accuracy, abs=1e-9)
    assert rows["student"]["accuracy"] > 1.5 / CLASSES and rows["teacher"]["agreement"] == 1.0


@pytest.mark.slow
def test_run_fine_tunes_a_pretrained_teacher_with_a_frozen_backbone_and_starts_the_student_from_a_checkpoint(
        tmp_path: Path) -> None:
    from edgekd.models import create_model
    from edgekd.models.checkpoint import read_checkpoint, save_checkpoint
    from edgekd.models.pretrained import torchvision_cache_file, torchvision_weights

    member = torchvision_weights("mobilenet_v3_small", "DEFAULT", "test")
    cache = torchvision_cache_file(member).relative_to(torchvision_cache_file(member).parents[2])
    (tmp_path / "torch-cache" / cache).parent.mkdir(parents=True)
    torch.manual_seed(1)
    pretrained = create_model("torchvision:mobilenet_v3_small", num_classes=1000, in_channels=3, input_size=224)
    torch.save(pretrained.state_dict(), tmp_path / "torch-cache" / cache)
    torch.manual_seed(5)
    start = create_model("cnn_tiny", num_classes=CLASSES, in_channels=1, input_size=SIZE)
    save_checkpoint(start, tmp_path / "start.pt")  # a plain state_dict with edgekd's wrapper, no meta needed
    write_config(tmp_path, {
        "name": "pretrained",
        "data": {"synthetic": {"num_samples": 160}},
        "teacher": {"model": "torchvision:mobilenet_v3_small", "weights": "DEFAULT",
                    "train": {"epochs": 2, "freeze_backbone_epochs": 1, "bn_recalibration_batches": 0}},
        "student": {"checkpoint": "start.pt"},
        "distill": {"epochs": 1, "lr": 1e-9, "augment": False, "bn_recalibration_batches": 0},
        "prune": None, "quantize": None,
    })
    proc = run_edgekd("run", "pipeline.yaml", "--only", "teacher", "--only", "distill", cwd=tmp_path, timeout=600,
                      env={"TORCH_HOME": "torch-cache"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "pretrained"
    manifest = json.loads((run / "manifest.json").read_text())
    teacher = manifest["stages"]["teacher"]["metrics"]
    assert teacher["source"] == "fine-tuned" and teacher["pretrained"] == "DEFAULT"
    assert [row.get("backbone_frozen", False) for row in teacher["history"]] == [True, False]
    teacher_state, meta = read_checkpoint(run / "teacher.pt")
    assert meta["weights"] == "DEFAULT" and teacher_state["classifier.3.weight"].shape == (CLASSES, 1024)
    student_state, _ = read_checkpoint(run / "student.pt")  # lr 1e-9: the student is still its checkpoint
    for name, parameter in start.named_parameters():
        assert torch.allclose(student_state[name], parameter, atol=1e-6), name
