"""The run loop: fingerprints, skip/resume, the manifest on disk, the log.

Stage modules (`edgekd.stages.<name>` for each name in `contract.STAGES`) are imported by name when the
loop reaches them, and import torch only inside `run`, so a fully cached rerun never imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgekd import atomic
from edgekd.version import __version__
from edgekd.errors import EdgekdError, InputError, StageFailed
from edgekd.runner.context import RunContext
from edgekd.runner.contract import STAGES, Manifest, StagePlan, StageRecord, StageResult
from edgekd.runner.files import LOG, MANIFEST, RESOLVED_CONFIG, RunFiles, read_manifest, write_manifest
from edgekd.runner.keys import library_versions, rerun_reason
from edgekd.runner.lock import run_lock
from edgekd.train import distributed
from edgekd.yamlio import dump_yaml

if TYPE_CHECKING:
    from edgekd.config import PipelineConfig


log = logging.getLogger("edgekd")


@dataclass
class RunOutcome:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    manifest: Manifest

    @property
    def budgets_passed(self) -> bool:
        return bool(self.manifest.metrics("report").get("budgets_passed", True))


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(f"edgekd.stages.{name}")


# --------------------------------------------------------------------------------------------------
# Fingerprints


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_inputs(plan: StagePlan, manifest: Manifest, *, metrics: bool = True) -> dict[str, Any]:
    """What a stage's fingerprint hashes besides its config view: its dependencies' artifact hashes (and
    metrics digests) and the versions of the libraries it declares."""
    inputs: dict[str, Any] = {}
    for dep in plan.depends_on:
        inputs[dep] = {"artifacts": manifest.artifacts(dep)}
        if metrics:
            inputs[dep]["metrics"] = hash_json(manifest.metrics(dep))
    return {"inputs": inputs, "libraries": library_versions(plan.libraries)}


def fingerprint(name: str, plan: StagePlan, manifest: Manifest, *, metrics: bool = True) -> str:
    """Hash of the stage's config view, its dependencies' artifacts (and metrics), the versions of the
    libraries it uses and the edgekd version.

    The benchmark stage hands its results on as metrics only, so a re-measured benchmark must re-render the
    report. metrics=False leaves the metrics out: metrics hold timings, so that fingerprint is the one to
    write INTO artifacts (the same config and inputs give byte-identical files run after run).
    """
    keys = fingerprint_inputs(plan, manifest, metrics=metrics)
    return hash_json({"stage": name, "config": plan.view, "inputs": keys["inputs"], "libraries": keys["libraries"],
                      "version": __version__})


def _artifacts_intact(run_dir: Path, record: StageRecord) -> bool:
    for name, digest in record.artifacts.items():
        path = run_dir / name
        if not path.is_file() or atomic.sha256_file(path) != digest:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# The log file


class _LogFileHandler(logging.StreamHandler):
    """log.txt (opened by RunFiles.open_log: never through a link). A failed write (a full disk) is dropped
    rather than printed as a traceback: the console has every line, and the failure itself ends the run."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


@contextlib.contextmanager
def _log_to(files: RunFiles) -> Iterator[None]:
    """The run's record: a file handler on the `edgekd` logger for the duration of the run (the only handler
    the library attaches; console output is the application's, e.g. the CLI's). log.txt holds INFO and up,
    so while it is attached an unset `edgekd` level is INFO (restored afterwards); a level you set is kept."""
    handler = _LogFileHandler(files.open_log())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = log.level
    if level == logging.NOTSET:
        log.setLevel(min(logging.INFO, log.getEffectiveLevel()))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        with contextlib.suppress(OSError):
            handler.close()
            handler.stream.close()


def _append_log(files: RunFiles, text: str) -> None:
    """Best effort: a failure being reported must not be replaced by a failure to log it (a full disk)."""
    with contextlib.suppress(OSError), files.open_log() as handle:
        handle.write(text)


# --------------------------------------------------------------------------------------------------
# Running


def _select(only: list[str], from_stage: str | None, force: list[str]) -> tuple[list[str], set[str]]:
    for name in [*only, *force, *([from_stage] if from_stage else [])]:
        if name not in STAGES:
            raise InputError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    forced = set(force)
    if from_stage:
        forced |= set(STAGES[STAGES.index(from_stage):])
    selected = [s for s in STAGES if not only or s in only]
    return selected, forced


def context_for(cfg: PipelineConfig, manifest: Manifest, device: str | None = None,
                files: RunFiles | None = None) -> RunContext:
    """The context stages of this config run in (`device` overrides the config's). Without `files` (a stage
    run on its own), writes are kept inside the run directory but not checked against the manifest's record."""
    return RunContext(run_dir=cfg.run_dir, manifest=manifest, seed=cfg.seed, data_config=cfg.data,
                      device=device or cfg.device, model_factories=cfg.model_factories, files=files,
                      data_defaults=cfg.data_defaults())


def _open_run_dir(run_dir: Path) -> RunFiles:
    """Read the manifest, clear a killed run's leftovers and record the run's own files (holding the lock)."""
    files = RunFiles(run_dir, read_manifest(run_dir))
    files.remove_stale_temps()
    files.claim(MANIFEST, LOG, RESOLVED_CONFIG)  # one manifest write records all three before they exist
    return files


def _run_dir_error(run_dir: Path, exc: OSError) -> EdgekdError:
    """An OSError outside any stage (the manifest, the log, the lock): one line, never a traceback. A full or
    failing disk is a run-time failure (3); a run directory that cannot be used is bad input (2)."""
    kind = StageFailed if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else InputError
    return kind(f"{run_dir}: cannot write the run directory: {exc}")


def run_pipeline(
    cfg: PipelineConfig | str | Path,
    *,
    only: list[str] | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    output_dir: Path | None = None,
    device: str | None = None,
) -> RunOutcome:
    """Run the stages in order, skipping those whose fingerprint matches the run directory's manifest.

    Under torchrun every rank calls this; rank 0 decides and writes, the others follow (see runner.launch).
    """
    if isinstance(cfg, (str, Path)):
        from edgekd.config import load_config

        cfg = load_config(cfg)
    if output_dir is not None:
        cfg.output_dir = Path(output_dir).resolve()
    selected, forced = _select(list(only or []), from_stage, list(force or []))
    try:
        return _run(cfg, selected, forced, device)
    except OSError as exc:  # inside a stage it is already a StageFailed; this is the runner's own bookkeeping
        raise _run_dir_error(cfg.run_dir, exc) from exc


def _run(cfg: PipelineConfig, selected: list[str], forced: set[str], device: str | None) -> RunOutcome:
    run_dir = cfg.run_dir
    main = distributed.is_main()
    with run_lock(run_dir) if main else contextlib.nullcontext():
        files: RunFiles | None = None
        failure: Exception | None = None
        if main:
            try:
                files = _open_run_dir(run_dir)
            except (EdgekdError, OSError) as exc:
                failure = exc
        # the other ranks learn that rank 0 could not start, rather than waiting for it until the timeout
        action, shared = distributed.broadcast_object(("abort", str(failure)) if failure else ("ok", files and files.manifest))
        if failure is not None:
            raise failure
        if action == "abort":
            raise StageFailed(f"rank {distributed.rank()}: rank 0 stopped the run: {shared}")
        with _log_to(files) if files is not None else contextlib.nullcontext():
            return _run_stages(cfg, selected, forced, device, files, shared or Manifest())


def _run_stages(cfg: PipelineConfig, selected: list[str], forced: set[str], device: str | None,
                files: RunFiles | None, manifest: Manifest) -> RunOutcome:
    run_dir = cfg.run_dir
    main = files is not None
    if files is not None:
        atomic.write_text(files.path(RESOLVED_CONFIG), dump_yaml(cfg.to_dict()))  # validated; never the input
        log.info("edgekd %s: run directory %s", __version__, run_dir)
    ctx = context_for(cfg, manifest, device, files)
    planner = _Planner(run_dir, selected, forced)
    ran: list[str] = []
    skipped: list[str] = []
    for name in STAGES:
        module = load_stage(name)
        plan = module.plan(cfg)
        decision = None
        if main:
            try:
                decision = planner.decide(name, plan, ctx.manifest)
            except EdgekdError as exc:
                distributed.broadcast_object(("abort", str(exc)))
                raise
        action, detail = distributed.broadcast_object(decision)
        if action == "abort":
            raise StageFailed(f"rank {distributed.rank()}: rank 0 stopped the run: {detail}")
        if action == "skip":
            skipped.append(name)
        if action != "run":
            continue
        if main or plan.distributed:
            _run_stage(name, module, plan, ctx, detail)
        distributed.barrier()  # artifacts are in place before any rank reads them
        ctx.manifest = distributed.broadcast_object(ctx.manifest)
        ctx.files.manifest = ctx.manifest
        ran.append(name)
    return RunOutcome(run_dir=run_dir, ran=ran, skipped=skipped, manifest=ctx.manifest)


class _Planner:
    """Decides, stage by stage, whether to run, skip (up to date) or leave out each stage."""

    def __init__(self, run_dir: Path, selected: list[str], forced: set[str]) -> None:
        self.run_dir = run_dir
        self.selected = selected
        self.forced = forced
        self.stale: set[str] = set()  # not selected by --only and not up to date

    def decide(self, name: str, plan: StagePlan | None, manifest: Manifest) -> tuple[str, str]:
        if plan is None:
            log.info("[%s] switched off in the config", name)
            manifest.stages.pop(name, None)
            return "off", ""
        print_ = fingerprint(name, plan, manifest)
        record = manifest.record(name)
        cached = (record is not None and record.status == "done" and record.fingerprint == print_
                  and _artifacts_intact(self.run_dir, record))
        if name not in self.selected:
            if not cached:
                self.stale.add(name)
            return "off", ""
        if cached and name not in self.forced:
            log.info("[%s] up to date (fingerprint %s), skipped", name, print_)
            return "skip", print_
        if cached:
            log.info("[%s] rerun: forced (--force / --from)", name)
        elif record is not None and record.fingerprint != print_:
            now = {"config": plan.view, **fingerprint_inputs(plan, manifest)}
            log.info("[%s] rerun: %s", name, rerun_reason(
                {"config": record.config, "inputs": record.inputs, "libraries": record.libraries}, now))
        elif record is not None:
            log.info("[%s] rerun: an artifact was deleted or modified since it ran", name)
        stale_inputs = [d for d in plan.depends_on if d in self.stale]
        if stale_inputs:
            raise InputError(
                f"stage '{name}' needs {', '.join(stale_inputs)}, which is not up to date in {self.run_dir}; "
                f"run it too (add --only {stale_inputs[0]})"
            )
        return "run", print_


def _run_stage(name: str, module: ModuleType, plan: StagePlan, ctx: RunContext, print_: str) -> None:
    manifest = ctx.manifest
    main = distributed.is_main()
    if main:
        # Forget the stage before touching its files: if we are killed midway, the rerun redoes it.
        previous = manifest.stages.pop(name, None)
        write_manifest(ctx.run_dir, manifest)
        for artifact in (previous.artifacts if previous else {}):
            ctx.files.remove(artifact)
    log.info("[%s] running", name)
    ctx.stage, ctx.depends_on = name, plan.depends_on
    ctx.content_fingerprint = fingerprint(name, plan, manifest, metrics=False)
    keys = fingerprint_inputs(plan, manifest)  # recorded with the result, to explain a later rerun
    started = time.perf_counter()
    try:
        result: StageResult = module.run(plan.settings, ctx)
    except EdgekdError as exc:  # the CLI prints it on stderr; log.txt keeps it too
        if main:
            _append_log(ctx.files, f"[{name}] failed: {exc}\n")
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a bug or a library failure: one line on the console, the traceback in log.txt
        log.debug("%s", traceback.format_exc())
        if main:
            _append_log(ctx.files, traceback.format_exc())
        raise StageFailed(f"stage {name} failed: {type(exc).__name__}: {exc} (traceback in {ctx.run_dir / LOG})") from exc
    wall = time.perf_counter() - started
    if not main:
        return
    manifest.stages[name] = StageRecord(
        fingerprint=print_, config=plan.view, artifacts={a: atomic.sha256_file(ctx.path(a)) for a in result.artifacts},
        metrics=result.metrics, summary=result.summary, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        wall_s=round(wall, 3), **keys)
    write_manifest(ctx.run_dir, manifest)
    log.info("[%s] done in %.1f s%s", name, wall, f": {result.summary}" if result.summary else "")
