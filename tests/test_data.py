"""Datasets on tiny data: bundled ones for real, imagefolder and cifar10 on files the tests make."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekd.config import validate_config
from edgekd.data.bundle import load_data
from edgekd.errors import InputError


def _data_cfg(**data):
    return validate_config({"data": data}).data


def _make_imagefolder(root: Path, classes=("cat", "dog"), per_class=6, mode="RGB", size=(12, 10)) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = (rng.random(shape) * 60 + label * 120).astype(np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i}.png")
    return root


def _make_cifar(root: Path, per_batch=20, batches=2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        labels = list(rng.integers(0, 10, per_batch))
        data = rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, handle)
    return root


def test_load_data_mnist5k_gives_deterministic_disjoint_splits() -> None:
    cfg = _data_cfg(dataset="mnist5k")
    first, second = load_data(cfg, seed=3), load_data(cfg, seed=3)
    assert first.meta.input_shape == (1, 28, 28) and first.meta.num_classes == 10
    assert first.meta.split_sizes == {"train": 3500, "val": 500, "test": 1000}
    assert np.array_equal(first.test.labels.numpy(), second.test.labels.numpy())
    train_keys = {bytes(x) for x in first.train.images.numpy()[:500]}
    assert not train_keys & {bytes(x) for x in first.test.images.numpy()}
    other = load_data(cfg, seed=4)
    assert not np.array_equal(first.test.labels.numpy(), other.test.labels.numpy())


def test_load_data_digits_and_synthetic_are_normalized_per_batch() -> None:
    digits = load_data(_data_cfg(dataset="digits"), 0)
    assert digits.meta.input_shape == (1, 8, 8) and digits.meta.num_classes == 10
    synthetic = load_data(_data_cfg(dataset="synthetic", synthetic={"num_samples": 200, "channels": 3}), 0)
    inputs, labels = synthetic.normalized("train")
    assert inputs.dtype == np.float32 and inputs.shape[1:] == (3, 16, 16)
    assert abs(float(inputs.mean())) < 0.2 and 0.7 < float(inputs.std()) < 1.3
    assert labels.dtype == np.int64


def test_load_data_imagefolder_reads_classes_resizes_and_splits(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "images")
    data = load_data(_data_cfg(dataset="imagefolder", root=str(root), image_size=8, val_fraction=0.2), 0)
    assert data.meta.labels == ["cat", "dog"] and data.meta.input_shape == (3, 8, 8)
    assert sum(data.meta.split_sizes.values()) == 12


def test_load_data_imagefolder_uses_separate_val_folder(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "train")
    val = _make_imagefolder(tmp_path / "val", per_class=3)
    data = load_data(_data_cfg(dataset="imagefolder", root=str(root), val_root=str(val)), 0)
    assert data.meta.split_sizes["val"] == 6
    assert data.meta.split_sizes["train"] + data.meta.split_sizes["test"] == 12


def test_load_data_imagefolder_converts_channels_when_asked(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "images", mode="L")
    data = load_data(_data_cfg(dataset="imagefolder", root=str(root), channels=3), 0)
    assert data.meta.channels == 3


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "data.root: no such folder"),
        (lambda root: root.mkdir(), "no class sub-folders"),
        (lambda root: (root / "a").mkdir(parents=True) or (root / "b").mkdir(), "no images found"),
        (lambda root: _make_imagefolder(root, classes=("only",)), "needs at least 2 classes"),
        (lambda root: (_make_imagefolder(root), (root / "cat" / "bad.png").write_bytes(b"not a png")), "bad.png: unreadable image"),
    ],
    ids=["missing", "empty", "no-images", "one-class", "corrupt"],
)
def test_load_data_imagefolder_names_the_path_when_input_is_bad(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "images"
    setup(root)
    with pytest.raises(InputError) as excinfo:
        load_data(_data_cfg(dataset="imagefolder", root=str(root)), 0)
    assert message in str(excinfo.value)
    assert str(root) in str(excinfo.value)


def test_load_data_cifar10_reads_torchvision_format_with_official_test_split(tmp_path: Path) -> None:
    root = _make_cifar(tmp_path / "cifar")
    data = load_data(_data_cfg(dataset="cifar10", root=str(root)), 0)
    assert data.meta.input_shape == (3, 32, 32) and data.meta.labels[0] == "airplane"
    assert data.meta.split_sizes["test"] == 20  # the official test_batch, not carved from training data
    assert data.meta.split_sizes["train"] + data.meta.split_sizes["val"] == 40


def test_load_data_cifar10_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    root = _make_cifar(tmp_path / "cifar", batches=1)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(InputError, match="refusing to load builtins.print"):
        load_data(_data_cfg(dataset="cifar10", root=str(root)), 0)


def test_load_data_cifar10_missing_without_download_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="set data.download: true"):
        load_data(_data_cfg(dataset="cifar10", root=str(tmp_path)), 0)
