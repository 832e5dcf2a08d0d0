"""Image files streamed by the DataLoader: layouts, file lists, bad images, the preprocessing contract against
a direct PIL computation, determinism with workers, DistributedSampler shards, the memmapped teacher-logit
cache and the loader's wait fraction. Tiny images, a few seconds each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.config import validate_config
from edgekd.data.bundle import FileSplit, load_data
from edgekd.errors import ConfigError, InputError

CPU = torch.device("cpu")


def _cfg(**data):
    return validate_config({"data": data}).data


def _photo(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    """A smooth gradient image (so resampling differences show), `size` = (width, height)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 3 + yy * 2 + value) % 256
    if mode == "RGB":
        pixels = np.stack([base, (base + 60) % 256, (255 - base)], axis=-1).astype(np.uint8)
    else:
        pixels = base.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels, mode).save(path)


SIZES = [(40, 30), (31, 47), (64, 64), (50, 21), (23, 60), (37, 37)]


def _folder(root: Path, classes=("cat", "dog"), per_class=6) -> Path:
    for label, name in enumerate(classes):
        for i in range(per_class):
            suffix = ".png" if i % 2 else ".jpg"
            _photo(root / name / f"{i}{suffix}", SIZES[i % len(SIZES)], value=label * 100 + i * 7)
    return root


def _reference(path: Path, resize: int, crop: int, mean, std) -> np.ndarray:
    """The contract computed directly with PIL (independent of edgekd's code)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    W, H = image.size
    top, left = int(round((H - crop) / 2.0)), int(round((W - crop) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32).transpose(2, 0, 1)
    return (pixels * np.float32(1 / 255) - np.float32(mean).reshape(-1, 1, 1)) / np.float32(std).reshape(-1, 1, 1)


def test_eval_path_equals_direct_pil_reference_and_records_the_contract(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos")
    data = load_data(_cfg(dataset="imagefolder", root=str(root), resize=24, crop=20, num_workers=0,
                          mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]), 0)
    assert data.meta.input_shape == (3, 20, 20) and data.meta.streamed
    split = data.test
    ours = data.sample(split, np.arange(len(split))).numpy()
    for row, file in enumerate(split.files):
        expected = _reference(Path(file), 24, 20, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
        # torch divides by 255 where the contract multiplies by 1/255: float32 rounding only
        assert np.abs(ours[row] - expected).max() < 1e-5, file
    record = data.meta.preprocess()
    assert record == {
        "format": "edgekd-preprocess/2", "input_name": "input", "output_name": "logits", "layout": "NCHW",
        "color": "RGB", "channels": 3, "resize": 24, "crop": [20, 20], "height": 20, "width": 20,
        "interpolation": "bilinear", "antialias": True, "scale": 1 / 255, "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3], "formula": "input = (pixel * scale - mean[c]) / std[c]",
    }
    from edgekd.stages.export.exporter import build_metadata

    metadata = build_metadata(labels=data.meta.labels, preprocess=record, artifact="student", source_artifact="x.pt")
    assert json.loads(metadata["preprocess"]) == record


def test_non_square_crop_grey_and_sixteen_bit_images_follow_the_contract(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _folder(root)
    wide = np.arange(30 * 44, dtype=np.uint16).reshape(30, 44) * 40
    Image.fromarray(wide).save(root / "cat" / "sixteen.png")  # PIL opens it as I;16
    Image.new("CMYK", (33, 29), (10, 200, 30, 5)).save(root / "dog" / "cmyk.jpg")
    Image.new("RGBA", (25, 35), (200, 10, 10, 0)).save(root / "dog" / "alpha.png")
    data = load_data(_cfg(dataset="imagefolder", root=str(root), resize=20, crop=[16, 20], channels=1,
                          num_workers=0, mean=[0.5], std=[0.25], test_fraction=0.5), 0)
    assert data.meta.input_shape == (1, 16, 20) and data.meta.preprocess()["color"] == "L"
    from edgekd.data.images import reference_input

    everything = FileSplit(data.train.files + data.val.files + data.test.files,
                           torch.cat([data.train.labels, data.val.labels, data.test.labels]), "all")
    ours = data.sample(everything, np.arange(len(everything))).numpy()
    for row, file in enumerate(everything.files):
        assert np.abs(ours[row] - reference_input(file, data.meta.preprocess())[0]).max() < 1e-5
    sixteen = everything.files.index(str(root / "cat" / "sixteen.png"))
    image = Image.fromarray((wide >> 8).astype(np.uint8), "L").resize((29, 20), Image.BILINEAR)  # 44x30 -> 29x20
    left = int(round((29 - 20) / 2.0))
    expected = (np.asarray(image.crop((left, 2, left + 20, 18)), np.float32) / 255 - 0.5) / 0.25
    assert np.abs(ours[sixteen][0] - expected).max() < 1e-5


def test_train_val_test_layout_and_csv_and_jsonl_lists(tmp_path: Path) -> None:
    layered = tmp_path / "layered"
    _folder(layered / "train")
    _folder(layered / "val", per_class=2)
    _folder(layered / "test", per_class=3)
    data = load_data(_cfg(dataset="imagefolder", root=str(layered), image_size=8, num_workers=0), 0)
    assert data.meta.split_sizes == {"train": 12, "val": 4, "test": 6} and data.meta.labels == ["cat", "dog"]

    photos = _folder(tmp_path / "list" / "photos")
    rows = [(f"photos/{name}/{i}{'.png' if i % 2 else '.jpg'}", name) for name in ("cat", "dog") for i in range(6)]
    (tmp_path / "list" / "all.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    (tmp_path / "list" / "all.jsonl").write_text("".join(
        json.dumps({"path": p, "label": label, "split": "test" if i % 4 == 0 else "train"}) + "\n"
        for i, (p, label) in enumerate(rows)))
    from_csv = load_data(_cfg(dataset="filelist", root=str(tmp_path / "list" / "all.csv"), image_size=8,
                              num_workers=0, val_fraction=0.2), 0)
    assert sum(from_csv.meta.split_sizes.values()) == 12 and from_csv.meta.labels == ["cat", "dog"]
    assert all(Path(f).is_relative_to(photos) for f in from_csv.train.files)
    from_jsonl = load_data(_cfg(dataset="filelist", root=str(tmp_path / "list" / "all.jsonl"), image_size=8,
                                num_workers=0, val_fraction=0.2), 0)
    assert from_jsonl.meta.split_sizes["test"] == 3  # the rows marked test, nothing else


@pytest.mark.parametrize("rows, message", [
    ("photos/cat/0.jpg,cat\nphotos/cat/77.png,cat\nphotos/dog/1.png,dog\n", r"all\.csv: line 3: no such image file: .*77\.png$"),
    ("photos/cat/0.jpg,cat\nphotos/dog/1.png,dog\nphotos/dog/3.png,horse,val\n",
     r"all\.csv: line 4: unknown label 'horse' \(the training labels are: cat, dog\)$"),
    ("photos/cat/0.jpg,cat\nphotos/dog/1.png,\n", r"all\.csv: line 3: empty label$"),
], ids=["missing-file", "unknown-label", "empty-label"])
def test_file_list_errors_name_the_line(tmp_path: Path, rows: str, message: str) -> None:
    _folder(tmp_path / "photos")
    header = "path,label,split\n" if "val" in rows else "path,label\n"
    (tmp_path / "all.csv").write_text(header + rows)
    with pytest.raises(InputError, match=message):
        load_data(_cfg(dataset="filelist", root=str(tmp_path / "all.csv"), image_size=8, num_workers=0), 0)


def test_crop_larger_than_resize_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.crop: \[20, 40\] does not fit in resize 32 \(crop <= resize\)$"):
        validate_config({"data": {"dataset": "imagefolder", "root": str(_folder(tmp_path / "p")), "resize": 32,
                                  "crop": [20, 40]}})
    with pytest.raises(InputError, match=r"data\.crop: \[64, 64\] does not fit in data\.resize 48"):  # mixed with defaults
        load_data(_cfg(dataset="imagefolder", root=str(tmp_path / "p"), crop=64, num_workers=0), 0,
                  defaults={"resize": 48, "crop": 40, "mean": [0.5] * 3, "std": [0.2] * 3})


def test_pretrained_defaults_fill_what_the_config_leaves_unset(tmp_path: Path) -> None:
    root = _folder(tmp_path / "p")
    defaults = {"resize": 28, "crop": 24, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    data = load_data(_cfg(dataset="imagefolder", root=str(root), num_workers=0), 0, defaults=defaults)
    assert (data.meta.resize, data.meta.crop, data.meta.mean) == (28, (24, 24), defaults["mean"])
    own = load_data(_cfg(dataset="imagefolder", root=str(root), resize=20, crop=16, num_workers=0), 0, defaults=defaults)
    assert (own.meta.resize, own.meta.crop, own.meta.mean) == (20, (16, 16), defaults["mean"])
    legacy = load_data(_cfg(dataset="imagefolder", root=str(root), num_workers=0), 0)
    assert (legacy.meta.resize, legacy.meta.crop, legacy.meta.input_shape) == (None, None, (3, 32, 32))


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_image_error_names_the_file_or_is_skipped_and_counted(tmp_path: Path, policy: str) -> None:
    from edgekd.train.loop import accuracy, predict

    root = _folder(tmp_path / "p", per_class=8)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 8)
    data = load_data(_cfg(dataset="imagefolder", root=str(root), image_size=8, num_workers=0, on_bad_image=policy,
                          val_fraction=0.3, test_fraction=0.3, limit=None), 0)
    splits = [s for s in (data.train, data.val, data.test) if any(f.endswith("broken.png") for f in s.files)]
    split = splits[0]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    if policy == "error":
        with pytest.raises(InputError, match=r"broken\.png: unreadable image"):
            predict(model, split, data, CPU, batch_size=4)
        return
    logits = predict(model, split, data, CPU, batch_size=4)
    assert logits.shape == (len(split), 2)
    assert int(torch.isnan(logits).all(1).sum()) == 1  # the skipped row, left out of the accuracy
    assert 0.0 <= accuracy(logits, split.labels) <= 1.0
    assert data.skipped_summary() == {split.name: 1}


def _batches(data, workers: int, epoch: int, **kwargs):
    data.config.num_workers = workers
    data.close()
    source = data.batches(data.train, 4, CPU, shuffle=True, seed=5, augment=True, **kwargs)
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in source.epoch(epoch)]


def test_augmented_batches_are_identical_with_and_without_workers_and_change_per_epoch(tmp_path: Path) -> None:
    root = _folder(tmp_path / "p")
    data = load_data(_cfg(dataset="imagefolder", root=str(root), resize=24, crop=16, num_workers=0,
                          augment={"policy": "trivialaugment"}), 0)
    single = _batches(data, 0, epoch=1)
    workers = _batches(data, 2, epoch=1)
    assert len(single) == len(workers) == math.ceil(len(data.train) / 4)
    for (xa, ya, ia), (xb, yb, ib) in zip(single, workers):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    other_epoch = _batches(data, 2, epoch=2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(single, other_epoch))
    data.close()


def test_distributed_shards_are_disjoint_and_cover_the_split(tmp_path: Path) -> None:
    root = _folder(tmp_path / "p", per_class=7)
    data = load_data(_cfg(dataset="imagefolder", root=str(root), image_size=8, num_workers=0, val_fraction=0.1,
                          test_fraction=0.1), 0)
    shards = [torch.cat([i for _, _, i in data.batches(data.train, 3, CPU, shuffle=True, seed=1, rank=rank,
                                                       world_size=2).epoch(0)]) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(data.train) / 2)
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(len(data.train)))
    if len(data.train) % 2 == 0:
        assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_teacher_logit_cache_is_a_memmap_in_the_given_folder_and_removed_on_close(tmp_path: Path) -> None:
    from edgekd.train.objectives import TeacherLogitCache

    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    inputs = torch.randn(10, 12)
    cache = TeacherLogitCache(num_samples=10, num_classes=3, folder=tmp_path / "work")
    assert isinstance(cache.logits, np.memmap) and cache.path.is_file()
    first = cache.get(teacher, inputs[:6], torch.arange(6))
    again = cache.get(teacher, inputs[:6] * 0, torch.arange(6))  # served from the file, not recomputed
    assert torch.equal(first, again) and cache.stats()["hits"] == 6
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(np.array(np.load(cache.path, mmap_mode="r")[:6])), teacher(inputs[:6]))
    cache.close()
    assert not cache.path.exists()


def test_fit_on_streamed_files_records_the_loader_wait_fraction(tmp_path: Path) -> None:
    from edgekd.train.config import TrainConfig
    from edgekd.train.loop import fit

    root = _folder(tmp_path / "p")
    data = load_data(_cfg(dataset="imagefolder", root=str(root), resize=20, crop=16, num_workers=1,
                          val_fraction=0.2, augment={"policy": "randaugment", "mixup_alpha": 0.2,
                                                     "cutmix_alpha": 1.0}), 0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    result = fit(model, data, TrainConfig(epochs=2, augment=True, bn_recalibration_batches=1), device=CPU, seed=0,
                 batch_size=4, log=lambda _: None)
    loader = result.loader
    assert 0.0 <= loader["wait_fraction"] <= 1.0 and loader["streamed"] is True and loader["num_workers"] == 1
    assert loader["step_s"] > 0 and all(row["loader_wait_s"] >= 0 for row in result.history)
    assert all(math.isfinite(row["train_loss"]) for row in result.history)  # soft mixup/cutmix targets
    data.close()


def test_benchmark_accuracy_over_streamed_batches_equals_the_whole_array(tmp_path: Path) -> None:
    import onnx
    from onnx_models import tiny_classifier

    from edgekd.runtime.evaluate import EvalData
    from edgekd.stages.benchmark.measure import Artifact, evaluate_artifacts, evaluate_artifacts_streamed

    artifacts = []
    for seed, name in enumerate(("teacher", "student")):
        path = tmp_path / f"{name}.onnx"
        onnx.save(tiny_classifier(channels=3, size=8, classes=3, seed=seed), str(path))
        artifacts.append(Artifact(name, "fp32", path.name, path, None, None))
    rng = np.random.default_rng(0)
    inputs, labels = rng.normal(size=(50, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 50)
    whole = evaluate_artifacts(artifacts, EvalData(inputs, labels), 1, None)
    batches = ((inputs[i:i + 16], labels[i:i + 16]) for i in range(0, 50, 16))
    assert evaluate_artifacts_streamed(artifacts, batches, 1, None) == whole


def test_report_gives_each_trainings_loader_wait_and_flags_a_loader_bottleneck(tmp_path: Path) -> None:
    from report_fixture import make_manifest

    from edgekd.gate.budgets import normalize_budgets
    from edgekd.report.build import build_report
    from edgekd.report.markdown import render_markdown
    from edgekd.runner.contract import Manifest

    manifest = make_manifest(tmp_path).to_json()
    slow = {"wait_fraction": 0.42, "images_per_s": 35.0, "streamed": True, "num_workers": 2, "bottleneck": True,
            "advice": "the data loader is the bottleneck (42% of the step time waiting for images): raise "
                      "data.num_workers (now 2)"}
    manifest["stages"]["teacher"]["metrics"]["data_loader"] = {**slow, "wait_fraction": 0.01, "bottleneck": False,
                                                                "advice": None}
    manifest["stages"]["distill"]["metrics"]["data_loader"] = slow
    report = build_report(Manifest.from_json(manifest, "m"), tmp_path, normalize_budgets({}))
    assert [(row["training"], row["wait_fraction"]) for row in report["data_loading"]] == [("teacher", 0.01),
                                                                                         ("distill", 0.42)]
    assert [f["message"] for f in report["flags"] if f["kind"] == "loader_bottleneck"] == [
        f"distill: {slow['advice']}"]
    text = render_markdown(report, [])
    assert "## Data loading" in text and "| distill | 42.0% | 35.0 | 2 | bottleneck |" in text


RANK_SCRIPT = '''
import json, sys, torch
from pathlib import Path
from edgekd.config import validate_config
from edgekd.data.bundle import load_data
from edgekd.train import distributed
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit

distributed.init("cpu")
root, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = validate_config({"data": {"dataset": "imagefolder", "root": str(root), "resize": 20, "crop": 16,
                                "num_workers": 1, "val_fraction": 0.2}}).data
data = load_data(cfg, seed=0)
rank, world = distributed.rank(), distributed.world_size()
seen = torch.cat([i for _, _, i in data.batches(data.train, 4, torch.device("cpu"), shuffle=True, seed=0,
                                                 rank=rank, world_size=world, augment=True).epoch(1)]).tolist()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(4, 2))
result = fit(model, data, TrainConfig(epochs=1, bn_recalibration_batches=0), device=torch.device("cpu"), seed=0,
             batch_size=4, log=lambda _: None)
(out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "train": len(data.train),
                                                  "weights": float(sum(p.sum() for p in model.parameters())),
                                                  "wait": result.loader["wait_fraction"]}))
data.close()
distributed.shutdown()
'''


@pytest.mark.slow
def test_torchrun_ranks_read_disjoint_shards_of_the_files_and_train_one_model(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = _folder(tmp_path / "p", per_class=9)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(root), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "EDGEKD_DIST_TIMEOUT_S": "120"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    train = ranks[0]["train"]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == math.ceil(train / 2)
    assert set(ranks[0]["seen"]) | set(ranks[1]["seen"]) == set(range(train))
    assert len(set(ranks[0]["seen"]) & set(ranks[1]["seen"])) == 2 * math.ceil(train / 2) - train  # padding only
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-6)  # DDP: one model on both ranks


def test_eval_arrays_are_a_seeded_sample_of_a_large_split_and_the_whole_of_a_small_one(tmp_path: Path) -> None:
    from edgekd.stages.export.stage import eval_sample_limit

    assert eval_sample_limit((1, 28, 28)) > 10_000 and eval_sample_limit((3, 32, 32)) >= 10_000  # bundled: all
    assert 400 <= eval_sample_limit((3, 224, 224)) < 500  # photos: a bounded sample (256 MiB of float32)
    data = load_data(_cfg(dataset="imagefolder", root=str(_folder(tmp_path / "p", per_class=10)), image_size=8,
                          num_workers=0, test_fraction=0.4), 0)
    inputs, labels = data.normalized("test", limit=5, seed=1)
    again, _ = data.normalized("test", limit=5, seed=1)
    assert inputs.shape == (5, 3, 8, 8) and np.array_equal(inputs, again)
    sample = data.subset("test", 5, seed=1)
    assert set(sample.files) <= set(data.test.files) and list(sample.files) == sorted(sample.files, key=data.test.files.index)
    whole, whole_labels = data.normalized("test", limit=100)
    assert len(whole) == len(data.test) and np.array_equal(whole_labels, data.test.labels.numpy())


def test_signature_follows_the_file_list_and_the_transform_but_not_the_worker_count(tmp_path: Path) -> None:
    import os

    from edgekd.data.sources import dataset_signature

    _folder(tmp_path / "photos")
    listing = tmp_path / "all.csv"
    listing.write_text("path,label\nphotos/cat/0.jpg,cat\nphotos/dog/1.png,dog\n")
    base = {"data": {"dataset": "filelist", "root": str(listing), "resize": 24, "crop": 20}}
    cfg = validate_config(base)
    first = dataset_signature(cfg.data)
    assert first["files"] == 3  # the list and the two images it names
    image = tmp_path / "photos" / "dog" / "1.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # a rewritten image
    assert dataset_signature(cfg.data)["digest"] != first["digest"]
    listing.write_text("path,label\nphotos/cat/0.jpg,cat\nphotos/dog/3.png,dog\n")
    assert dataset_signature(cfg.data)["digest"] != first["digest"]
    views = [validate_config({"data": {**base["data"], **extra}}).data_view()["data"]
             for extra in ({}, {"num_workers": 0, "prefetch_factor": 8}, {"crop": 16})]
    assert views[0] == views[1] and views[0] != views[2]


@pytest.mark.slow
def test_pipeline_on_an_image_folder_records_loader_wait_and_the_contract_end_to_end(tmp_path: Path) -> None:
    from conftest import run_edgekd, write_config

    from edgekd.stages.export.exporter import read_metadata

    _folder(tmp_path / "photos", per_class=8)
    write_config(tmp_path, {"data": {"dataset": "imagefolder", "root": "photos", "resize": 24, "crop": 20,
                                     "batch_size": 8, "num_workers": 1, "val_fraction": 0.2},
                            "teacher": {"train": {"epochs": 1}}, "distill": {"epochs": 1, "augment": False},
                            "prune": None, "quantize": None})
    proc = run_edgekd("-q", "run", "pipeline.yaml", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert "eval transform: resize 24, center crop 20x20, mean [" in (run / "log.txt").read_text()
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    for stage in ("teacher", "distill"):
        assert 0.0 <= manifest[stage]["metrics"]["data_loader"]["wait_fraction"] <= 1.0
    assert manifest["distill"]["metrics"]["cache"]["enabled"]  # un-augmented: the memmapped logit cache
    assert not list(run.glob("*teacher-logits*"))  # its work folder is gone
    report = json.loads((run / "report.json").read_text())
    assert [row["training"] for row in report["data_loading"]] == ["teacher", "distill"]
    assert (report["data"]["resize"], report["data"]["crop"]) == (24, [20, 20])
    deployed = json.loads((run / "deploy" / "preprocess.json").read_text())
    assert deployed["format"] == "edgekd-preprocess/2" and deployed["resize"] == 24 and deployed["crop"] == [20, 20]
    metadata = read_metadata(run / "deploy" / "model.onnx")
    # the bundle's record adds which file and runtime it describes; the rest is the model's own record
    assert (deployed.pop("model_file"), deployed.pop("runtime")) == ("model.onnx", "onnxruntime")
    assert {**metadata["preprocess"], "size": [20, 20]} == deployed
