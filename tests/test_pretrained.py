"""Pretrained torchvision and timm models, offline: the cache files the libraries expect are built here from
untrained models' state_dicts (in a temporary TORCH_HOME / Hugging Face cache), so the real loading code runs;
the head is replaced and the backbone kept; 1-channel data sums the first convolution's RGB filters; a missing
file is one line naming the model, the cache path and the fetch command. timm's mobile models go through
pruning, the pruned-structure round trip, ONNX export and int8."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from edgekd.errors import InputError
from edgekd.models import create_model, load_model, model_meta
from edgekd.models.checkpoint import save_checkpoint
from edgekd.models.pretrained import (preprocessing_defaults, torchvision_cache_file, torchvision_weights,
                                      weights_preprocessing)

timm = pytest.importorskip("timm", reason="timm is the optional [timm] extra")


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def cache_torchvision(name: str, weights: str = "DEFAULT", seed: int = 1) -> tuple[torch.nn.Module, Path]:
    """The file torchvision's builder reads: torch hub's checkpoints/<basename of the weights' URL>, holding a
    state_dict (here an untrained model's, with the weights' 1000 ImageNet classes)."""
    member = torchvision_weights(name, weights, "test")
    path = torchvision_cache_file(member)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    reference = torchvision.models.get_model(name, weights=None, num_classes=len(member.meta["categories"])).eval()
    torch.save(reference.state_dict(), path)
    return reference, path


def test_torchvision_weights_replace_the_head_and_keep_the_backbone(torch_home: Path) -> None:
    reference, path = cache_torchvision("mobilenet_v3_small")
    assert path == torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    model = create_model("torchvision:mobilenet_v3_small", num_classes=5, in_channels=3, input_size=224,
                         weights="DEFAULT", field="teacher.model")
    head = model.classifier[3]
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (1024, 5)
    state, pretrained = model.state_dict(), reference.state_dict()
    backbone = [key for key in pretrained if not key.startswith("classifier.3.")]
    assert len(backbone) > 200 and all(torch.equal(state[key], pretrained[key]) for key in backbone)
    # the architecture the weights were trained for: stride-2 stem even for small inputs
    assert model.features[0][0].stride == (2, 2)


def test_one_channel_data_sums_the_pretrained_rgb_filters(torch_home: Path) -> None:
    reference, _ = cache_torchvision("resnet18")
    model = create_model("torchvision:resnet18", num_classes=10, in_channels=1, input_size=28, weights="IMAGENET1K_V1")
    assert model.conv1.in_channels == 1
    assert torch.allclose(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # a grey image is R = G = B: the adapted stem responds exactly like the RGB one
        assert torch.allclose(model.conv1(grey), reference.conv1(grey.expand(-1, 3, -1, -1)), atol=1e-5)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_checkpoint_of_a_pretrained_model_reloads_without_the_cache(torch_home: Path, tmp_path: Path) -> None:
    _, path = cache_torchvision("resnet18")
    model = create_model("torchvision:resnet18", num_classes=3, in_channels=3, input_size=32, weights="DEFAULT").eval()
    save_checkpoint(model, tmp_path / "student.pt", model_meta("torchvision:resnet18", {}, "student", weights="DEFAULT"))
    path.unlink()  # the checkpoint holds every weight: the pretrained file is not read again
    reloaded = load_model(tmp_path / "student.pt", num_classes=3, in_channels=3, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_missing_cache_file_names_the_model_the_path_and_the_fetch_command(torch_home: Path) -> None:
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(InputError) as caught:
        create_model("torchvision:resnet18", num_classes=3, in_channels=3, input_size=32, weights="DEFAULT",
                     field="teacher.model")
    assert str(caught.value) == (
        f"teacher.weights: the pretrained weights of torchvision:resnet18 (weights DEFAULT) are not in the local "
        f"cache ({expected}); edgekd downloads nothing during a run: fetch them once with: "
        "python -c \"import torchvision; torchvision.models.get_model('resnet18', weights='DEFAULT')\"")
    assert not expected.exists()  # nothing was fetched
    with torch.device("meta"):  # the pre-flight build checks the cache too
        with pytest.raises(InputError, match="not in the local cache"):
            create_model("torchvision:resnet18", num_classes=3, in_channels=3, input_size=32, weights="DEFAULT")


def test_unknown_weights_name_lists_the_valid_ones() -> None:
    with pytest.raises(InputError, match=r"^student\.weights: 'IMAGENET1K_V3' is not a weights name of "
                                         r"torchvision:resnet50 \(valid: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2\)$"):
        create_model("torchvision:resnet50", num_classes=3, in_channels=3, input_size=32, weights="IMAGENET1K_V3",
                     field="student.model")


def test_a_cache_file_that_is_not_plain_tensors_is_refused(torch_home: Path) -> None:
    """torchvision's loader unpickles with weights_only=False; edgekd reads the file with weights_only=True first."""
    member = torchvision_weights("resnet18", "DEFAULT", "test")
    path = torchvision_cache_file(member)
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(print, protocol=2))  # a pickle that names a callable
    with pytest.raises(InputError, match=r"resnet18-f37072fd\.pth: refused to load: not a plain weights file"):
        create_model("torchvision:resnet18", num_classes=3, in_channels=3, input_size=32, weights="DEFAULT")


def test_weights_preprocessing_is_the_weights_own_eval_transform() -> None:
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert weights_preprocessing("torchvision:resnet50", "IMAGENET1K_V2") == {
        "resize": 232, "crop": [224, 224], **imagenet, "interpolation": "bilinear"}
    assert weights_preprocessing("torchvision:resnet50", "IMAGENET1K_V1") == {
        "resize": 256, "crop": [224, 224], **imagenet, "interpolation": "bilinear"}
    assert weights_preprocessing("timm:mobilenetv3_small_100", True) == {
        "resize": 256, "crop": [224, 224], **imagenet, "interpolation": "bicubic"}
    assert weights_preprocessing("torchvision:resnet50", None) is None
    assert weights_preprocessing("cnn_small", None) is None


def test_the_teachers_weights_decide_the_runs_preprocessing_defaults() -> None:
    from edgekd.stages.distill.config import StudentConfig
    from edgekd.stages.teacher.config import TeacherConfig

    teacher = TeacherConfig(model="torchvision:resnet50", weights="IMAGENET1K_V2")
    student = StudentConfig(model="timm:mobilenetv3_small_100", pretrained=True)
    assert preprocessing_defaults(teacher, student)["resize"] == 232  # the teacher's, not the student's 256
    assert preprocessing_defaults(TeacherConfig(), student)["interpolation"] == "bicubic"
    assert preprocessing_defaults(TeacherConfig(), StudentConfig()) is None


# --------------------------------------------------------------------------------------------------
# timm


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    folder = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return folder


def cache_timm(folder: Path, name: str) -> torch.nn.Module:
    """The Hugging Face hub cache layout timm reads from: models--<org>--<repo>/refs/main -> snapshots/<rev>/."""
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    root = folder / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123abcd")
    (root / "snapshots" / "0123abcd").mkdir(parents=True)
    torch.manual_seed(2)
    reference = timm.create_model(name).eval()
    save_file(reference.state_dict(), root / "snapshots" / "0123abcd" / "model.safetensors")
    return reference


def test_timm_pretrained_loads_from_the_hub_cache_with_a_new_head(hf_cache: Path) -> None:
    reference = cache_timm(hf_cache, "mobilenetv3_small_100")
    model = create_model("timm:mobilenetv3_small_100", num_classes=5, in_channels=1, input_size=64, pretrained=True)
    assert model.classifier.out_features == 5
    assert torch.allclose(model.conv_stem.weight, reference.conv_stem.weight.sum(dim=1, keepdim=True))
    pretrained = reference.state_dict()
    kept = [k for k in pretrained if not k.startswith(("classifier.", "conv_stem."))]
    assert all(torch.equal(model.state_dict()[k], pretrained[k]) for k in kept)


def test_timm_missing_weights_name_the_caches_and_the_fetch_command(hf_cache: Path) -> None:
    with pytest.raises(InputError) as caught:
        create_model("timm:efficientnet_b0", num_classes=5, in_channels=3, input_size=64, pretrained=True,
                     field="student.model")
    message = str(caught.value)
    assert message.startswith("student.pretrained: the pretrained weights of timm:efficientnet_b0 (pretrained) are "
                              f"not in the local cache ({hf_cache}/models--timm--efficientnet_b0.ra_in1k")
    assert message.endswith("fetch them once with: python -c \"import timm; "
                            "timm.create_model('efficientnet_b0', pretrained=True)\"")


def test_timm_unknown_model_and_weights_on_the_wrong_library() -> None:
    with pytest.raises(InputError, match=r"^student\.model: timm has no model 'mobilenetv9_tiny'"):
        create_model("timm:mobilenetv9_tiny", num_classes=5, in_channels=3, input_size=64, field="student.model")
    with pytest.raises(InputError, match=r"^student\.weights: weights are for torchvision:<name> models"):
        create_model("timm:efficientnet_b0", num_classes=5, in_channels=3, input_size=64, weights="DEFAULT",
                     field="student.model")


def _prune_export_quantize(name: str, tmp_path: Path) -> dict[str, float]:
    """timm `name` (untrained, 64x64, 5 classes) through edgekd's pruning, the pruned-structure checkpoint
    round trip, ONNX export with parity, and static int8."""
    import onnx
    import onnxruntime as ort

    from edgekd.models.structure import apply_structure, record_structure
    from edgekd.stages.export.exporter import export_onnx, parity
    from edgekd.stages.prune.pruning import PruneSettings, prune_channels, resolve_ignored
    from edgekd.stages.quantize.quantization import ArrayCalibrationReader, QuantSettings, preprocess, quantize_model

    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=5, in_channels=3, input_size=64).eval()
    x = torch.randn(8, 3, 64, 64)
    result = prune_channels(model, x[:1], 0.3, PruneSettings(), resolve_ignored(model, []))
    pruned = result.model.eval()
    fresh = create_model(f"timm:{name}", num_classes=5, in_channels=3, input_size=64)
    apply_structure(fresh, record_structure(pruned))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    export_onnx(pruned, x[:2], tmp_path / "pruned.onnx", opset=17, name=name)
    worst_parity = max(row["max_abs_diff"] for row in parity(pruned, tmp_path / "pruned.onnx", x.numpy(), [1, 3]))
    preprocess(tmp_path / "pruned.onnx", tmp_path / "pre.onnx")
    quantize_model(tmp_path / "pre.onnx", tmp_path / "int8.onnx", QuantSettings(), ArrayCalibrationReader(x.numpy()))
    int8 = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"input": x.numpy()})[0]
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and int8.shape == (8, 5) and np.isfinite(int8).all()
    return {"params_fraction": result.params / sum(p.numel() for p in model.parameters()), "parity": worst_parity}


def test_timm_mobilenetv3_small_prunes_exports_and_quantizes(tmp_path: Path) -> None:
    measured = _prune_export_quantize("mobilenetv3_small_100", tmp_path)
    assert 0.3 < measured["params_fraction"] < 0.8 and measured["parity"] < 1e-4


@pytest.mark.slow
def test_timm_efficientnet_b0_prunes_exports_and_quantizes(tmp_path: Path) -> None:
    measured = _prune_export_quantize("efficientnet_b0", tmp_path)
    assert 0.3 < measured["params_fraction"] < 0.8 and measured["parity"] < 1e-4


class FixedView(torch.nn.Module):
    """Reshapes with a hard-coded channel count, as some custom blocks do: pruning its input breaks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 16, -1).mean(-1)[..., None, None] * x


def test_a_layer_torch_pruning_cannot_handle_is_named() -> None:
    from edgekd.stages.prune.pruning import PruneSettings, prune_channels, resolve_ignored

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), FixedView(), torch.nn.Conv2d(16, 16, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    example = torch.randn(1, 3, 8, 8)
    with pytest.raises(InputError, match=r"^prune: after pruning, torch-pruning left a layer that does not run: layer "
                                         r"'1' \(FixedView\): RuntimeError: .*add the layer before it \(or the block "
                                         r"holding it\) to prune\.ignore$"):
        prune_channels(model, example, 0.5, PruneSettings(), resolve_ignored(model, []))
    kept = prune_channels(model, example, 0.5, PruneSettings(), resolve_ignored(model, ["0"]))  # as the message says
    assert kept.model(example).shape == (1, 4)


def test_a_frozen_backbone_keeps_its_weights_and_statistics_while_the_head_learns() -> None:
    from edgekd.config import validate_config
    from edgekd.data.bundle import load_data
    from edgekd.train.config import TrainConfig
    from edgekd.train.loop import fit

    cfg = validate_config({"data": {"dataset": "synthetic", "synthetic": {"num_samples": 200, "image_size": 12}}})
    data = load_data(cfg.data, seed=0)
    torch.manual_seed(0)
    model = create_model("cnn_small", num_classes=data.meta.num_classes, in_channels=1, input_size=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainConfig(epochs=2, lr=0.01, freeze_backbone_epochs=1, bn_recalibration_batches=0, augment=False)
    frozen_epoch: dict[str, torch.Tensor] = {}

    def log(line: str) -> None:  # called at the end of each epoch: keep the state after the frozen one
        if not frozen_epoch:
            frozen_epoch.update({k: v.clone() for k, v in model.state_dict().items()})

    result = fit(model, data, settings, device=torch.device("cpu"), seed=0, batch_size=32, log=log)
    assert [row.get("backbone_frozen", False) for row in result.history] == [True, False]
    backbone = [k for k in before if not k.startswith("head.")]
    assert all(torch.equal(frozen_epoch[k], before[k]) for k in backbone)  # weights and BatchNorm statistics
    assert not torch.equal(frozen_epoch["head.weight"], before["head.weight"])
    assert not torch.equal(model.state_dict()["stage1.0.0.weight"], before["stage1.0.0.weight"])  # epoch 2 trains all
