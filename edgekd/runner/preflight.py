"""`edgekd run`'s pre-flight: every check that needs no training, made after the config validates and before
anything is written, so that a typo costs neither a trained teacher nor a finished run's files.

- the run directory can be created and written (`paths`);
- each `export.targets` entry beyond onnx has its optional extra installed (litert, executorch);
- the models: teacher and student are built on torch's meta device (no init cost) for the data's shape
  (`data.sources.data_shape`: known for bundled datasets, class folders counted for imagefolder; the data is
  not loaded), which checks the model names and `model_kwargs`; one forward pass of two zero images on
  uninitialised weights checks that each model takes that input and gives one logit per class; `teacher.checkpoint` is read (weights only) and
  matched against the teacher's architecture; hint layers and `prune.ignore` are looked up in the models they
  name; `benchmark.providers` in this onnxruntime.

Model checks import torch (a second or two), so they are skipped when the run directory already records
every enabled stage as done with exactly this config: then nothing runs, and the values have been used.
`quantize.exclude_nodes` is not checked here: node names come from the ONNX exporter, so the quantize stage
checks them against the exported graph before quantizing (the config checks what no graph can contain).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd.errors import ConfigError, InputError
from edgekd.paths import check_writable_folder
from edgekd.runner.contract import STAGES

if TYPE_CHECKING:
    from torch import nn

    from edgekd.config import PipelineConfig
    from edgekd.data.sources import DataShape


def check_run(cfg: PipelineConfig, source: str, *, output_key: str = "output_dir", rerun: bool = False) -> None:
    """All pre-flight checks for `edgekd run` (`rerun`: --from / --force make stages run whatever the manifest)."""
    from edgekd.train import distributed

    if distributed.is_main():  # rank 0 owns the run directory
        from edgekd.runner.lock import check_not_busy

        check_not_busy(cfg.run_dir)
        check_writable_folder(cfg.run_dir, output_key if output_key.startswith("-") else f"{source}: {output_key}")
    else:  # under torchrun rank 0 checks for everyone (it owns the run directory and stops the others)
        return
    check_target_extras(cfg, source)
    up_to_date = nothing_to_run(cfg)  # reads the manifest first: a broken one is reported before any work
    if rerun or not up_to_date:
        check_models(cfg, source)


def check_target_extras(cfg: PipelineConfig, source: str) -> None:
    """Each export target beyond onnx needs its optional extra: say which, before any training (a lookup of
    the module, nothing imported)."""
    import importlib.util

    from edgekd.stages.export.config import TARGET_EXTRAS

    for target in cfg.export.targets:
        if target not in TARGET_EXTRAS:
            continue
        extra, module, what = TARGET_EXTRAS[target]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f'{source}: export.targets: {target} ({what}) needs the {extra} extra, which is not '
                              f'installed ({module} not found): pip install "edgekd[{extra}]"')


def nothing_to_run(cfg: PipelineConfig) -> bool:
    """True when the manifest holds every enabled stage done with exactly this config view (InputError when the
    manifest cannot be read)."""
    from edgekd.runner.loop import load_stage, read_manifest

    if not (cfg.run_dir / "manifest.json").is_file():
        return False
    manifest = read_manifest(cfg.run_dir)  # a broken one is refused now, before the run loop writes anything
    for name in STAGES:
        plan = load_stage(name).plan(cfg)
        if plan is None:
            continue
        record = manifest.record(name)
        if record is None or record.status != "done" or _canonical(record.config) != _canonical(plan.view):
            return False
    return True


def failed_stage(cfg: PipelineConfig) -> str | None:
    """After a failed run: the first enabled stage the manifest does not record as done (None if unknown)."""
    from edgekd.runner.loop import load_stage, read_manifest

    try:
        manifest = read_manifest(cfg.run_dir)
    except InputError:
        return None
    return next((name for name in STAGES if load_stage(name).plan(cfg) is not None and not manifest.done(name)), None)


def _canonical(view: Any) -> str:
    return json.dumps(view, sort_keys=True, default=str)


def check_models(cfg: PipelineConfig, source: str) -> None:
    """The model-dependent checks; errors become `source: key: problem` lines."""
    from edgekd.data.sources import data_shape

    defaults = cfg.data_defaults()  # the pretrained weights' eval transform (an unknown enum is its own error)
    try:
        shape = data_shape(cfg.data, defaults)  # torch-free: a bad data folder is reported without importing torch
    except InputError as exc:
        raise ConfigError(f"{source}: data.root: {exc}") from None
    import torch

    try:
        with torch.random.fork_rng(devices=[]):  # model builds draw initial weights: keep the run's stream as is
            _check_models(cfg, shape)
    except InputError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_models(cfg: PipelineConfig, shape: DataShape) -> None:
    if cfg.teacher.onnx is not None:  # checked against the data; hints and pruning it are config errors
        _check_onnx_teacher(cfg, shape)
        teacher = None
    else:
        teacher = _build(cfg.teacher.model, cfg.teacher.model_kwargs, "teacher.model", shape, cfg.teacher.weights,
                         cfg.teacher.pretrained, load_weights=cfg.teacher.checkpoint is None)
    if cfg.teacher.checkpoint is not None and teacher is not None:
        _check_checkpoint(teacher, cfg.teacher.checkpoint)
    student = None
    if cfg.distill is not None:
        if cfg.student.chooses:  # every candidate must build; the one distilled is chosen at run time
            students = [_build(c.model, c.model_kwargs, "student.candidates", shape) for c in cfg.student.candidate_list()]
        else:
            students = [_build(cfg.student.model, cfg.student.model_kwargs, "student.model", shape, cfg.student.weights,
                               cfg.student.pretrained, load_weights=cfg.student.checkpoint is None)]
            if cfg.student.checkpoint is not None:
                _check_checkpoint(students[0], cfg.student.checkpoint, "student.checkpoint")
        student = students[0]
        if cfg.distill.hint is not None:
            for candidate in students:
                _check_hint(cfg, teacher, candidate, shape)
    if cfg.prune is not None and cfg.prune.ignore:
        from edgekd.stages.prune.pruning import resolve_ignored

        assert teacher is not None or cfg.prune.source == "student"  # config refuses pruning an ONNX teacher
        pruned = teacher if cfg.prune.source == "teacher" or student is None else student
        resolve_ignored(pruned, cfg.prune.ignore, what=cfg.prune.source)
    if cfg.benchmark.providers:
        from edgekd.runtime.session import resolve_providers

        try:
            resolve_providers(cfg.benchmark.providers)
        except ValueError as exc:
            raise InputError(f"benchmark.providers: {exc}") from None


def _check_onnx_teacher(cfg: PipelineConfig, shape: DataShape) -> None:
    """teacher.onnx against the data: one image input of its channels and size, one score per class; a fixed
    batch size must be the only one the benchmark runs."""
    from edgekd.models.onnx_teacher import inspect_onnx_teacher

    assert cfg.teacher.onnx is not None
    info = inspect_onnx_teacher(cfg.teacher.onnx, channels=shape.channels, height=shape.size, width=shape.size,
                                num_classes=shape.num_classes)
    batches = sorted(set(cfg.benchmark.batch_sizes))
    if info.fixed_batch is not None and batches != [info.fixed_batch]:
        raise InputError(f"teacher.onnx: {cfg.teacher.onnx.name} takes batches of exactly {info.fixed_batch}, "
                         f"benchmark.batch_sizes asks for {batches}: re-export it with a dynamic batch axis "
                         f"(tf2onnx's default; torch.onnx.export(dynamic_axes=...)) or set benchmark.batch_sizes: "
                         f"[{info.fixed_batch}]")


def _build(spec: str, kwargs: dict[str, Any], field: str, shape: DataShape, weights: str | None = None,
           pretrained: bool = False, load_weights: bool = True) -> nn.Module:
    """The model as the stages build it, for the data's shape; checked to map a batch to one logit per class.

    Built on the meta device (no memory, no weight init: checks the name and model_kwargs in milliseconds),
    then given uninitialised CPU memory for one forward pass of two zero images: the shapes are real, the
    values are not needed. (A forward pass on meta tensors would be free, but batch norm there goes through
    decompositions that import torch's compiler, seconds on a small machine.)
    """
    import torch

    from edgekd.models import create_model

    def build() -> nn.Module:
        return create_model(spec, num_classes=shape.num_classes, in_channels=shape.channels,
                            input_size=shape.size, kwargs=kwargs, field=field, weights=weights,
                            pretrained=pretrained, load_weights=load_weights)

    try:
        with torch.device("meta"):
            model = build().to_empty(device="cpu")
    except InputError:
        model = build()  # a factory that cannot build on meta: the CPU build gives the real answer
    size = (2, shape.channels, shape.size, shape.size)
    try:
        with torch.no_grad():
            output = model.eval()(torch.zeros(size))
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported as input
        first_line = (str(exc).splitlines() or [""])[0][:160]
        raise InputError(f"{field}: {spec} cannot take inputs of shape {size} ({type(exc).__name__}: {first_line})") from None
    expected = (2, shape.num_classes)
    got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if got != expected:
        raise InputError(f"{field}: {spec} gives {got} for inputs of shape {size}; expected logits {expected} "
                         "(one per class)")
    return model


def _check_checkpoint(model: nn.Module, path: Path, key: str = "teacher.checkpoint") -> None:
    from edgekd.models.checkpoint import check_fits, read_checkpoint

    try:
        state, _ = read_checkpoint(path)
        check_fits(model, state, str(path))
    except InputError as exc:
        raise InputError(f"{key}: {exc}") from None


def _check_hint(cfg: PipelineConfig, teacher: nn.Module, student: nn.Module, shape: DataShape) -> None:
    import torch

    from edgekd.train.hints import FeatureHint, find_module

    hint = cfg.distill.hint if cfg.distill is not None else None
    assert hint is not None
    find_module(teacher, hint.teacher_layer, "distill.hint.teacher_layer", "teacher")
    find_module(student, hint.student_layer, "distill.hint.student_layer", "student")
    if hint.weight == 0:  # switched off: the distill stage checks only the names too
        return
    probe = torch.zeros(2, shape.channels, shape.size, shape.size)  # the layers must output maps or vectors
    FeatureHint(teacher, student, hint.teacher_layer, hint.student_layer, hint.weight, probe).close()
