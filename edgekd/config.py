"""pipeline.yaml as one typed pydantic model, composed from the sections their owners declare (each stage
package's `config`, `data.config`, `gate.budgets`): the one place configuration is validated.

Every field carries its documentation as an attribute docstring; `docs/config.md` is generated from them
(`python -m edgekd.config_docs > docs/config.md`, checked by a test).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from edgekd.data.config import DataConfig
from edgekd.errors import ConfigError
from edgekd.gate.budgets import BudgetsConfig
from edgekd.stages.benchmark.config import BenchmarkConfig
from edgekd.stages.distill.config import DistillConfig, StudentConfig
from edgekd.stages.export.config import ExportConfig
from edgekd.stages.prune.config import PruneConfig
from edgekd.stages.quantize.config import QuantizeConfig
from edgekd.stages.report.config import ReportConfig
from edgekd.stages.teacher.config import TeacherConfig
from edgekd.validation import Section, format_validation_error
from edgekd.yamlio import load_yaml_file

# The budgets a latency-chosen student is chosen by (student.candidates, student.model: auto).
CHOICE_BUDGETS = ("latency_p50_ms", "latency_p90_ms", "min_speedup")

# The stages that can be switched off, and the one way to do it: `<stage>: null`.
OPTIONAL_STAGES = ("distill", "prune", "quantize")


class PipelineConfig(Section):
    name: str = "edgekd-run"
    """Run name; the default output_dir is runs/<name>."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of splits, initialisation and shuffling (0 to 2^32-1: what numpy and torch both take)."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda | cuda:N."""
    output_dir: Path | None = None
    """Run directory (default runs/<name>, relative to this file)."""
    data: DataConfig = DataConfig()
    """Dataset, splits and batch sizes."""
    teacher: TeacherConfig = TeacherConfig()
    """The teacher: a checkpoint to load, or an architecture to train."""
    student: StudentConfig = StudentConfig()
    """The student architecture."""
    distill: DistillConfig | None = DistillConfig()
    """Knowledge distillation into the student (null: off)."""
    prune: PruneConfig | None = PruneConfig()
    """Structured channel pruning with KD recovery (null: off)."""
    export: ExportConfig = ExportConfig()
    """ONNX export and parity checks."""
    quantize: QuantizeConfig | None = QuantizeConfig()
    """Post-training int8 with onnxruntime.quantization (null: off)."""
    benchmark: BenchmarkConfig = BenchmarkConfig()
    """ONNX Runtime latency, throughput, memory and accuracy of every artifact."""
    budgets: BudgetsConfig = BudgetsConfig()
    """Limits that make `edgekd run` exit 1 when breached."""
    report: ReportConfig = ReportConfig()
    """Report rendering."""

    _dataset_files: dict[str, Any] | None = PrivateAttr(default=None)
    _data_defaults: tuple[dict[str, Any]] | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (got {value!r})")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {value!r})")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.prune is not None and self.prune.source == "student" and self.distill is None:
            raise ValueError("prune.source: 'student' needs the distill stage (enable distill or prune the teacher)")
        if self.report.deploy_runtime not in self.export.targets:
            raise ValueError(f"report.deploy_runtime: '{self.report.deploy_runtime}' is not in export.targets "
                             f"{self.export.targets} (add it there to deploy a {self.report.deploy_runtime} file)")
        if self.student.chooses:
            what = "student.candidates" if self.student.candidates is not None else "student.model: auto"
            if self.distill is None:
                raise ValueError(f"{what}: chooses the student the distill stage trains; enable distill")
            if not any(getattr(self.budgets, b) is not None for b in CHOICE_BUDGETS):
                raise ValueError(f"{what}: needs a latency budget to choose by (budgets.latency_p50_ms, "
                                 "latency_p90_ms or min_speedup)")
        if self.teacher.onnx is not None:  # an ONNX teacher gives logits only: no features, no weights to prune
            if self.distill is not None and self.distill.hint is not None:
                raise ValueError("distill.hint: hint losses need the teacher's features, which an ONNX teacher "
                                 "(teacher.onnx) does not expose; remove distill.hint or use a PyTorch teacher")
            if self.prune is not None and self.prune.source == "teacher":
                raise ValueError("prune.source: an ONNX teacher (teacher.onnx) cannot be pruned; prune the student")
        if self.budgets.latency_threads not in self.benchmark.threads:
            raise ValueError(
                f"budgets.latency_threads: {self.budgets.latency_threads} is not in benchmark.threads {self.benchmark.threads}"
            )
        if self.budgets.latency_batch not in self.benchmark.batch_sizes:
            raise ValueError(
                f"budgets.latency_batch: {self.budgets.latency_batch} is not in benchmark.batch_sizes {self.benchmark.batch_sizes}"
            )
        return self

    @property
    def run_dir(self) -> Path:
        if self.output_dir is None:
            raise ValueError("output_dir is set by load_config / validate_config")
        return self.output_dir

    @property
    def model_factories(self) -> tuple[str, ...]:
        """The model specs this config names: the only `pkg.module:factory` a checkpoint's meta may rebuild."""
        return (self.teacher.model, *self.student.specs())

    def data_view(self) -> dict[str, Any]:
        """What decides the data every training stage sees (part of their fingerprints): the `data:` section,
        the seed, and the dataset files' signature (so added or changed images rerun what read them)."""
        if self._dataset_files is None:  # one walk of the dataset folder per run, not one per stage
            from edgekd.data.sources import dataset_signature

            self._dataset_files = dataset_signature(self.data)
        view: dict[str, Any] = {"data": self.data.view(), "seed": self.seed}
        defaults = self.data_defaults()
        if defaults:  # resize/crop/mean/std the config leaves to the pretrained weights decide the inputs too
            view["pretrained_preprocessing"] = defaults
        return {**view, "dataset_files": self._dataset_files} if self._dataset_files else view

    def data_defaults(self) -> dict[str, Any] | None:
        """For image files: the eval transform of the run's pretrained weights (teacher first, then student),
        which fills the data keys the config leaves unset; None otherwise (bundled datasets keep theirs)."""
        if self.data.dataset not in ("imagefolder", "filelist"):
            return None
        if self._data_defaults is None:
            from edgekd.models.pretrained import preprocessing_defaults

            self._data_defaults = (preprocessing_defaults(self.teacher, self.student) or {},)
        return self._data_defaults[0] or None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dump (paths as strings, aliases as written in YAML): what resolved-config.yaml records."""
        return self.view()


# --------------------------------------------------------------------------------------------------
# Loading and error messages


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check_off_switches(raw: dict[str, Any], source: str) -> None:
    """`<stage>: null` is the one way to switch a stage off; the other spellings get a pointer to it."""
    for stage in OPTIONAL_STAGES:
        section = raw.get(stage)
        if not isinstance(section, dict):
            continue
        if "enabled" in section:
            raise ConfigError(f"{source}: {stage}.enabled: not a setting; switch the stage off with `{stage}: null`"
                              f" (or delete the key to keep it on)")
        if stage == "quantize" and section.get("mode") == "none":
            raise ConfigError(f"{source}: quantize.mode: 'none' is not a mode; switch the stage off with `quantize: null`")


def validate_config(raw: Any, source: str = "pipeline.yaml", base_dir: Path | None = None) -> PipelineConfig:
    """Validate a parsed config mapping; relative paths resolve against base_dir."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (got {type(raw).__name__})")
    _check_off_switches(raw, source)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(PipelineConfig, exc, source)) from None
    base = (base_dir or Path.cwd()).resolve()
    cfg.output_dir = _resolve(cfg.output_dir or Path("runs") / cfg.name, base)
    cfg.data.root = _resolve(cfg.data.root, base)
    cfg.data.val_root = _resolve(cfg.data.val_root, base)
    cfg.teacher.checkpoint = _resolve(cfg.teacher.checkpoint, base)
    cfg.teacher.onnx = _resolve(cfg.teacher.onnx, base)
    cfg.student.checkpoint = _resolve(cfg.student.checkpoint, base)
    _check_paths_exist(cfg, source)
    return cfg


# torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle (protocol 2+: 0x80).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_paths_exist(cfg: PipelineConfig, source: str) -> None:
    """Missing input files are config errors, caught before anything is written."""
    for key, checkpoint in (("teacher.checkpoint", cfg.teacher.checkpoint),
                            ("student.checkpoint", cfg.student.checkpoint)):
        if checkpoint is None:
            continue
        if not checkpoint.is_file():
            raise ConfigError(f"{source}: {key}: no such file: {checkpoint}")
        try:
            with open(checkpoint, "rb") as handle:
                head = handle.read(4)
        except OSError as exc:
            raise ConfigError(f"{source}: {key}: {checkpoint}: cannot read ({exc.strerror})") from None
        if not head:
            raise ConfigError(f"{source}: {key}: {checkpoint}: empty file, not a PyTorch checkpoint")
        if not head.startswith(_CHECKPOINT_MAGIC):
            raise ConfigError(f"{source}: {key}: {checkpoint}: not a PyTorch checkpoint "
                              f"(expected a torch.save file; it starts with {head!r})")
    if cfg.teacher.onnx is not None and not cfg.teacher.onnx.is_file():
        raise ConfigError(f"{source}: teacher.onnx: no such file: {cfg.teacher.onnx}")
    for key, folder in (("data.root", cfg.data.root), ("data.val_root", cfg.data.val_root)):
        downloadable = key == "data.root" and cfg.data.dataset == "cifar10" and cfg.data.download
        if cfg.data.dataset == "filelist":  # a .csv / .jsonl list of path,label
            if folder is not None and not folder.is_file():
                raise ConfigError(f"{source}: {key}: no such file list: {folder}")
        elif folder is not None and not folder.is_dir() and not downloadable:
            raise ConfigError(f"{source}: {key}: no such folder: {folder}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate pipeline.yaml. Raises ConfigError with `file: key: problem` lines.

    `overrides` maps dotted key paths (`distill.epochs`) or top-level keys to values; they are applied to
    the file's mapping before validation (see `apply_overrides`), so they are checked like the file.
    """
    path = Path(path)
    raw = load_yaml_file(path)
    if raw is None or raw == {}:  # an empty file would otherwise run the whole default pipeline
        raise ConfigError(f"{path.name}: empty config (no settings); `edgekd init --force {path}` writes a "
                          "commented starter that runs as is")
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return validate_config(raw, source=path.name, base_dir=path.parent)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with each `dotted.key.path: value` set; a mapping value is merged into the section
    it names (`{"distill": {"epochs": 2}}` keeps distill's other keys), `None` switches a section off.
    Setting a key inside a section that is null (switched off) switches it on with that key."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = [p for p in str(dotted).split(".")]
        if not all(parts):
            raise ConfigError(f"override {dotted!r}: not a key path like distill.epochs")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None and part in node:
                    where = ".".join(parts[: i + 1])
                    raise ConfigError(f"override {dotted}: {where} is not a section (it is {child!r})")
                child = node[part] = {}
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _deep_merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return result


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (_deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged


def parse_set_options(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--set key.path=value` items as overrides; each value is read as YAML with the file's rules
    (`1e-3` a number, only true/false booleans, `[1, 2]` a list, `null` switches a section off)."""
    from edgekd.yamlio import load_yaml_text

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY.PATH=VALUE, e.g. --set distill.epochs=2")
        overrides[key] = load_yaml_text(text, f"--set {key}") if text.strip() else ""
    return overrides
