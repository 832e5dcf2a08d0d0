"""The typed contracts between the runner and the stages, and between one stage and the next.

A stage module (`edgekd.stages.<name>`) has:

    NAME: str
    def plan(cfg: PipelineConfig) -> StagePlan | None      # None: switched off in this config
    def run(settings, ctx: RunContext) -> StageResult       # settings = plan(cfg).settings

`StagePlan.settings` is the stage's own config section (or a small object bundling it with what the stage
takes from other sections, passed explicitly); `StagePlan.view` is the config that decides the stage's
outputs, hashed into its fingerprint. The manifest (`Manifest` of `StageRecord`s) is what one stage leaves
for the next: its artifacts (file name -> sha256) and metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_SCHEMA = 1
# The stages in run order: the only registry (`edgekd.stages.<name>` is imported when the loop reaches it).
STAGES = ("teacher", "distill", "prune", "export", "quantize", "mobile", "benchmark", "report")


@dataclass
class StageResult:
    """What a stage hands back: the files it wrote (relative to the run dir) and its metrics."""

    artifacts: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


@dataclass(frozen=True)
class StagePlan:
    """A switched-on stage as the runner sees it before running it."""

    settings: Any
    """Handed to the stage's run(): its section, plus what it needs from other sections."""
    view: dict[str, Any]
    """The config that decides the stage's outputs (JSON data): part of its fingerprint, kept in the manifest."""
    depends_on: tuple[str, ...] = ()
    """Earlier stages whose artifacts and metrics it reads."""
    distributed: bool = False
    """Runs on every rank under torchrun (training stages); otherwise on rank 0 while the others wait."""
    libraries: tuple[str, ...] = ()
    """Distributions whose versions decide its outputs (their versions are part of its fingerprint)."""


@dataclass
class StageRecord:
    """One finished stage in manifest.json."""

    fingerprint: str
    config: dict[str, Any]
    artifacts: dict[str, str]
    """File name (relative to the run directory) -> sha256."""
    metrics: dict[str, Any]
    summary: str = ""
    finished: str = ""
    wall_s: float = 0.0
    status: str = "done"
    inputs: dict[str, Any] = field(default_factory=dict)
    """What the fingerprint hashed besides the config: the dependencies' artifacts and metrics digests."""
    libraries: dict[str, Any] = field(default_factory=dict)
    """Library versions the fingerprint hashed."""

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> StageRecord:
        from edgekd.errors import InputError

        if not isinstance(data, dict):
            raise InputError(f"{where}: not an object")
        try:
            return cls(fingerprint=str(data.get("fingerprint") or ""), config=dict(data.get("config") or {}),
                       artifacts={str(k): str(v) for k, v in (data.get("artifacts") or {}).items()},
                       metrics=dict(data.get("metrics") or {}), summary=str(data.get("summary") or ""),
                       finished=str(data.get("finished") or ""), wall_s=float(data.get("wall_s") or 0.0),
                       status=str(data.get("status") or "done"), inputs=dict(data.get("inputs") or {}),
                       libraries=dict(data.get("libraries") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where}: not a stage record ({type(exc).__name__}: {exc})") from None


@dataclass
class Manifest:
    """manifest.json: stage name -> StageRecord, in pipeline order."""

    stages: dict[str, StageRecord] = field(default_factory=dict)
    files: list[str] | None = field(default_factory=list)
    """Every top-level name edgekd created in the run directory ('name/' for a folder it owns whole), recorded
    before it was created: the only paths edgekd writes over or deletes (runner.files). None: a manifest
    written before edgekd kept this record."""
    schema_version: int = MANIFEST_SCHEMA
    edgekd_version: str = ""
    updated: str = ""

    def record(self, stage: str) -> StageRecord | None:
        return self.stages.get(stage)

    def done(self, stage: str) -> bool:
        record = self.stages.get(stage)
        return record is not None and record.status == "done"

    def metrics(self, stage: str) -> dict[str, Any]:
        """A finished stage's metrics ({} when it did not run)."""
        record = self.stages.get(stage)
        return record.metrics if record is not None else {}

    def artifacts(self, stage: str) -> dict[str, str]:
        record = self.stages.get(stage)
        return record.artifacts if record is not None else {}

    def all_artifacts(self) -> dict[str, str]:
        """Every artifact of every stage: file name -> sha256."""
        hashes: dict[str, str] = {}
        for record in self.stages.values():
            hashes.update(record.artifacts)
        return hashes

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version,
                "stages": {name: asdict(record) for name, record in self.stages.items()},
                **({"files": sorted(self.files)} if self.files is not None else {}),
                "edgekd_version": self.edgekd_version, "updated": self.updated}

    @classmethod
    def from_json(cls, data: Any, source: str) -> Manifest:
        from edgekd.errors import InputError

        if not isinstance(data, dict):
            raise InputError(f"{source}: not a JSON object; delete it to start the run afresh")
        if data.get("schema_version") != MANIFEST_SCHEMA:
            raise InputError(f"{source}: manifest schema_version {data.get('schema_version')} is not {MANIFEST_SCHEMA}")
        stages = data.get("stages") or {}
        if not isinstance(stages, dict):
            raise InputError(f"{source}: 'stages' is not an object; delete it to start the run afresh")
        files = data.get("files")
        if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise InputError(f"{source}: 'files' is not a list of names; delete it to start the run afresh")
        return cls(stages={str(name): StageRecord.from_json(entry, f"{source}: stages.{name}")
                           for name, entry in stages.items()}, files=files,
                   edgekd_version=str(data.get("edgekd_version") or ""), updated=str(data.get("updated") or ""))
