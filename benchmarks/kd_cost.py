"""What a KD epoch costs next to a plain (CE) epoch, measured side by side in one run.

    python benchmarks/kd_cost.py [--dataset mnist5k] [--teacher cnn_large] [--student cnn_small] [--repeats 3]
    python benchmarks/kd_cost.py --config pipeline.yaml [--repeats 3]   # the models, data and distill settings of a pipeline

Three trainings of the same student with the shared loop (`edgekd.train.loop.fit`, augmentation off):
  plain      cross-entropy only (what the baseline student costs)
  kd_cached  KD with the teacher-logit cache (teacher runs once per sample, in epoch 1)
  kd_live    KD running the teacher on every batch (what augmentation or a hint costs)
They are interleaved repeat by repeat so machine noise hits all three alike; an epoch's time is fit's
`time_s` (training steps plus the per-epoch validation pass, as in a real run). Epoch 1 is reported apart:
it fills the cache. The target is kd_cached / plain <= 1.3 for the epochs after the first.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from typing import Any

import torch

from edgekd.config import load_config, validate_config
from edgekd.data.bundle import load_data
from edgekd.train.objectives import CrossEntropyObjective, make_kd_objective
from edgekd.models import count_parameters, create_model
from edgekd.train.loop import fit, resolve_device

TARGET = 1.3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "digits", "synthetic"])
    parser.add_argument("--teacher", default="cnn_large")
    parser.add_argument("--student", default="cnn_small")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training (>= 2: epoch 1 fills the cache)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: every core, as in training; 1 is steadier on a busy machine)")
    parser.add_argument("--run-epochs", type=int, default=12,
                        help="also report the whole-training ratio for this many epochs (cache fill included)")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    parser.add_argument("--config", type=str, default=None,
                        help="take data, batch size, teacher/student (with model_kwargs) and the distill settings "
                             "(lr, schedule, channels_last, ...) from this pipeline.yaml; augmentation off")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2")

    teacher_kwargs: dict[str, Any] = {}
    student_kwargs: dict[str, Any] = {}
    if args.config:
        base = load_config(args.config)
        distill = base.distill.model_dump(mode="json", by_alias=True) if base.distill is not None else {}
        distill.update(epochs=args.epochs, augment=False, baseline=False)
        cfg = validate_config({"data": base.data.model_dump(mode="json", by_alias=True), "distill": distill,
                               "prune": None})
        args.dataset, args.batch_size = cfg.data.dataset, cfg.data.batch_size
        args.teacher, teacher_kwargs = base.teacher.model, dict(base.teacher.model_kwargs)
        args.student, student_kwargs = base.student.model, dict(base.student.model_kwargs)
    else:
        cfg = validate_config({
            "data": {"dataset": args.dataset, "batch_size": args.batch_size, "limit": args.limit},
            "distill": {"epochs": args.epochs, "augment": False, "baseline": False},
            "prune": None,
        })
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(cfg.data, seed=0)
    meta = data.meta
    shape = dict(num_classes=meta.num_classes, in_channels=meta.channels, input_size=meta.height)
    # Timing does not depend on the weights: an untrained teacher runs exactly the same kernels.
    teacher = create_model(args.teacher, kwargs=teacher_kwargs, **shape).to(device).eval()
    student_init = create_model(args.student, kwargs=student_kwargs, **shape).state_dict()

    def train(mode: str) -> list[float]:
        student = create_model(args.student, kwargs=student_kwargs, **shape)
        student.load_state_dict(student_init)
        if mode == "plain":
            objective = CrossEntropyObjective()
        else:
            objective = make_kd_objective(cfg.distill.kd(), teacher, data, device, augment=cfg.distill.augment)
            if mode == "kd_live":
                objective.cache = None
        result = fit(student, data, cfg.distill, device=device, seed=0, objective=objective,
                     batch_size=args.batch_size, log=lambda _: None)
        return [row["time_s"] for row in result.history]

    modes = ("plain", "kd_cached", "kd_live")
    first: dict[str, list[float]] = {m: [] for m in modes}
    later: dict[str, list[float]] = {m: [] for m in modes}
    train("plain")  # warm-up: allocator, kernels, first-touch of the data
    for _ in range(args.repeats):
        for mode in modes:
            times = train(mode)
            first[mode].append(times[0])
            later[mode].extend(times[1:])

    med = {m: statistics.median(later[m]) for m in modes}
    med_first = {m: statistics.median(first[m]) for m in modes}
    result: dict[str, Any] = {
        "inputs": {
            "dataset": args.dataset, "train_samples": len(data.train), "val_samples": len(data.val),
            "input_shape": list(meta.input_shape), "batch_size": args.batch_size,
            "teacher": args.teacher, "teacher_kwargs": teacher_kwargs, "teacher_params": count_parameters(teacher),
            "student": args.student, "student_kwargs": student_kwargs,
            "student_params": count_parameters(create_model(args.student, kwargs=student_kwargs, **shape)),
            "channels_last": cfg.distill.channels_last, "config": args.config,
            "epochs_per_training": args.epochs, "repeats": args.repeats, "device": str(device),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        },
        "epoch_s_median": {m: round(v, 4) for m, v in med.items()},
        "first_epoch_s_median": {m: round(v, 4) for m, v in med_first.items()},
        "ratio_kd_cached_vs_plain": round(med["kd_cached"] / med["plain"], 3),
        "ratio_kd_live_vs_plain": round(med["kd_live"] / med["plain"], 3),
        "ratio_first_epoch_kd_cached_vs_plain": round(med_first["kd_cached"] / med_first["plain"], 3),
        "target": TARGET,
    }
    result["meets_target"] = result["ratio_kd_cached_vs_plain"] <= TARGET
    # A whole distillation: one cache-filling epoch, then cached ones (per-epoch medians, extrapolated).
    n = args.run_epochs
    result[f"ratio_{n}_epoch_training_kd_cached_vs_plain"] = round(
        (med_first["kd_cached"] + (n - 1) * med["kd_cached"]) / (med_first["plain"] + (n - 1) * med["plain"]), 3
    )

    inputs = result["inputs"]
    print(f"KD epoch cost on {inputs['device']} ({inputs['torch_threads']} torch threads, torch {inputs['torch']})")
    print(f"  data: {args.dataset}, {inputs['train_samples']} train / {inputs['val_samples']} val, "
          f"{'x'.join(map(str, inputs['input_shape']))}, batch {args.batch_size}")
    print(f"  teacher {args.teacher} ({inputs['teacher_params']:,} params), student {args.student} ({inputs['student_params']:,} params)")
    print(f"  {args.repeats} repeats x {args.epochs} epochs per mode, interleaved; medians of epochs 2..{args.epochs}:")
    for mode in modes:
        print(f"    {mode:10s} {med[mode]:7.3f} s/epoch   (epoch 1: {med_first[mode]:.3f} s; all later: "
              f"{', '.join(f'{t:.3f}' for t in later[mode])})")
    print(f"  ratio kd_cached / plain = {result['ratio_kd_cached_vs_plain']:.3f} (target <= {TARGET}: "
          f"{'met' if result['meets_target'] else 'NOT met'})")
    print(f"  ratio kd_live   / plain = {result['ratio_kd_live_vs_plain']:.3f} (teacher on every batch)")
    print(f"  epoch 1 (cache filling): kd_cached / plain = {result['ratio_first_epoch_kd_cached_vs_plain']:.3f}")
    print(f"  whole {n}-epoch training (1 filling + {n - 1} cached epochs): kd_cached / plain = "
          f"{result[f'ratio_{n}_epoch_training_kd_cached_vs_plain']:.3f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
