"""Bad-input matrix through the real command line: every case exits 2 (bad input) with one line naming the
cause, no traceback, and no new or partial artifact. (Exit 3, a run-time failure, is test_safety's NaN guard.)

Config, CLI-argument, ONNX and report cases fail before torch is imported (under a second each); data and
model cases fail in the teacher stage, before any training. The cases run as subprocesses two at a time
(one module-scoped pool); each test then asserts on its own case.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_CONFIG, error_lines, run_edgekd, write_config

RUN_DIR = Path("runs") / TINY_CONFIG["name"]
# What the runner itself may leave in a run directory when a stage fails (never a stage's artifact).
BOOKKEEPING = {f"{RUN_DIR}/{name}" for name in ("config.yaml", "log.txt", "manifest.json")}
CLICK_LINES = re.compile(r"^(Usage: |Try '|\s*$)")


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # writes the case's files into its folder, returns the CLI arguments
    code: int
    cause: str  # regex the one error line must match
    writes: str = "nothing"  # "nothing": no file appears or changes; "bookkeeping": only BOOKKEEPING may appear
    usage: bool = False  # a click usage error: "Usage:"/"Try" lines, then one "Error: ..." line
    env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Case builders


def config_case(id: str, override: dict[str, Any] | None = None, cause: str = "", *, text: str | None = None,
                args: tuple[str, ...] = (), code: int = 2, writes: str = "nothing", usage: bool = False,
                extra: Callable[[Path], None] | None = None, env: dict[str, str] | None = None) -> Case:
    """`edgekd run pipeline.yaml ARGS` with TINY_CONFIG + override (or the raw YAML `text`)."""

    def setup(folder: Path) -> list[str]:
        if text is not None:
            (folder / "pipeline.yaml").write_text(text)
        else:
            write_config(folder, override)
        if extra is not None:
            extra(folder)
        return ["run", "pipeline.yaml", *args]

    return Case(id, setup, code, cause, writes, usage, env or {})


def stage_case(id: str, override: dict[str, Any], cause: str, extra: Callable[[Path], None] | None = None,
               env: dict[str, str] | None = None) -> Case:
    """A config that validates but fails in the teacher stage (data or model), before any training."""
    return config_case(id, override, cause, writes="bookkeeping", extra=extra, env=env)


def tool_case(id: str, args: list[str], cause: str, files: Callable[[Path], None] | None = None, *,
              usage: bool = False) -> Case:
    """bench / check / compare / report on files in the case folder."""

    def setup(folder: Path) -> list[str]:
        if files is not None:
            files(folder)
        return list(args)

    return Case(id, setup, 2, cause, "nothing", usage)


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


def mixed_channels(folder: Path) -> None:
    write_png(folder / "images" / "a_grey" / "0.png", "L")
    write_png(folder / "images" / "b_colour" / "0.png", "RGB")


FACTORIES = '''
def explode(num_classes, in_channels, input_size):
    raise RuntimeError("boom: out of widgets")
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


def onnx_files(folder: Path) -> None:
    """tiny.onnx ([N, 1, 8, 8] -> logits [N, 4]), rgb.npz (3-channel inputs: the wrong shape)."""
    from report_fixture import tiny_model

    tiny_model(folder / "tiny.onnx", hidden=8)
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


def run_dir_with_truncated_manifest(folder: Path) -> None:
    run = folder / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"schema_version": 1, "stages": {"teacher": {"status": "do')


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
    config_case("conflict-prune-targets", {"prune": {"ratio": 0.3, "target_macs": 0.5}},
                r"^pipeline\.yaml: prune: set only one of ratio, target_macs, target_params"),
    config_case("conflict-prune-needs-distill", {"distill": None}, r"prune\.source: 'student' needs the distill stage"),
    config_case("conflict-latency-threads", {"budgets": {"latency_threads": 4}},
                r"budgets\.latency_threads: 4 is not in benchmark\.threads \[1\]"),
    config_case("conflict-histogram-samples", {"quantize": {"calibration": {"method": "entropy", "samples": 5000}}},
                r"quantize\.calibration\.samples: at most 4096 with method 'entropy'"),
    config_case("imagefolder-without-root", {"data": {"dataset": "imagefolder"}}, r"^pipeline\.yaml: data\.root: required"),
    config_case("name-escapes-runs-folder", {"name": "../../elsewhere"}, r"^pipeline\.yaml: name: must be letters, digits"),
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
    stage_case("data-empty-folder", imagefolder(), r"/images: no class sub-folders \(expected root/<class>/<image>\)$",
               extra=lambda folder: (folder / "images").mkdir()),
    stage_case("data-one-class", imagefolder(), r"/images: needs at least 2 classes with images \(found \['cat'\]\)$",
               extra=one_class),
    stage_case("data-corrupt-image", imagefolder(), r"/images/dog/broken\.png: unreadable image \((OSError|UnidentifiedImageError)",
               extra=corrupt_image),
    stage_case("data-wrong-channels", imagefolder(), r"/b_colour/0\.png: has 3 channels, expected 1 \(set data\.channels",
               extra=mixed_channels),
    # -- models -------------------------------------------------------------------------------------
    stage_case("model-unknown-name", {"teacher": {"model": "resnet_nope"}}, r"^teacher\.model: unknown model 'resnet_nope' \(available: cnn,"),
    stage_case("model-factory-raises", {"teacher": {"model": "bad_factories:explode"}},
               r"^teacher\.model: factory bad_factories:explode raised RuntimeError: boom: out of widgets$",
               extra=factory_module, env={"PYTHONPATH": "."}),
    stage_case("model-checkpoint-of-other-architecture", {"teacher": {"checkpoint": "tiny.pt"}},
               r"/tiny\.pt: does not fit the architecture: '.+' has shape \(.+\), the model expects \(.+\)$",
               extra=small_checkpoint("tiny.pt")),
    config_case("model-checkpoint-missing", {"teacher": {"checkpoint": "nope.pt"}},
                r"^pipeline\.yaml: teacher\.checkpoint: no such file: .*/nope\.pt$"),
    stage_case("model-checkpoint-truncated", {"teacher": {"checkpoint": "cut.pt"}}, r"/cut\.pt: corrupt or truncated checkpoint",
               extra=truncated_checkpoint),
    stage_case("model-checkpoint-not-a-state-dict", {"teacher": {"checkpoint": "list.pt"}},
               r"/list\.pt: not a state_dict \(expected a mapping of parameter names to tensors\)$", extra=list_pickle),
    # -- ONNX files (edgekd bench) -------------------------------------------------------------------
    tool_case("onnx-not-onnx", ["bench", "notes.onnx", "--no-memory", "--no-mobile"], r"^notes\.onnx: not an ONNX model",
              onnx_files),
    tool_case("onnx-wrong-input-shape", ["bench", "tiny.onnx", "--data", "rgb.npz", "--no-memory", "--no-mobile"],
              r"input shape \(1, 3, 8, 8\) does not match the model's input 'input' \[N, 1, 8, 8\]", onnx_files),
    tool_case("onnx-missing-file", ["bench", "gone.onnx", "--no-memory", "--no-mobile"], r"^gone\.onnx: not an ONNX model \(file not found\)$"),
    tool_case("onnx-unknown-provider", ["bench", "tiny.onnx", "--providers", "warpdrive", "--no-memory", "--no-mobile"],
              r"^execution provider 'warpdrive' is not available", onnx_files),
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
]


# --------------------------------------------------------------------------------------------------
# Running the matrix


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@dataclass
class Outcome:
    folder: Path
    before: dict[str, str]
    proc: Any = None


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    """Every selected case, set up here and run two at a time as real `python -m edgekd` processes."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    results: dict[str, Future] = {}
    pool = ThreadPoolExecutor(max_workers=2)
    request.addfinalizer(pool.shutdown)
    for case in CASES:
        if case.id not in selected:
            continue
        folder = tmp_path_factory.mktemp(case.id)
        args = case.setup(folder)
        outcome = Outcome(folder, snapshot(folder))

        def job(case: Case = case, args: list[str] = args, outcome: Outcome = outcome) -> Outcome:
            outcome.proc = run_edgekd(*args, cwd=outcome.folder, env=case.env, timeout=300)
            return outcome

        results[case.id] = pool.submit(job)
    return results


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_with_one_line_naming_the_cause_and_writes_nothing(case: Case, outcomes: dict[str, Future]) -> None:
    outcome: Outcome = outcomes[case.id].result()
    proc = outcome.proc
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == case.code, shown
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    lines = error_lines(proc.stderr)  # progress logs before a stage fails are not the error
    if case.usage:  # click's own usage error: "Usage: ...", "Try '... -h' for help.", then the one Error line
        lines = [line for line in lines if not CLICK_LINES.match(line)]
    assert len(lines) == 1, shown
    assert re.search(case.cause, lines[0]), f"{lines[0]!r} does not match {case.cause!r}\n{shown}"

    after = snapshot(outcome.folder)
    changed = sorted(name for name in outcome.before if after.get(name) != outcome.before[name])
    assert not changed, f"changed or removed: {changed}"
    new = sorted(set(after) - set(outcome.before))
    allowed = BOOKKEEPING if case.writes == "bookkeeping" else set()
    assert not [name for name in new if name not in allowed], f"new files: {new}"
    if case.writes == "bookkeeping" and (outcome.folder / RUN_DIR / "manifest.json").exists():
        manifest = json.loads((outcome.folder / RUN_DIR / "manifest.json").read_text())
        assert manifest["stages"] == {}, "a failed stage must not be recorded"


def test_bad_input_matrix_covers_every_category_with_at_least_30_cases() -> None:
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)
    kinds = {case.id.split("-")[0] for case in CASES}
    assert {"cli", "data", "model", "onnx", "report"} <= kinds
    assert sum(1 for case in CASES if case.id.split("-")[0] not in {"cli", "data", "model", "onnx", "report"}) >= 10
