"""pipeline.yaml as typed pydantic models: the one place configuration is validated.

Every field carries its documentation as an attribute docstring; `docs/config.md` is generated from them
(`python -m edgekd.config_docs > docs/config.md`, checked by a test).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgekd.config_errors import format_validation_error
from edgekd.errors import ConfigError
from edgekd.yamlio import load_yaml_file

STAGES = ("teacher", "distill", "prune", "export", "quantize", "benchmark", "report")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)


class SyntheticConfig(_Section):
    num_samples: int = Field(2000, gt=0)
    """Images generated (class-dependent patterns plus noise; learnable, for fast tests)."""
    num_classes: int = Field(4, ge=2)
    """Number of classes."""
    image_size: int = Field(16, ge=4)
    """Height and width."""
    channels: Literal[1, 3] = 1
    """1 (grey) or 3 (RGB)."""
    noise: float = Field(0.5, ge=0)
    """Standard deviation of the Gaussian noise added to the class pattern."""


class DataConfig(_Section):
    dataset: Literal["mnist5k", "digits", "synthetic", "imagefolder", "cifar10"] = "mnist5k"
    """mnist5k (bundled, offline) | digits (sklearn 8x8, offline) | synthetic | imagefolder | cifar10."""
    root: Path | None = None
    """Folder for imagefolder (one sub-folder per class) and cifar10 (torchvision on-disk format)."""
    val_root: Path | None = None
    """imagefolder only: a separate validation folder; without it the split comes from `root`."""
    download: bool = False
    """cifar10 only: download into `root` when missing (needs internet)."""
    image_size: int | None = Field(None, ge=4)
    """imagefolder: resize images to this square size (default 32)."""
    channels: Literal[1, 3] | None = None
    """imagefolder: convert images to 1 or 3 channels (default: 3)."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the data held out for validation (model selection, quantization checks)."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Fraction held out for the final test accuracy; never used for training, calibration or selection."""
    batch_size: int = Field(128, gt=0)
    """Training batch size (per process under torchrun: the global batch is batch_size x world size)."""
    eval_batch_size: int = Field(512, gt=0)
    """Batch size for evaluation."""
    limit: int | None = Field(None, gt=0)
    """Use at most this many samples in total (quick experiments)."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """Settings of the synthetic dataset."""

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must be < 0.9 (got {self.val_fraction} + {self.test_fraction})"
            )
        if self.dataset in ("imagefolder", "cifar10") and self.root is None:
            raise ValueError(f"root: required for dataset '{self.dataset}'")
        return self


class TrainConfig(_Section):
    epochs: int = Field(5, ge=0)
    """Training epochs."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (for the global batch)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw | sgd (with Nesterov momentum)."""
    weight_decay: float = Field(1e-4, ge=0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    schedule: Literal["cosine", "onecycle", "constant"] = "onecycle"
    """Learning-rate schedule, stepped per batch."""
    warmup_fraction: float = Field(0.15, ge=0, lt=1)
    """onecycle: fraction of the steps spent warming up."""
    augment: bool = True
    """Light augmentation: random shifts of up to 2 pixels (plus horizontal flips for natural images)."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Label smoothing of the hard-label cross-entropy."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradient norm to this value."""
    amp: bool = True
    """Mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU."""
    channels_last: bool = False
    """Train in channels_last memory format (faster convolutions on recent GPUs)."""


class TeacherConfig(_Section):
    model: str = "cnn_large"
    """Registry name (see `edgekd models`), `torchvision:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory (e.g. {widths: [32, 64, 128], blocks: 1}; `edgekd models` lists the built-in cnn's)."""
    checkpoint: Path | None = None
    """A state_dict file (.pt/.pth/.safetensors-free torch.save); when absent the teacher is trained here."""
    train: TrainConfig = TrainConfig(epochs=8)
    """How the teacher is trained when no checkpoint is given."""


class StudentConfig(_Section):
    model: str = "cnn_small"
    """Registry name, `torchvision:<name>`, or `pkg.module:factory`."""
    model_kwargs: dict[str, Any] = {}
    """Keyword arguments for the model factory."""


class HintConfig(_Section):
    teacher_layer: str
    """Name of the teacher module whose output is the hint (as in model.named_modules())."""
    student_layer: str
    """Name of the student module that is trained to match it (through a learned 1x1 adapter)."""
    weight: float = Field(1.0, ge=0)
    """beta: weight of the hint (MSE) term."""


class DistillConfig(TrainConfig):
    enabled: bool = True
    """Run the stage (`distill: null` also switches it off)."""
    epochs: int = Field(10, ge=1)
    """Distillation epochs."""
    temperature: float = Field(4.0, gt=0)
    """Softmax temperature T of the soft targets."""
    alpha: float = Field(0.1, ge=0, le=1)
    """Weight of the hard-label CE term: loss = alpha*CE + (1-alpha)*T^2*KL."""
    hint: HintConfig | None = None
    """Optional FitNets-style feature hint."""
    baseline: bool = True
    """Also train the same student without KD (same schedule, seed, data) to show the KD gain."""
    cache_teacher_logits: bool = True
    """Compute teacher logits once per sample and reuse them (only when augment is false)."""


class PruneConfig(_Section):
    enabled: bool = True
    """Run the stage (`prune: null` also switches it off)."""
    source: Literal["student", "teacher"] = "student"
    """Which model is pruned: the distilled student, or the teacher (a second student route)."""
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l2"
    """Channel importance: weight magnitude (l1/l2), first-order Taylor (gradients), or BatchNorm scale."""
    ratio: float | None = Field(None, gt=0, lt=1)
    """Fraction of CHANNELS removed per prunable layer (0.5 keeps ~25% of a conv's parameters)."""
    target_macs: float | None = Field(None, gt=0)
    """MACs to keep: a fraction of the original when <= 1, else an absolute count."""
    target_params: float | None = Field(None, gt=0)
    """Parameters to keep: a fraction of the original when <= 1, else an absolute count."""
    global_pruning: bool = Field(False, alias="global")
    """Rank channels across layers (global) instead of per layer."""
    steps: int = Field(1, ge=1)
    """Prune iteratively in this many steps, with recovery fine-tuning after each."""
    round_to: int | None = Field(None, ge=1)
    """Keep channel counts a multiple of this (SIMD-friendly widths, e.g. 8)."""
    ignore: list[str] = []
    """Module names never pruned (the classifier head is always ignored)."""
    taylor_batches: int = Field(4, ge=1)
    """Batches of training data used to estimate Taylor importance."""
    finetune: TrainConfig = TrainConfig(epochs=3, lr=1e-3)
    """Recovery fine-tuning with KD from the teacher (temperature/alpha from `distill`)."""

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        targets = [n for n in ("ratio", "target_macs", "target_params") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise ValueError(f"set only one of ratio, target_macs, target_params (got {', '.join(targets)})")
        if not targets:
            self.ratio = 0.3
        return self


class ExportConfig(_Section):
    opset: int = Field(17, ge=11, le=25)
    """ONNX opset requested; the opset actually written is read back and recorded."""
    dynamo: bool = False
    """Use the torch.export-based exporter (True) or the TorchScript one (False; stable for CNNs, deterministic)."""
    dynamic_batch: bool = True
    """Export with a dynamic batch axis."""
    parity_atol: float = Field(1e-4, gt=0)
    """Max |ORT - PyTorch| on logits allowed; beyond it the stage fails (exit 3)."""
    parity_batch_sizes: list[int] = [1, 7, 64]
    """Batch sizes checked for parity (not only the traced one)."""
    ort_format: bool = True
    """Also write an ONNX Runtime Mobile `.ort` copy of the deployable model."""


class CalibrationConfig(_Section):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """minmax | entropy | percentile (entropy/percentile keep all activation histograms in memory)."""
    samples: int = Field(512, gt=0, le=20000)
    """Training images used for calibration (never test images)."""
    percentile: float = Field(99.999, gt=90, le=100)
    """percentile method: the percentile kept."""

    @model_validator(mode="after")
    def _bound_histogram_methods(self) -> CalibrationConfig:
        if self.method != "minmax" and self.samples > 4096:
            raise ValueError(
                f"samples: at most 4096 with method '{self.method}' (histograms of every activation stay in memory; got {self.samples})"
            )
        return self


class QuantizeConfig(_Section):
    mode: Literal["static", "dynamic", "none"] = "static"
    """static (calibrated int8) | dynamic (weights int8, activations quantized at run time) | none."""
    format: Literal["qdq", "qoperator"] = "qdq"
    """Quantized graph format."""
    per_channel: bool = True
    """Per-channel weight scales."""
    reduce_range: bool | Literal["auto"] = "auto"
    """7-bit weights; auto = on for CPUs without VNNI, where uint8 x int8 can saturate."""
    activation_type: Literal["uint8", "int8", "auto"] = "auto"
    """Activation type; auto picks from the CPU's flags."""
    weight_type: Literal["int8", "uint8"] = "int8"
    """Weight type."""
    calibration: CalibrationConfig = CalibrationConfig()
    """Static calibration."""
    exclude_nodes: list[str] = []
    """Node names kept in float (validated against the pre-processed graph)."""
    exclude_op_types: list[str] = []
    """Operator types kept in float (e.g. [Softmax])."""
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    """Largest validation accuracy drop of int8 vs its fp32 source that is accepted."""
    fallback: bool = True
    """When int8 drops more than allowed, keep the fp32 model as the deployable candidate."""
    search: bool = True
    """When int8 is not faster than fp32, also try the other sensible settings and keep the best."""
    source: Literal["auto", "pruned", "student", "teacher"] = "auto"
    """Model quantized; auto = the last model of the chain (pruned, else student, else teacher)."""


class BenchmarkConfig(_Section):
    threads: list[int] = [1, 2]
    """Intra-op thread counts measured."""
    batch_sizes: list[int] = [1, 32]
    """Batch sizes measured."""
    warmup: int = Field(20, ge=0)
    """Warm-up runs per model and setting."""
    iterations: int = Field(200, ge=5)
    """Timed runs per model and setting (interleaved across models)."""
    chunk: int = Field(10, ge=1)
    """Runs per model before moving to the next (round-robin interleaving; between turns each session parks
    its thread-pool workers, so one model's idle threads never slow the next)."""
    memory: bool = True
    """Measure peak memory per model in a fresh process."""
    torch_reference: bool = True
    """Also time PyTorch eager teacher and student as a reference row."""
    providers: list[str] = ["CPUExecutionProvider"]
    """ONNX Runtime execution providers."""

    @field_validator("threads", "batch_sizes")
    @classmethod
    def _positive_list(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("must not be empty")
        bad = [v for v in value if v < 1]
        if bad:
            raise ValueError(f"must be >= 1 (got {bad[0]})")
        return value


class BudgetsConfig(_Section):
    latency_p50_ms: float | None = Field(None, gt=0)
    """Max p50 latency of the deployed artifact (at latency_threads / latency_batch)."""
    latency_p90_ms: float | None = Field(None, gt=0)
    """Max p90 latency."""
    latency_p99_ms: float | None = Field(None, gt=0)
    """Max p99 latency."""
    latency_threads: int = Field(1, ge=1)
    """Thread count at which latency budgets apply (must be in benchmark.threads)."""
    latency_batch: int = Field(1, ge=1)
    """Batch size at which latency budgets apply (must be in benchmark.batch_sizes)."""
    size_kb: float | None = Field(None, gt=0)
    """Max file size of the deployed model in KiB."""
    min_accuracy: float | None = Field(None, ge=0, le=1)
    """Min test accuracy of the deployed model."""
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    """Max test-accuracy drop vs the teacher (0.01 = one point)."""
    min_speedup: float | None = Field(None, gt=0)
    """Min p50 speed-up of the deployed model vs the teacher, measured in the same run."""


class ReportConfig(_Section):
    html: bool = True
    """Write report.html (self-contained, plots inlined)."""
    plots: bool = True
    """Draw plots (matplotlib)."""


class PipelineConfig(_Section):
    name: str = "edgekd-run"
    """Run name; the default output_dir is runs/<name>."""
    seed: int = 0
    """Seed of splits, initialisation and shuffling."""
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
    """Post-training int8 with onnxruntime.quantization (null or mode none: off)."""
    benchmark: BenchmarkConfig = BenchmarkConfig()
    """ONNX Runtime latency, throughput, memory and accuracy of every artifact."""
    budgets: BudgetsConfig = BudgetsConfig()
    """Limits that make `edgekd run` exit 1 when breached."""
    report: ReportConfig = ReportConfig()
    """Report rendering."""

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
        if self.prune_enabled and self.prune.source == "student" and not self.distill_enabled:
            raise ValueError("prune.source: 'student' needs the distill stage (enable distill or prune the teacher)")
        if self.budgets.latency_threads not in self.benchmark.threads:
            raise ValueError(
                f"budgets.latency_threads: {self.budgets.latency_threads} is not in benchmark.threads {self.benchmark.threads}"
            )
        if self.budgets.latency_batch not in self.benchmark.batch_sizes:
            raise ValueError(
                f"budgets.latency_batch: {self.budgets.latency_batch} is not in benchmark.batch_sizes {self.benchmark.batch_sizes}"
            )
        return self

    # Switched-off stages: `section: null` or `enabled: false`.
    @property
    def distill_enabled(self) -> bool:
        return self.distill is not None and self.distill.enabled

    @property
    def prune_enabled(self) -> bool:
        return self.prune is not None and self.prune.enabled

    @property
    def quantize_enabled(self) -> bool:
        return self.quantize is not None and self.quantize.mode != "none"

    @property
    def run_dir(self) -> Path:
        assert self.output_dir is not None  # set by load_config
        return self.output_dir


# --------------------------------------------------------------------------------------------------
# Loading and error messages


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def validate_config(raw: Any, source: str = "pipeline.yaml", base_dir: Path | None = None) -> PipelineConfig:
    """Validate a parsed config mapping; relative paths resolve against base_dir."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (got {type(raw).__name__})")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(PipelineConfig, exc, source)) from None
    base = (base_dir or Path.cwd()).resolve()
    cfg.output_dir = _resolve(cfg.output_dir or Path("runs") / cfg.name, base)
    cfg.data.root = _resolve(cfg.data.root, base)
    cfg.data.val_root = _resolve(cfg.data.val_root, base)
    cfg.teacher.checkpoint = _resolve(cfg.teacher.checkpoint, base)
    _check_paths_exist(cfg, source)
    return cfg


def _check_paths_exist(cfg: PipelineConfig, source: str) -> None:
    """Missing input files are config errors, caught before anything is written."""
    checkpoint = cfg.teacher.checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"{source}: teacher.checkpoint: no such file: {checkpoint}")
    for key, folder in (("data.root", cfg.data.root), ("data.val_root", cfg.data.val_root)):
        downloadable = key == "data.root" and cfg.data.dataset == "cifar10" and cfg.data.download
        if folder is not None and not folder.is_dir() and not downloadable:
            raise ConfigError(f"{source}: {key}: no such folder: {folder}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate pipeline.yaml. Raises ConfigError with `file: key: problem` lines."""
    path = Path(path)
    raw = load_yaml_file(path)
    if overrides and isinstance(raw, dict):
        raw = {**raw, **overrides}
    return validate_config(raw, source=path.name, base_dir=path.parent)


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """JSON-friendly dump (paths as strings, aliases as written in YAML)."""
    return cfg.model_dump(mode="json", by_alias=True)
