"""KD loss against hand-computed values, the frozen teacher, and the teacher-logit cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.config import validate_config
from edgekd.data.bundle import load_data
from edgekd.train.objectives import DistillationObjective, TeacherLogitCache, kd_loss, make_kd_objective

# Fixed logits; the reference values below were computed by hand (pure-Python softmax/log, see _reference).
STUDENT = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.0, 0.5, 2.5]]
LABELS = [1, 2]
CE_REF = 0.27025998087896064  # mean of -log softmax(student)[y]
KL_T2_REF = 0.08651314517735371  # batch mean of KL(softmax(teacher/2) || softmax(student/2)), no T^2
TOTAL_T2_A03_REF = 0.3233148007602786  # 0.3*CE + 0.7*4*KL


def _tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)


def _reference_kl(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    return sum(
        sum(p * math.log(p / q) for p, q in zip(softmax(tr), softmax(sr))) for sr, tr in zip(student, teacher)
    ) / len(student)


def test_kd_loss_equals_hand_computed_value() -> None:
    student, teacher, labels = _tensors()
    total, parts = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    assert float(parts["ce"]) == pytest.approx(CE_REF, rel=1e-6)
    assert float(parts["kd"]) == pytest.approx(4.0 * KL_T2_REF, rel=1e-6)
    assert float(total) == pytest.approx(TOTAL_T2_A03_REF, rel=1e-6)


def test_kd_loss_differs_from_reference_when_teacher_and_student_swapped() -> None:
    student, teacher, labels = _tensors()
    swapped, _ = kd_loss(teacher, student, labels, temperature=2.0, alpha=0.3)
    assert abs(float(swapped) - TOTAL_T2_A03_REF) > 1e-2


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_kd_loss_uses_batchmean_not_mean() -> None:
    student, teacher, labels = _tensors()
    _, parts = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.0)
    mean_reduced = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="mean") * 4
    assert float(parts["kd"]) == pytest.approx(3 * float(mean_reduced), rel=1e-6)  # 3 classes


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_loss_scales_kl_by_temperature_squared(temperature: float) -> None:
    student, teacher, labels = _tensors()  # float64: at T=8 the KL is small and float32 cancellation shows
    _, parts = kd_loss(student.double(), teacher.double(), labels, temperature=temperature, alpha=0.5)
    expected = temperature**2 * _reference_kl(STUDENT, TEACHER, temperature)
    assert float(parts["kd"]) == pytest.approx(expected, rel=1e-9)


def test_kd_loss_is_pure_kd_when_alpha_is_0_and_pure_ce_when_alpha_is_1() -> None:
    student, teacher, labels = _tensors()
    total_kd, parts = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.0)
    assert float(total_kd) == pytest.approx(4.0 * KL_T2_REF, rel=1e-6)
    total_ce, _ = kd_loss(student, teacher, labels, temperature=2.0, alpha=1.0)
    assert float(total_ce) == pytest.approx(CE_REF, rel=1e-6)
    assert float(total_ce) == pytest.approx(float(F.cross_entropy(student, labels)), rel=1e-6)


def test_kd_loss_is_zero_kd_when_student_equals_teacher() -> None:
    _, teacher, labels = _tensors()
    _, parts = kd_loss(teacher.clone(), teacher, labels, temperature=3.0, alpha=0.5)
    assert abs(float(parts["kd"])) < 1e-6


# --------------------------------------------------------------------------------------------------
# Frozen teacher


def _tiny_net(classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    )


def test_distillation_objective_sends_no_gradient_to_the_teacher() -> None:
    teacher, student = _tiny_net(seed=0).train(), _tiny_net(seed=1)
    objective = DistillationObjective(teacher, temperature=4.0, alpha=0.1)
    inputs, labels = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    loss, parts = objective(student, inputs, labels, torch.arange(8), False)
    loss.backward()
    assert set(parts) == {"ce", "kd"}
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not teacher.training


def test_distillation_objective_rejects_bad_temperature_and_alpha() -> None:
    with pytest.raises(ValueError, match=r"temperature must be > 0 \(got 0\)"):
        DistillationObjective(_tiny_net(), temperature=0, alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\] \(got 1.5\)"):
        DistillationObjective(_tiny_net(), temperature=1, alpha=1.5)


# --------------------------------------------------------------------------------------------------
# Teacher-logit cache


def test_cached_and_uncached_teacher_logits_give_identical_losses_on_identical_batches() -> None:
    teacher, student = _tiny_net(seed=0), _tiny_net(seed=1)
    cache = TeacherLogitCache(num_samples=16, num_classes=3)
    cached = DistillationObjective(teacher, 4.0, 0.1, cache=cache)
    uncached = DistillationObjective(teacher, 4.0, 0.1)
    torch.manual_seed(2)
    inputs, labels, indices = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)), torch.arange(4, 12)
    first, _ = cached(student, inputs, labels, indices, False)  # fills the cache
    second, parts = cached(student, inputs, labels, indices, False)  # served from it
    reference, reference_parts = uncached(student, inputs, labels, indices, False)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert torch.equal(parts["kd"], reference_parts["kd"])
    assert (cache.misses, cache.hits) == (8, 8)
    assert cache.stats() == {"hits": 8, "misses": 8, "hit_rate": 0.5}


def test_teacher_logit_cache_computes_only_missing_samples() -> None:
    calls: list[int] = []
    teacher = _tiny_net().eval()
    teacher.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    cache = TeacherLogitCache(num_samples=10, num_classes=3)
    images = torch.randn(10, 1, 6, 6)
    cache.get(teacher, images[:6], torch.arange(6))
    logits = cache.get(teacher, images[4:10], torch.arange(4, 10))  # 4, 5 cached; 6..9 new
    assert calls == [6, 4]
    assert (cache.hits, cache.misses) == (2, 10)
    with torch.no_grad():
        assert torch.allclose(logits, teacher(images[4:10]), atol=1e-6)


def test_distillation_objective_bypasses_cache_when_augmented() -> None:
    cache = TeacherLogitCache(num_samples=8, num_classes=3)
    objective = DistillationObjective(_tiny_net(), 4.0, 0.1, cache=cache)
    objective(_tiny_net(seed=1), torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)), torch.arange(8), True)
    assert (cache.hits, cache.misses) == (0, 0)
    assert not bool(cache.filled.any())


def _synthetic_cfg(**distill: object):  # noqa: ANN202
    return validate_config({
        "data": {"dataset": "synthetic", "synthetic": {"num_samples": 60, "num_classes": 3, "image_size": 8}},
        "distill": {"augment": False, **distill},
        "prune": None,
    })


def test_make_kd_objective_reads_distill_settings_and_caches_only_without_augmentation() -> None:
    cfg = _synthetic_cfg(temperature=3.0, alpha=0.25)
    data = load_data(cfg.data, seed=0)
    objective = make_kd_objective(cfg.distill.kd(), _tiny_net(), data, torch.device("cpu"), augment=False)
    assert (objective.temperature, objective.alpha) == (3.0, 0.25)
    assert objective.cache is not None and objective.cache.logits.shape == (len(data.train), 3)
    assert make_kd_objective(cfg.distill.kd(), _tiny_net(), data, torch.device("cpu"), augment=True).cache is None
    no_cache = _synthetic_cfg(cache_teacher_logits=False).distill.kd()
    assert make_kd_objective(no_cache, _tiny_net(), data, torch.device("cpu"), augment=False).cache is None


def test_prune_recovery_uses_kd_defaults_when_distill_is_off() -> None:
    from edgekd.stages import prune

    cfg = validate_config({"data": {"dataset": "synthetic"}, "distill": None, "prune": {"source": "teacher"}})
    data = load_data(cfg.data, seed=0)
    kd = prune.plan(cfg).settings.kd
    objective = make_kd_objective(kd, _tiny_net(4), data, torch.device("cpu"), augment=False)
    assert (objective.temperature, objective.alpha) == (4.0, 0.1)
    assert objective.cache is not None
