"""pipeline.yaml validation: every bad value is one line naming the file and key, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgekd.cli import main
from edgekd.config import load_config, validate_config
from edgekd.errors import ConfigError
from edgekd.yamlio import load_yaml_text

BAD_CONFIGS = [
    ({"distill": {"temperature": -1}}, "pipeline.yaml: distill.temperature: must be > 0 (got -1)"),
    ({"distill": {"temprature": 2}}, "pipeline.yaml: distill.temprature: unknown key; did you mean 'temperature'?"),
    ({"distill": {"alpha": 1.5}}, "pipeline.yaml: distill.alpha: must be <= 1 (got 1.5)"),
    ({"distill": {"hint": {"teacher_layer": "stage2", "student_layer": "stage2", "weight": -0.5}}},
     "pipeline.yaml: distill.hint.weight: must be >= 0 (got -0.5)"),
    ({"data": {"dataset": "mnist"}}, "pipeline.yaml: data.dataset: must be one of 'mnist5k', 'digits', 'synthetic', 'imagefolder', 'filelist' or 'cifar10' (got 'mnist')"),
    ({"prune": {"ratio": 0.3, "target_macs": 0.5}}, "pipeline.yaml: prune: set only one of ratio, target_macs, target_params, target_latency_ms, target_speedup (got ratio, target_macs)"),
    ({"prune": {"ratio": 1.5}}, "pipeline.yaml: prune.ratio: must be < 1 (got 1.5)"),
    ({"prune": {"ratio": 0}}, "pipeline.yaml: prune.ratio: must be > 0 (got 0)"),
    ({"benchmark": {"threads": [0]}}, "pipeline.yaml: benchmark.threads: must be >= 1 (got 0)"),
    ({"benchmark": {"threads": "two"}}, "pipeline.yaml: benchmark.threads: must be a list (got 'two')"),
    ({"budgets": {"latency_threads": 4}}, "pipeline.yaml: budgets.latency_threads: 4 is not in benchmark.threads [1, 2]"),
    ({"data": {"dataset": "imagefolder"}}, "pipeline.yaml: data.root: required for dataset 'imagefolder'"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, "pipeline.yaml: data: val_fraction + test_fraction must be < 0.9 (got 0.5 + 0.5)"),
    ({"quantize": {"calibration": {"method": "entropy", "samples": 10000}}},
     "pipeline.yaml: quantize.calibration.samples: at most 4096 with method 'entropy'"),
    ({"quantize": {"calibration": {"method": "distribution"}}}, "pipeline.yaml: quantize.calibration.method: must be one of 'minmax', 'entropy' or 'percentile'"),
    ({"distill": None, "prune": {"source": "student"}}, "pipeline.yaml: prune.source: 'student' needs the distill stage"),
    ({"teacher": {"train": {"lr": "abc"}}}, "pipeline.yaml: teacher.train.lr: must be a number (got 'abc')"),
    ({"teacher": {"train": {"epochs": 2.5}}}, "pipeline.yaml: teacher.train.epochs: must be an integer (got 2.5)"),
    ({"distil": {}}, "pipeline.yaml: distil: unknown key; did you mean 'distill'?"),
    ({"name": "a b"}, "pipeline.yaml: name: must be letters, digits, '.', '_' or '-' (got 'a b')"),
    ({"device": "gpu"}, "pipeline.yaml: device: must be auto, cpu, cuda, cuda:N or mps (got 'gpu')"),
    ({"export": {"opset": 5}}, "pipeline.yaml: export.opset: must be >= 11 (got 5)"),
    ({"distill": {"hint": {"teacher_layer": "stage2"}}}, "pipeline.yaml: distill.hint.student_layer: required"),
    ({"data": {"batch_size": 0}}, "pipeline.yaml: data.batch_size: must be > 0 (got 0)"),
    ({"teacher": "cnn_large"}, "pipeline.yaml: teacher: must be a mapping of settings (got 'cnn_large')"),
    ({"quantize": {"mode": "int4"}}, "pipeline.yaml: quantize.mode: must be one of 'static' or 'dynamic' (got 'int4')"),
    ({"budgets": {"min_accuracy": 2}}, "pipeline.yaml: budgets.min_accuracy: must be <= 1 (got 2)"),
]


@pytest.mark.parametrize("raw, message", BAD_CONFIGS, ids=[m.split(": ")[1] for _, m in BAD_CONFIGS])
def test_validate_config_reports_key_and_value_when_invalid(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_config(raw)
    assert str(excinfo.value).startswith(message)
    assert "\n" not in str(excinfo.value)


def test_run_exits_2_without_traceback_or_files_when_config_invalid(tmp_path: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text("name: bad\ndistill:\n  temperature: -1\n")
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 2
    assert result.output.strip() == "pipeline.yaml: distill.temperature: must be > 0 (got -1)"
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: a\nname: b\n", "pipeline.yaml:2:1: YAML syntax error: duplicate key 'name'"),
        ("data: [1, 2\n", "pipeline.yaml:2:1: YAML syntax error"),
        ("data:\n  dataset: x\n bad: 1\n", "pipeline.yaml:3:2: YAML syntax error"),
        ("- 1\n- 2\n", "pipeline.yaml: the top level must be a mapping of sections (got list)"),
    ],
)
def test_load_config_names_file_and_line_when_yaml_is_broken(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(excinfo.value).startswith(message)


def test_yaml_loader_reads_exponent_floats_and_only_true_false_as_booleans() -> None:
    loaded = load_yaml_text("lr: 1e-3\nbaseline: no\nflag: true\nhalf: .5\nname: off\n", "x.yaml")
    assert loaded == {"lr": 0.001, "baseline": "no", "flag": True, "half": 0.5, "name": "off"}


def test_validate_config_coerces_yes_no_strings_for_boolean_fields() -> None:
    cfg = validate_config({"distill": {"baseline": "no", "lr": "1e-3"}, "prune": {"global": True}})
    assert cfg.distill.baseline is False
    assert cfg.distill.lr == pytest.approx(0.001)
    assert cfg.prune.global_pruning is True


def test_validate_config_defaults_prune_ratio_and_switches_stages_off_with_null() -> None:
    from edgekd.stages import distill, prune, quantize

    cfg = validate_config({"prune": None, "quantize": None, "distill": None})
    assert [stage.plan(cfg) for stage in (distill, prune, quantize)] == [None, None, None]
    assert validate_config({}).prune.ratio == 0.3


@pytest.mark.parametrize(("raw", "message"), [
    ({"distill": {"enabled": False}},
     "pipeline.yaml: distill.enabled: not a setting; switch the stage off with `distill: null` (or delete the key to keep it on)"),
    ({"prune": {"enabled": True}},
     "pipeline.yaml: prune.enabled: not a setting; switch the stage off with `prune: null` (or delete the key to keep it on)"),
    ({"quantize": {"mode": "none"}},
     "pipeline.yaml: quantize.mode: 'none' is not a mode; switch the stage off with `quantize: null`"),
])
def test_validate_config_points_other_off_switches_to_null(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert str(info.value) == message and info.value.exit_code == 2


def test_load_config_resolves_relative_paths_against_the_config_folder_and_requires_them_to_exist(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text(
        "name: rel\ndata: {dataset: imagefolder, root: images}\nteacher: {checkpoint: ckpt/teacher.pt}\n"
    )
    with pytest.raises(ConfigError, match=r"^pipeline.yaml: teacher.checkpoint: no such file: .*ckpt/teacher.pt$"):
        load_config(folder / "pipeline.yaml")
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "teacher.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^pipeline.yaml: teacher.checkpoint: .*ckpt/teacher.pt: empty file, not a PyTorch"):
        load_config(folder / "pipeline.yaml")
    (folder / "ckpt" / "teacher.pt").write_bytes(b"PK\x03\x04")  # what torch.save's zip files start with
    with pytest.raises(ConfigError, match=r"^pipeline.yaml: data.root: no such folder: .*project/images$"):
        load_config(folder / "pipeline.yaml")
    (folder / "images").mkdir()
    cfg = load_config(folder / "pipeline.yaml")
    assert cfg.data.root == (folder / "images").resolve()
    assert cfg.teacher.checkpoint == (folder / "ckpt" / "teacher.pt").resolve()
    assert cfg.output_dir == (folder / "runs" / "rel").resolve()


def test_shipped_pipelines_validate(tmp_path: Path) -> None:
    from PIL import Image

    # pipelines over generated image folders (not in the repository) validate against a stand-in folder
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        Image.new("RGB", (300, 260), (40, 90, 200)).save(tmp_path / "photos" / label / "1.jpg")
    repo = Path(__file__).resolve().parents[1]
    shipped = [repo / "pipeline.yaml", repo / "edgekd" / "templates" / "pipeline.yaml",
               *sorted((repo / "benchmarks" / "pipelines").glob("*.yaml"))]
    for path in shipped:
        raw = yaml.safe_load(path.read_text())
        generated = raw.get("data", {}).get("dataset") == "imagefolder" and not (path.parent / raw["data"]["root"]).exists()
        overrides = {"data.root": str(tmp_path / "photos")} if generated else None
        assert load_config(path, overrides=overrides).name


def test_init_writes_a_starter_config_that_validates(tmp_path: Path) -> None:
    target = tmp_path / "new.yaml"
    result = CliRunner().invoke(main, ["init", str(target)])
    assert result.exit_code == 0, result.output
    cfg = load_config(target)
    assert cfg.data.dataset == "mnist5k"
    again = CliRunner().invoke(main, ["init", str(target)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_config_reference_is_up_to_date() -> None:
    from edgekd.config_docs import render

    repo = Path(__file__).resolve().parents[1]
    assert (repo / "docs" / "config.md").read_text() == render(), "run: python -m edgekd.config_docs > docs/config.md"
