"""The stage runner: ordering, fingerprints, skip/resume, run directory, manifest, lock, log.

Each stage is a module in `edgekd.stages` with the same small interface:

    NAME: str
    def enabled(cfg) -> bool                 # switched on by the config?
    def depends_on(cfg) -> list[str]         # earlier stages whose artifacts it reads
    def config_view(cfg) -> dict             # the config it reads (part of its fingerprint)
    def run(cfg, ctx: RunContext) -> StageResult

The ordered tuple `STAGES` is the only registry; modules are imported lazily, so a fully cached rerun
never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from edgekd import __version__, atomic, distributed
from edgekd.config import STAGES, PipelineConfig, config_to_dict, load_config
from edgekd.errors import EdgekdError, InputError, StageFailed
from edgekd.yamlio import dump_yaml

MANIFEST = "manifest.json"
LOCK = ".edgekd.lock"
MANIFEST_SCHEMA = 1

log = logging.getLogger("edgekd")


@dataclass
class StageResult:
    """What a stage hands back: the files it wrote (relative to the run dir) and its metrics."""

    artifacts: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


@dataclass
class RunOutcome:
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    manifest: dict[str, Any]

    @property
    def budgets_passed(self) -> bool:
        report = self.manifest.get("stages", {}).get("report", {})
        return bool(report.get("metrics", {}).get("budgets_passed", True))


class RunContext:
    """What a running stage can see: config, run directory, earlier stages' results, data, device."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, manifest: dict[str, Any], device_override: str | None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.manifest = manifest
        self._device_override = device_override
        self.stage = ""

    @cached_property
    def write_dir(self) -> Path:
        """Where this process writes: the run directory on rank 0, a private scratch folder on other ranks."""
        if distributed.is_main():
            return self.run_dir
        import tempfile

        return Path(tempfile.mkdtemp(prefix=f"edgekd-rank{distributed.rank()}-"))

    def path(self, name: str) -> Path:
        """Where to write artifact `name` (refuses anything that would escape the run directory)."""
        return self._inside(self.write_dir, name)

    @staticmethod
    def _inside(folder: Path, name: str) -> Path:
        target = (folder / name).resolve()
        if folder.resolve() not in (target, *target.parents):
            raise InputError(f"refusing to write outside the run directory: {name}")
        return target

    def metrics(self, stage: str) -> dict[str, Any]:
        return self.manifest.get("stages", {}).get(stage, {}).get("metrics", {})

    def has_stage(self, stage: str) -> bool:
        return self.manifest.get("stages", {}).get(stage, {}).get("status") == "done"

    def artifact(self, name: str) -> Path:
        """An input artifact written by an earlier stage (read from the run directory on every rank)."""
        path = self._inside(self.run_dir, name)
        if not path.is_file():
            raise StageFailed(f"stage {self.stage}: missing input artifact {name} (rerun the stage that writes it)")
        return path

    @cached_property
    def device(self) -> Any:
        from edgekd.training import resolve_device

        return resolve_device(self._device_override or self.cfg.device)

    @cached_property
    def data(self) -> Any:
        from edgekd.data import load_data

        return load_data(self.cfg.data, seed=self.cfg.seed)


# --------------------------------------------------------------------------------------------------
# Stage modules and fingerprints


def load_stage(name: str) -> Any | None:
    """The stage module, or None when this version of edgekd does not have it."""
    try:
        return importlib.import_module(f"edgekd.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"edgekd.stages.{name}":
            return None
        raise


def _hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_fingerprint(module: Any, cfg: PipelineConfig, manifest: dict[str, Any], *, metrics: bool = True) -> str:
    # Inputs are the dependencies' artifacts and their metrics (the benchmark stage hands its results on
    # as metrics only, so a re-measured benchmark must re-render the report). metrics=False leaves the
    # metrics out: metrics hold timings, so that fingerprint is the one to write INTO artifacts (the same
    # config and inputs give byte-identical files run after run).
    inputs = {}
    for dep in module.depends_on(cfg):
        entry = manifest.get("stages", {}).get(dep, {})
        inputs[dep] = {"artifacts": entry.get("artifacts", {})}
        if metrics:
            inputs[dep]["metrics"] = _hash_json(entry.get("metrics", {}))
    return _hash_json({"stage": module.NAME, "config": module.config_view(cfg), "inputs": inputs, "version": __version__})


def _artifacts_intact(run_dir: Path, entry: dict[str, Any]) -> bool:
    for name, digest in entry.get("artifacts", {}).items():
        path = run_dir / name
        if not path.is_file() or atomic.sha256_file(path) != digest:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _acquiring(run_dir: Path) -> Iterator[None]:
    """Serializes lock acquisition between processes with flock on the run directory itself (no extra file;
    the kernel drops it if the process dies). Without it, a second process could read the lock file in the
    instant between its creation and its record being written, or two processes could both take over one
    stale lock, and both would run."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the O_EXCL create below still keeps two runs apart, minus these races
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One edgekd run per run directory; a lock left by a dead process is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with _acquiring(run_dir):
        _acquire(run_dir / LOCK, run_dir)
    try:
        yield
    finally:
        (run_dir / LOCK).unlink(missing_ok=True)


def _acquire(lock_path: Path, run_dir: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock_path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            same_host = holder.get("host") == record["host"]
            if holder and same_host and _process_alive(int(holder.get("pid", -1))):
                raise InputError(
                    f"{run_dir}: in use by another edgekd run (pid {holder['pid']}); wait for it to finish "
                    f"(if no edgekd run is using it, remove {lock_path})"
                ) from None
            if holder and not same_host:
                raise InputError(
                    f"{run_dir}: locked by edgekd on host {holder.get('host')} (pid {holder.get('pid')}); "
                    f"remove {lock_path} if that run is gone"
                ) from None
            log.warning("taking over a stale lock left by pid %s", holder.get("pid", "?"))
            lock_path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return
    raise InputError(f"{run_dir}: could not take the lock {lock_path}; remove it if no edgekd run is using it")


# --------------------------------------------------------------------------------------------------
# Manifest and logging


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.is_file():
        return {"schema_version": MANIFEST_SCHEMA, "stages": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); delete it to start the run afresh") from None
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise InputError(f"{path}: manifest schema_version {manifest.get('schema_version')} is not {MANIFEST_SCHEMA}")
    manifest.setdefault("stages", {})
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["edgekd_version"] = __version__
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic.write_json(run_dir / MANIFEST, manifest)


@contextlib.contextmanager
def _log_to(run_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def setup_console_logging(verbose: bool = False, quiet: bool = False) -> None:
    if any(getattr(h, "_edgekd_console", False) for h in log.handlers):
        return
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    console._edgekd_console = True  # type: ignore[attr-defined]
    log.addHandler(console)
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


# --------------------------------------------------------------------------------------------------
# Running


def _select(cfg: PipelineConfig, only: list[str], from_stage: str | None, force: list[str]) -> tuple[list[str], set[str]]:
    for name in [*only, *force, *([from_stage] if from_stage else [])]:
        if name not in STAGES:
            raise InputError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    forced = set(force)
    if from_stage:
        forced |= set(STAGES[STAGES.index(from_stage):])
    selected = [s for s in STAGES if not only or s in only]
    return selected, forced


def run_pipeline(
    config: PipelineConfig | str | Path,
    *,
    only: list[str] | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    output_dir: Path | None = None,
    device: str | None = None,
) -> RunOutcome:
    """Run the stages in order, skipping those whose fingerprint matches the run directory's manifest.

    Under torchrun every rank calls this; rank 0 decides and writes, the others follow (see distributed.py).
    """
    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    if output_dir is not None:
        cfg.output_dir = Path(output_dir).resolve()
    selected, forced = _select(cfg, list(only or []), from_stage, list(force or []))
    run_dir = cfg.run_dir
    main = distributed.is_main()
    setup_console_logging(quiet=not main)
    with (run_lock(run_dir) if main else contextlib.nullcontext()), (_log_to(run_dir) if main else contextlib.nullcontext()):
        manifest: dict[str, Any] = {}
        if main:
            atomic.remove_stale_temps(run_dir)
            manifest = read_manifest(run_dir)
            atomic.write_text(run_dir / "config.yaml", dump_yaml(config_to_dict(cfg)))
            log.info("edgekd %s: run directory %s", __version__, run_dir)
        ctx = RunContext(cfg, run_dir, distributed.broadcast_object(manifest), device)
        planner = _Planner(cfg, run_dir, selected, forced)
        ran: list[str] = []
        skipped: list[str] = []
        for name in STAGES:
            decision = None
            if main:
                try:
                    decision = planner.decide(name, ctx.manifest)
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
            module = load_stage(name)
            if main or getattr(module, "DISTRIBUTED", False):
                _run_stage(module, ctx, detail)
            distributed.barrier()  # artifacts are in place before any rank reads them
            ctx.manifest = distributed.broadcast_object(ctx.manifest)
            ran.append(name)
        return RunOutcome(run_dir=run_dir, ran=ran, skipped=skipped, manifest=ctx.manifest)


class _Planner:
    """Decides, stage by stage, whether to run, skip (up to date) or leave out each stage."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, selected: list[str], forced: set[str]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.selected = selected
        self.forced = forced
        self.unavailable: set[str] = set()
        self.stale: set[str] = set()  # not selected by --only and not up to date

    def decide(self, name: str, manifest: dict[str, Any]) -> tuple[str, str]:
        cfg = self.cfg
        module = load_stage(name)
        if module is None:
            log.info("[%s] not available in this version of edgekd", name)
            self.unavailable.add(name)
            return "off", ""
        if not module.enabled(cfg):
            log.info("[%s] switched off in the config", name)
            manifest["stages"].pop(name, None)
            return "off", ""
        missing = [d for d in module.depends_on(cfg) if d in self.unavailable]
        if missing:
            log.info("[%s] not run: needs %s, which is not available", name, ", ".join(missing))
            self.unavailable.add(name)
            return "off", ""
        fingerprint = stage_fingerprint(module, cfg, manifest)
        entry = manifest["stages"].get(name, {})
        cached = (
            entry.get("status") == "done" and entry.get("fingerprint") == fingerprint and _artifacts_intact(self.run_dir, entry)
        )
        if name not in self.selected:
            if not cached:
                self.stale.add(name)
            return "off", ""
        if cached and name not in self.forced:
            log.info("[%s] up to date (fingerprint %s), skipped", name, fingerprint)
            return "skip", fingerprint
        stale_inputs = [d for d in module.depends_on(cfg) if d in self.stale]
        if stale_inputs:
            raise InputError(
                f"stage '{name}' needs {', '.join(stale_inputs)}, which is not up to date in {self.run_dir}; "
                f"run it too (add --only {stale_inputs[0]})"
            )
        return "run", fingerprint


def _run_stage(module: Any, ctx: RunContext, fingerprint: str) -> None:
    name = module.NAME
    manifest = ctx.manifest
    main = distributed.is_main()
    if main:
        # Forget the stage before touching its files: if we are killed midway, the rerun redoes it.
        previous = manifest["stages"].pop(name, None)
        write_manifest(ctx.run_dir, manifest)
        for artifact in (previous or {}).get("artifacts", {}):
            ctx.path(artifact).unlink(missing_ok=True)
    log.info("[%s] running", name)
    ctx.stage = name
    started = time.perf_counter()
    try:
        result: StageResult = module.run(ctx.cfg, ctx)
    except EdgekdError as exc:  # the CLI prints it on stderr; log.txt keeps it too
        if main:
            with open(ctx.run_dir / "log.txt", "a", encoding="utf-8") as handle:
                handle.write(f"[{name}] failed: {exc}\n")
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a bug or a library failure: one line on the console, the traceback in log.txt
        log.debug("%s", traceback.format_exc())
        with open(ctx.run_dir / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        raise StageFailed(f"stage {name} failed: {type(exc).__name__}: {exc} (traceback in {ctx.run_dir / 'log.txt'})") from exc
    wall = time.perf_counter() - started
    if not main:
        return
    artifacts = {a: atomic.sha256_file(ctx.path(a)) for a in result.artifacts}
    manifest["stages"][name] = {
        "status": "done",
        "fingerprint": fingerprint,
        "config": module.config_view(ctx.cfg),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall, 3),
        "artifacts": artifacts,
        "metrics": result.metrics,
        "summary": result.summary,
    }
    write_manifest(ctx.run_dir, manifest)
    log.info("[%s] done in %.1f s%s", name, wall, f": {result.summary}" if result.summary else "")
