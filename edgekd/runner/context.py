"""What a running stage sees besides its own settings: the run directory, earlier stages' records, the data,
the device, and the model specs this run may rebuild from checkpoints. Never the whole config."""

from __future__ import annotations

import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from edgekd.errors import InputError, StageFailed
from edgekd.runner.contract import Manifest
from edgekd.runner.files import RunFiles
from edgekd.train import distributed


class RunContext:
    def __init__(self, *, run_dir: Path, manifest: Manifest, seed: int, data_config: Any, device: str,
                 model_factories: tuple[str, ...], files: RunFiles | None = None,
                 data_defaults: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.manifest = manifest
        self.files = files or RunFiles(run_dir, manifest, checked=False)
        """What edgekd owns in the run directory: every write there goes through it (path, work_folder)."""
        self.seed = seed
        self.data_config = data_config
        """The `data:` section (batch sizes; what `data` loads)."""
        self.data_defaults = data_defaults
        """The pretrained weights' eval transform, for what `data:` leaves unset (image files only)."""
        self.model_factories = model_factories
        """The model specs the config names: the only `pkg.module:factory` a checkpoint's meta may rebuild."""
        self._device_name = device
        self.stage = ""
        """The running stage's name."""
        self.depends_on: tuple[str, ...] = ()
        """The running stage's input stages (its plan's depends_on)."""
        self.content_fingerprint = ""
        """The running stage's fingerprint without its inputs' metrics (no timings): the one written INTO
        artifacts, so the same config and inputs give byte-identical files."""

    @cached_property
    def write_dir(self) -> Path:
        """Where this process writes: the run directory on rank 0, a private scratch folder on other ranks."""
        if distributed.is_main():
            return self.run_dir
        return Path(tempfile.mkdtemp(prefix=f"edgekd-rank{distributed.rank()}-"))

    def path(self, name: str) -> Path:
        """Where to write artifact `name`: inside the run directory, through no symbolic link, and never over a
        file edgekd did not write there (RunFiles records the name before the file is created)."""
        if not distributed.is_main():
            return self._inside(self.write_dir, name)
        return self.files.path(name)

    def work_folder(self, purpose: str) -> Path:
        """An empty scratch folder on the run directory's file system, for files renamed into place later
        (rank 0 only); remove it when done (a killed run's is removed by the next run)."""
        return self.files.work_folder(purpose)

    @staticmethod
    def _inside(folder: Path, name: str) -> Path:
        target = (folder / name).resolve()
        if folder.resolve() not in (target, *target.parents):
            raise InputError(f"refusing to write outside the run directory: {name}")
        return target

    def artifact(self, name: str) -> Path:
        """An input artifact written by an earlier stage (read from the run directory on every rank)."""
        path = self._inside(self.run_dir, name)
        if not path.is_file():
            raise StageFailed(f"stage {self.stage}: missing input artifact {name} (rerun the stage that writes it)")
        return path

    @cached_property
    def device(self) -> Any:
        from edgekd.train.loop import resolve_device

        return resolve_device(self._device_name)

    @cached_property
    def data(self) -> Any:
        from edgekd.data.bundle import load_data

        return load_data(self.data_config, seed=self.seed, defaults=self.data_defaults)

    def build_model(self, spec: str, kwargs: dict[str, Any], field: str, *, weights: str | None = None,
                    pretrained: bool = False, load_weights: bool = True) -> Any:
        """A model shaped for this run's data, its initial weights drawn from the run's seed (so two runs of one
        config start from, and end with, the same weights); with `weights` / `pretrained`, the pretrained
        weights from the local cache and a fresh head (`load_weights=False`: the architecture only)."""
        import torch

        from edgekd.models import create_model

        meta = self.data.meta
        torch.manual_seed(self.seed)
        return create_model(spec, num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height,
                            kwargs=kwargs, field=field, weights=weights, pretrained=pretrained,
                            load_weights=load_weights)

    def load_model(self, name: str, *, device: Any = None, written_here: bool = False) -> Any:
        """The model in checkpoint `name` (e.g. 'teacher.pt'), in eval mode on `device` (default: the run's).

        `written_here`: the file this process just wrote (a private scratch copy on ranks other than 0),
        rather than an input artifact of an earlier stage.
        """
        from edgekd.models import load_model

        meta = self.data.meta
        path = self.path(name) if written_here else self.artifact(name)
        model = load_model(path, num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height,
                           factories=self.model_factories)
        return model.to(self.device if device is None else device).eval()
