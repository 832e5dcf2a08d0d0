"""Model registry, torchvision adaptation, user factories, and weights_only checkpoint I/O."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.errors import InputError
from edgekd.models import classifier_name, count_parameters, create_model, load_model, model_meta
from edgekd.models.checkpoint import load_into, read_checkpoint, save_checkpoint


@pytest.mark.parametrize("name", ["cnn_large", "cnn_medium", "cnn_small", "cnn_tiny", "cnn_small_ds"])
def test_create_model_builtin_cnns_give_logits_for_small_inputs(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=1, input_size=28).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)  # digits-sized inputs still work
    assert classifier_name(model) == "head"


def test_builtin_family_sizes_are_ordered() -> None:
    sizes = [count_parameters(create_model(n, num_classes=10, in_channels=1, input_size=28))
             for n in ("cnn_large", "cnn_medium", "cnn_small", "cnn_tiny")]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > 20 * sizes[2]


def test_models_command_lists_presets_and_the_cnn_options() -> None:
    from click.testing import CliRunner

    from edgekd.cli import main

    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert {"cnn", "cnn_large", "cnn_small_ds", "torchvision:<name>", "<pkg.module>:<factory>"} <= set(lines)
    assert "stem_stride=1" in lines["cnn"] and "widths=(32, 64, 128)" in lines["cnn"]
    assert "num_classes" not in lines["cnn"]  # supplied by edgekd from the data, not a model_kwargs option


def test_strided_stem_quarters_stage1_pixels_and_keeps_later_feature_maps(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgekd.models.structure import record_structure
    from edgekd.stages.prune.pruning import PruneSettings, prune_channels, resolve_ignored

    torch.manual_seed(0)
    kwargs = {"widths": [8, 16, 32], "blocks": 1}
    plain = create_model("cnn", num_classes=10, in_channels=1, input_size=28, kwargs=kwargs).eval()
    strided = create_model("cnn", num_classes=10, in_channels=1, input_size=28,
                           kwargs={**kwargs, "stem_stride": 2}).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert plain.stage1(x).shape == (2, 8, 28, 28) and strided.stage1(x).shape == (2, 8, 14, 14)
        assert plain.stage2(plain.stage1(x)).shape == strided.stage2(strided.stage1(x)).shape == (2, 16, 14, 14)
    assert count_parameters(plain) == count_parameters(strided)  # same layers, fewer pixels in stage 1
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in strided.stage2.modules())
    assert strided(torch.randn(1, 1, 8, 8)).shape == (1, 10)  # digits-sized inputs still work
    with pytest.raises(InputError, match="stem_stride must be 1 or 2"):
        create_model("cnn", num_classes=10, in_channels=1, input_size=28, kwargs={"stem_stride": 4})

    # pruned, saved with its structure record, restored, exported: identical outputs all the way
    pruned = prune_channels(strided, x[:1], 0.25, PruneSettings(), resolve_ignored(strided, [])).model.eval()
    assert pruned.stage1[0][0].out_channels == 6 and pruned.stage1[0][0].stride == (2, 2)
    path = save_checkpoint(pruned, tmp_path / "pruned.pt", {**model_meta("cnn", {**kwargs, "stem_stride": 2}, "pruned"),
                                                              "structure": record_structure(pruned)})
    restored = load_model(path, num_classes=10, in_channels=1, input_size=28)
    onnx_path = tmp_path / "pruned.onnx"
    torch.onnx.export(restored, (x,), str(onnx_path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert torch.equal(restored(x), pruned(x))
        np.testing.assert_allclose(got, pruned(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_create_model_adapts_torchvision_to_channels_and_small_inputs(name: str) -> None:
    model = create_model(f"torchvision:{name}", num_classes=7, in_channels=1, input_size=28).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1 and first_conv.stride == (1, 1)


def test_create_model_unknown_name_lists_available_ones() -> None:
    with pytest.raises(InputError, match=r"teacher.model: unknown model 'cnn_huge' \(available: cnn, cnn_large"):
        create_model("cnn_huge", num_classes=2, in_channels=1, input_size=8, field="teacher.model")
    with pytest.raises(InputError, match="torchvision has no model 'resnet999'"):
        create_model("torchvision:resnet999", num_classes=2, in_channels=1, input_size=8)
    with pytest.raises(InputError, match="widths must be positive"):
        create_model("cnn", num_classes=2, in_channels=1, input_size=8, kwargs={"widths": [0]})


def test_create_model_calls_user_factory_with_the_arguments_it_accepts(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "user_models.py").write_text(
        "import torch\n"
        "def build(num_classes, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))\n"
        "def broken(**kwargs):\n    raise ValueError('no such size')\n"
        "def not_a_model(**kwargs):\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("user_models:build", num_classes=3, in_channels=1, input_size=8, kwargs={"width": 8})
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(InputError, match="factory user_models:broken raised ValueError: no such size"):
        create_model("user_models:broken", num_classes=3, in_channels=1, input_size=8)
    with pytest.raises(InputError, match="returned int, not a torch.nn.Module"):
        create_model("user_models:not_a_model", num_classes=3, in_channels=1, input_size=8)
    with pytest.raises(InputError, match="cannot import 'no_such_module'"):
        create_model("no_such_module:build", num_classes=3, in_channels=1, input_size=8)
    sys.modules.pop("user_models", None)


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path: Path) -> None:
    model = create_model("cnn_small", num_classes=4, in_channels=1, input_size=16).eval()
    path = save_checkpoint(model, tmp_path / "m.pt", model_meta("cnn_small", {}, "student"))
    restored = load_model(path, num_classes=4, in_channels=1, input_size=16)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), restored(x))


def test_load_into_names_first_mismatching_key_and_shapes(tmp_path: Path) -> None:
    small = create_model("cnn_small", num_classes=4, in_channels=1, input_size=16)
    large = create_model("cnn_medium", num_classes=4, in_channels=1, input_size=16)
    save_checkpoint(large, tmp_path / "large.pt")
    state, _ = read_checkpoint(tmp_path / "large.pt")
    with pytest.raises(InputError, match=r"does not fit the architecture: 'stage1.0.0.weight' has shape \(16, 1, 3, 3\), the model expects \(8, 1, 3, 3\)"):
        load_into(small, state, "large.pt")


def test_read_checkpoint_accepts_plain_and_ddp_state_dicts(tmp_path: Path) -> None:
    model = create_model("cnn_tiny", num_classes=4, in_channels=1, input_size=16)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    state, meta = read_checkpoint(tmp_path / "ddp.pt")
    assert set(state) == set(model.state_dict()) and meta == {}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "corrupt or truncated checkpoint"),
        (b"\x80\x04garbage", "refused to load|corrupt or truncated checkpoint"),
    ],
)
def test_read_checkpoint_reports_corrupt_files(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_checkpoint(tmp_path / "bad.pt")


def test_read_checkpoint_rejects_truncated_and_non_state_dict_files(tmp_path: Path) -> None:
    model = create_model("cnn_tiny", num_classes=4, in_channels=1, input_size=16)
    save_checkpoint(model, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a state_dict"):
        read_checkpoint(tmp_path / "list.pt")


def test_read_checkpoint_never_unpickles_code_even_when_env_forces_unsafe_default(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(InputError, match="refused to load"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
