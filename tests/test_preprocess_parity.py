"""The preprocessing contract (preprocess.json / ONNX metadata `preprocess`, format edgekd-preprocess/2) gives the
same model inputs and logits in every app-side implementation as in edgekd's Python reference.

Real PNG and JPEG files (RGB, grey, RGBA, palette, 16-bit grey, CMYK, EXIF-rotated; 13 to 1000 px, portrait,
landscape, 25:1) go through:
  reference   Pillow per the contract + numpy normalization, written out here step by step (and shown equal,
              pixel for pixel, to torchvision's eval transform `v2.Resize(int, antialias=True)` +
              `v2.CenterCrop` on the same PIL image)
  runtime     edgekd.runtime.preprocess.image_to_input
  runner      the bundle's run_on_device.py --images --logits-out (a fresh subprocess, bundle copy of the runtime)
  js          deploy/js/classify.js in Node (pngjs / jpeg-js decoders, preprocess.js transform)
  browser     deploy/js/preprocess.js in headless Chromium: decodeInBrowser (createImageBitmap + canvas) and
              the same transform, driven over the DevTools pipe
  cpp         deploy/cpp edgekd_classify --images (libpng / libjpeg decoders, preprocess.h transform)
for three specs: RGB resize 64 + crop 56, RGB resize null (squash to 56x56), grey resize 64 + crop 56.

Tolerance (the contract's): same top-1 everywhere; max |logit difference| <= 1e-3 on PNG files; <= 0.05 on JPEG
files, whose decoders may differ. Measured when this test was written (logits up to 5.6 in magnitude):
runtime, runner and C++ (libpng, libjpeg-turbo as Pillow) <= 5e-10 on every file, PNG and JPEG (identical inputs;
the rest is the printed precision); JS 0.0 on PNG, and on JPEG up to 0.026 (jpeg-js's IDCT differs from
libjpeg's by up to 3 levels per pixel before resizing); the browser gives Pillow's pixels exactly (2 levels on the
semi-transparent RGBA file). The pixel-level tests assert the JS and C++ resampling equal Pillow's exactly on random
8-bit images (0 levels of difference), up- and downscaling, grey and RGB, including the pass order Pillow 13
chose (vertical first when the height shrinks by more than twice as many pixels as the width; with an older
Pillow such resizes differ by one level on some pixels, which these tests then allow).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
Image = pytest.importorskip("PIL.Image")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from PIL import ImageOps  # noqa: E402

from edgekd.runtime import bundle as runtime_bundle  # noqa: E402
from edgekd.runtime.errors import RuntimeInputError  # noqa: E402
from edgekd.runtime.preprocess import image_to_input, load_preprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "deploy" / "js"

# The node_modules and cpp_binary fixtures (npm install / cmake build, cached) come from the examples' test.
_spec = importlib.util.spec_from_file_location("_edgekd_test_examples",
                                               Path(__file__).with_name("test_embedding_examples.py"))
_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_examples)
node_modules, cpp_binary = _examples.node_modules, _examples.cpp_binary

PNG_TOLERANCE, JPEG_TOLERANCE = 1e-3, 0.05
LABELS = [f"class_{i}" for i in range(10)]
MEAN_RGB, STD_RGB = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def spec(color: str, resize: int | None) -> dict:
    channels = 3 if color == "RGB" else 1
    return {"format": "edgekd-preprocess/2", "input_name": "input", "output_name": "logits", "layout": "NCHW",
            "color": color, "channels": channels, "resize": resize, "crop": [56, 56] if resize else None,
            "height": 56, "width": 56, "interpolation": "bilinear", "antialias": True, "scale": 1 / 255,
            "mean": MEAN_RGB if channels == 3 else [0.5], "std": STD_RGB if channels == 3 else [0.25],
            "formula": "input = (pixel * scale - mean[c]) / std[c]"}


SPECS = {"rgb-64-crop-56": spec("RGB", 64), "rgb-squash-56": spec("RGB", None), "grey-64-crop-56": spec("L", 64)}


# ---------------------------------------------------------------- fixtures: images, models, bundles

def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth colour gradients, a few discs, mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [128 + 100 * np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * y)
                for _ in range(3)]
    img = np.stack(channels, -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        img[(x - cx * width / max(width, height)) ** 2 + (y - cy * height / max(width, height)) ** 2 < r * r] = \
            rng.integers(0, 256, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def write_images(folder: Path) -> list[Path]:
    files = []

    def save(name: str, image, **kw) -> None:
        image.save(folder / name, **kw)
        files.append(folder / name)

    save("rgb_300x200.png", Image.fromarray(photo(300, 200, 1)))
    save("grey_199x333.png", Image.fromarray(photo(199, 333, 2)).convert("L"))
    rgba = np.dstack([photo(64, 64, 3), np.linspace(40, 255, 64 * 64).reshape(64, 64).astype(np.uint8)])
    save("rgba_64x64.png", Image.fromarray(rgba, "RGBA"))
    save("palette_90x61.png", Image.fromarray(photo(90, 61, 4)).quantize(200))
    low_byte = np.random.default_rng(5).integers(0, 256, (90, 120), dtype=np.uint16)
    grey16 = (photo(120, 90, 5)[..., 0].astype(np.uint16) << 8) | low_byte
    save("grey16_120x90.png", Image.fromarray(grey16))  # mode I;16
    save("small_20x13.png", Image.fromarray(photo(20, 13, 6)))  # upscaled
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise on display
    save("exif8_70x50.png", Image.fromarray(photo(70, 50, 7)), exif=exif)
    save("wide_1000x40.jpg", Image.fromarray(photo(1000, 40, 8)), quality=90)
    save("tall_199x333.jpg", Image.fromarray(photo(199, 333, 9)), quality=85)
    save("grey_64x64.jpg", Image.fromarray(photo(64, 64, 10)).convert("L"), quality=90)
    save("cmyk_150x100.jpg", Image.fromarray(photo(150, 100, 11)).convert("CMYK"), quality=95)
    exif[0x0112] = 6  # rotate 90 clockwise on display
    save("exif6_90x140.jpg", Image.fromarray(photo(90, 140, 12)), quality=90, exif=exif)
    return files


def classifier(channels: int, seed: int) -> onnx.ModelProto:
    """Conv 3x3 stride 4 + Relu + Flatten + Gemm on 56x56: every pixel's position matters (crop offsets,
    orientation), unlike a global-pooling model."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (rng.standard_normal((8, channels, 3, 3)) / np.sqrt(9 * channels), "W"), (np.zeros(8), "B"),
        (rng.standard_normal((8 * 14 * 14, 10)) / np.sqrt(8 * 14 * 14 / 4), "G"), (np.zeros(10), "GB"))]
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["c"], pads=[1, 1, 1, 1], strides=[4, 4]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "GB"], ["logits"])]
    graph = helper.make_graph(
        nodes, "parity", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, 56, 56])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_bundle(folder: Path, pre: dict, seed: int) -> Path:
    """A deploy bundle as the pipeline writes it: model.onnx (preprocess + labels in its metadata),
    labels.json, preprocess.json, run_on_device.py + edgekd_runtime/."""
    folder.mkdir(parents=True)
    model = classifier(pre["channels"], seed)
    for key, value in (("preprocess", pre), ("labels", LABELS)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "labels.json").write_text(json.dumps(LABELS))
    (folder / "preprocess.json").write_text(json.dumps({**pre, "size": [pre["height"], pre["width"]]}))
    runtime_bundle.install_device_runner(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {name: make_bundle(root / name, pre, seed) for seed, (name, pre) in enumerate(SPECS.items())}


# ---------------------------------------------------------------- the reference, step by step

def reference_pixels(path: Path, pre: dict) -> np.ndarray:
    """The contract with Pillow, written out: uint8 (H, W, C) of the model's size."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).astype(np.uint8), "L")
    image = image.convert(pre["color"])
    w, h = image.size
    if pre["resize"] is None:
        size = (pre["width"], pre["height"])
    else:
        new_long = int(pre["resize"] * max(w, h) / min(w, h))
        size = (pre["resize"], new_long) if w <= h else (new_long, pre["resize"])
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    if pre["crop"] is not None:
        (ch, cw), (w, h) = pre["crop"], image.size
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        image = image.crop((left, top, left + cw, top + ch))
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def reference_input(path: Path, pre: dict) -> np.ndarray:
    chw = reference_pixels(path, pre).transpose(2, 0, 1).astype(np.float32)
    mean = np.array(pre["mean"], np.float32)[:, None, None]
    std = np.array(pre["std"], np.float32)[:, None, None]
    return ((chw * np.float32(pre["scale"]) - mean) / std)[None]


def python_logits(bundle: Path, inputs: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": inputs})[0]


def reference_logits(bundle: Path, images: list[Path]) -> np.ndarray:
    pre = json.loads((bundle / "preprocess.json").read_text())
    return python_logits(bundle, np.concatenate([reference_input(f, pre) for f in images]))


def assert_parity(name: str, images: list[Path], expected: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Same top-1 for every file; max |logit difference| within the contract's tolerance per file type."""
    assert got.shape == expected.shape, name
    diffs = {}
    for path, want, have in zip(images, expected, got):
        diff = float(np.abs(want - have).max())
        limit = PNG_TOLERANCE if path.suffix == ".png" else JPEG_TOLERANCE
        assert diff <= limit, f"{name}: {path.name}: max |logit diff| {diff:.2e} > {limit}"
        assert int(have.argmax()) == int(want.argmax()), \
            f"{name}: {path.name}: top-1 {have.argmax()} != {want.argmax()}"
        diffs[path.name] = diff
    return diffs


# ---------------------------------------------------------------- tests

def test_the_contract_is_torchvision_eval_transform_on_pil_images(images):
    """Resize(int, bilinear, antialias) + CenterCrop of torchvision.transforms.v2 on a PIL image gives the
    contract's pixels exactly (it calls the same Pillow resize, the same size and crop arithmetic)."""
    v2 = pytest.importorskip("torchvision.transforms.v2")
    transform = v2.Compose([v2.Resize(64, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                            v2.CenterCrop(56)])
    pre = SPECS["rgb-64-crop-56"]
    for path in images:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
        if image.mode.startswith("I"):
            continue  # torchvision has no 16-bit rule; the contract's >> 8 is checked against the runtime below
        out = np.asarray(transform(image.convert("RGB")))
        np.testing.assert_array_equal(out, reference_pixels(path, pre), err_msg=path.name)


def test_edgekd_eval_path_gives_the_reference_inputs(images):
    """edgekd's own eval/export path (edgekd.data.images.EvalTransform, then the data bundle's normalization in
    torch) gives the reference's pixels exactly and its inputs within float32 rounding."""
    data_images = pytest.importorskip("edgekd.data.images", reason="edgekd's image-file data path is not here")
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from edgekd.data.bundle import DataBundle

    for name, pre in SPECS.items():
        transform = data_images.EvalTransform(color=pre["color"], height=56, width=56, resize=pre["resize"],
                                              crop=tuple(pre["crop"]) if pre["crop"] else None)
        for path in images:
            pixels = transform.load(path)  # uint8 (C, H, W)
            np.testing.assert_array_equal(pixels, reference_pixels(path, pre).transpose(2, 0, 1),
                                          err_msg=f"{name}: {path.name}")
            meta = SimpleNamespace(meta=SimpleNamespace(mean=pre["mean"], std=pre["std"]))
            inputs = DataBundle.normalize(meta, torch.from_numpy(pixels[None].copy())).numpy()
            assert float(np.abs(inputs - reference_input(path, pre)).max()) <= 1e-5, (name, path.name)


@pytest.mark.parametrize("name", list(SPECS))
def test_runtime_preprocess_equals_the_reference_bit_for_bit(images, name):
    pre = load_preprocess(SPECS[name])
    for path in images:
        got = image_to_input(path, pre)
        assert got.shape == (1, pre["channels"], 56, 56) and got.dtype == np.float32
        np.testing.assert_array_equal(got, reference_input(path, SPECS[name]), err_msg=path.name)


def test_runtime_reads_the_earlier_preprocess_json_as_a_squash_to_the_model_size(images):
    legacy = {"layout": "NCHW", "channels": 3, "height": 56, "width": 56, "scale": 1 / 255, "mean": MEAN_RGB,
              "std": STD_RGB, "formula": "input = (pixel * scale - mean[c]) / std[c]", "input_name": "input",
              "output_name": "logits"}
    pre = load_preprocess(legacy)
    assert pre["resize"] is None and pre["crop"] is None and pre["color"] == "RGB"
    np.testing.assert_array_equal(image_to_input(images[0], pre), reference_input(images[0], SPECS["rgb-squash-56"]))


@pytest.mark.parametrize("bad, message", [
    ({"format": "edgekd-preprocess/9"}, "format 'edgekd-preprocess/9' is not supported"),
    ({"crop": [60, 60]}, "crop [60, 60] differs from the model input"),
    ({"resize": 50}, "crop [56, 56] is larger than resize 50"),
    ({"color": "L"}, "color 'L' with channels 3 is not supported"),
    ({"interpolation": "nearest"}, "only interpolation 'bilinear'"),
    ({"mean": [0.5]}, "mean and std need 3 values each"),
])
def test_bad_preprocess_records_are_refused_in_one_line(bad, message):
    with pytest.raises(RuntimeInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_preprocess({**SPECS["rgb-64-crop-56"], **bad})


def test_runtime_without_pillow_says_what_to_install(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import ...` raises ImportError
    with pytest.raises(RuntimeInputError, match=r"^reading image files needs Pillow \(.*\): pip install pillow$"):
        image_to_input(images[0], SPECS["rgb-64-crop-56"])


def test_runtime_refuses_a_file_that_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(RuntimeInputError, match="notes.png: not a readable image"):
        image_to_input(tmp_path / "notes.png", SPECS["rgb-64-crop-56"])


@pytest.mark.parametrize("name", list(SPECS))
def test_run_on_device_images_matches_the_reference(images, bundles, name, tmp_path):
    bundle = bundles[name]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle's own runtime copy
    out = tmp_path / "logits.json"
    proc = subprocess.run([sys.executable, str(bundle / "run_on_device.py"), "--images", *map(str, images),
                           "--top", "3", "--logits-out", str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    expected = reference_logits(bundle, images)
    assert [r["file"] for r in rows] == [str(f) for f in images]
    assert [r["label"] for r in rows] == [LABELS[i] for i in expected.argmax(1)]
    assert_parity("run_on_device.py", images, expected, np.array([r["logits"] for r in rows]))
    assert proc.stdout.count("%") == 3 * len(images) and f"wrote {out}" in proc.stdout


def test_run_on_device_images_reads_the_contract_from_onnx_metadata(images, bundles, tmp_path):
    """Without preprocess.json and labels.json the runner takes both from the model's metadata."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes((bundles["grey-64-crop-56"] / "model.onnx").read_bytes())
    runtime_bundle.install_device_runner(bundle)
    out = tmp_path / "logits.json"
    proc = subprocess.run([sys.executable, str(bundle / "run_on_device.py"), "--images", *map(str, images[:3]),
                           "--logits-out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = reference_logits(bundles["grey-64-crop-56"], images[:3])
    got = np.array([r["logits"] for r in json.loads(out.read_text())])
    assert_parity("run_on_device.py (metadata)", images[:3], expected, got)


@pytest.mark.parametrize("override, message", [
    ({"format": "edgekd-preprocess/9"}, "format 'edgekd-preprocess/9' is not supported (this runtime reads "
                                        "edgekd-preprocess/2)"),
    ({"resize": 40}, "crop [56, 56] is larger than resize 40 (images are never padded)"),
    ({"std": [0.2, 0.0, 0.2]}, "mean and std need 3 values each, std > 0"),
])
def test_run_on_device_images_bad_preprocess_json_exits_2_in_one_line(images, bundles, tmp_path, override, message):
    (tmp_path / "pre.json").write_text(json.dumps({**SPECS["rgb-64-crop-56"], **override}))
    proc = subprocess.run([sys.executable, str(bundles["rgb-64-crop-56"] / "run_on_device.py"), "--images",
                           str(images[0]), "--preprocess", str(tmp_path / "pre.json")],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'pre.json'}: ")
    assert message in lines[0]


def test_run_on_device_images_bad_file_exits_2_naming_it(bundles, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    proc = subprocess.run([sys.executable, str(bundles["rgb-64-crop-56"] / "run_on_device.py"), "--images",
                           str(tmp_path / "broken.jpg")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'broken.jpg'}: not a readable image (cannot identify image file "
        f"'{tmp_path / 'broken.jpg'}')"]


# ---- JavaScript (Node, onnxruntime-node)

def run_node(node_modules: Path, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    command = ["node", "-e", script, "--", *args] if script else ["node", str(JS_DIR / "classify.js"), *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("name", list(SPECS))
def test_js_classify_images_matches_the_reference(images, bundles, name, node_modules):
    bundle = bundles[name]
    out = json.loads(run_node(node_modules, str(bundle), *map(str, images), "--json", "--logits", "--top", "2").stdout)
    expected = reference_logits(bundle, images)
    diffs = assert_parity("classify.js", images, expected, np.array([r["logits"] for r in out]))
    assert all(d == 0.0 for f, d in diffs.items() if f.endswith(".png")), diffs  # same pixels: same logits
    assert [r["top"][0]["label"] for r in out] == [LABELS[i] for i in expected.argmax(1)]


RESIZE_SCRIPT = """
const { resizeBilinear } = require(process.argv[1]);
const fs = require('fs');
const cases = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = cases.map((c) => {
  const data = new Uint8Array(fs.readFileSync(c.file));
  const out = resizeBilinear({ width: c.w, height: c.h, channels: c.c, data }, c.ow, c.oh);
  return Buffer.from(out.data).toString('base64');
});
console.log(JSON.stringify(out));
"""

# (w, h, channels, new w, new h): down, up, one axis only, mixed, and Pillow 13's vertical-first order (the height
# shrinks by more than twice as many pixels as the width: 50x70 -> 56x56, 100x100 -> 61x20; 60x20 is the tie).
RESIZE_CASES = [(300, 200, 3, 64, 42), (199, 333, 1, 56, 93), (1000, 40, 3, 1600, 64), (20, 13, 3, 98, 64),
                (64, 64, 1, 64, 64), (57, 91, 3, 57, 30), (640, 480, 3, 224, 224), (7, 5, 1, 3, 11),
                (50, 70, 3, 56, 56), (100, 100, 1, 61, 20), (100, 100, 3, 60, 20), (33, 82, 3, 29, 11)]
# Pillow < 13 always resizes horizontally first: one level off on some pixels in the vertical-first cases.
PILLOW_LEVELS = 0 if int(Image.__version__.split(".")[0]) >= 13 else 1


def test_js_resize_equals_pillow_bilinear_exactly(tmp_path, node_modules):
    rng = np.random.default_rng(11)
    cases, expected = [], []
    for i, (w, h, c, ow, oh) in enumerate(RESIZE_CASES):
        pixels = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        (tmp_path / f"{i}.u8").write_bytes(pixels.tobytes())
        cases.append({"file": str(tmp_path / f"{i}.u8"), "w": w, "h": h, "c": c, "ow": ow, "oh": oh})
        image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
        expected.append(np.asarray(image.resize((ow, oh), Image.BILINEAR) if (ow, oh) != (w, h) else image))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = json.loads(run_node(node_modules, str(JS_DIR / "preprocess.js"), str(tmp_path / "cases.json"),
                              script=RESIZE_SCRIPT).stdout)
    for case, want, got in zip(cases, expected, out):
        have = np.frombuffer(base64.b64decode(got), np.uint8).reshape(want.shape)
        assert int(np.abs(have.astype(int) - want).max()) <= PILLOW_LEVELS, case


# ---- the browser (headless Chromium, preprocess.js with the browser's own decoders)

BROWSER = next((found for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                if (found := shutil.which(name))), None)


def browser_eval(expression: str, tmp_path: Path, timeout: float = 120) -> Any:
    """Await `expression` in a fresh headless Chromium tab; DevTools protocol over --remote-debugging-pipe
    (the browser reads commands on fd 3 and answers on fd 4, NUL-separated JSON): no port, no extra package."""
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def child_fds() -> None:
        read, write = os.dup(to_browser_r), os.dup(from_browser_w)  # above 4: the dup2s cannot clobber them
        os.dup2(read, 3)
        os.dup2(write, 4)

    proc = subprocess.Popen([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-pipe", f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            preexec_fn=child_fds, pass_fds=(3, 4, to_browser_r, from_browser_w),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HOME": str(tmp_path)})
    os.close(to_browser_r)
    os.close(from_browser_w)
    pending = b""

    def call(ident: int, method: str, params: dict, session: str | None = None) -> dict:
        nonlocal pending
        message = {"id": ident, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(to_browser_w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in pending:
                ready, _, _ = select.select([from_browser_r], [], [], timeout)
                chunk = os.read(from_browser_r, 1 << 20) if ready else b""
                assert chunk, f"{BROWSER} closed the DevTools pipe or timed out ({method})"
                pending += chunk
            raw, pending = pending.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == ident:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    try:
        target = call(1, "Target.createTarget", {"url": "about:blank"})["targetId"]
        session = call(2, "Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        result = call(3, "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                      session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]
    finally:
        os.close(to_browser_w)  # the browser exits when its pipe closes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(from_browser_r)


@pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_browser_decoding_and_preprocess_js_equal_pillow(images, tmp_path):
    """The browser's decoders (Chromium: libjpeg-turbo, libpng, EXIF orientation) + preprocess.js give Pillow's
    pixels exactly; only semi-transparent pixels may be off (a canvas stores premultiplied alpha): measured 2."""
    identity = {**SPECS["rgb-64-crop-56"], "scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    mime = {".png": "image/png", ".jpg": "image/jpeg"}
    urls = {f.name: f"data:{mime[f.suffix]};base64,{base64.b64encode(f.read_bytes()).decode()}" for f in images}
    script = (JS_DIR / "preprocess.js").read_text() + f"""
;(async () => {{
  const pre = edgekdPreprocess.loadPreprocess({json.dumps(identity)});
  const out = {{}};
  for (const [name, url] of Object.entries({json.dumps(urls)})) {{
    const blob = await (await fetch(url)).blob();
    out[name] = Array.from(edgekdPreprocess.decodedToInput(await edgekdPreprocess.decodeInBrowser(blob), pre));
  }}
  return out;
}})()"""
    result = browser_eval(script, tmp_path)
    for path in images:
        got = np.array(result[path.name]).reshape(3, 56, 56).transpose(1, 2, 0)
        levels = int(np.abs(got - reference_pixels(path, identity)).max())
        assert levels <= (3 if "rgba" in path.name else PILLOW_LEVELS), (path.name, levels)


# ---- C++ (ONNX Runtime C/C++ API, libjpeg + libpng)

@pytest.fixture(scope="module")
def cpp_images(cpp_binary, bundles, images) -> Path:
    probe = subprocess.run([str(cpp_binary), str(bundles["rgb-64-crop-56"]), "--images", str(images[0])],
                           capture_output=True, text=True, timeout=120)
    if "no image decoders" in probe.stderr:
        pytest.skip("edgekd_classify was built without libjpeg/libpng (apt-get install libjpeg-dev libpng-dev)")
    assert probe.returncode == 0, probe.stderr
    return cpp_binary


def run_cpp_logits(binary: Path, bundle: Path, images: list[Path], *extra: str) -> np.ndarray:
    proc = subprocess.run([str(binary), str(bundle), "--images", *map(str, images), "--logits", *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(":", 1)[1].split() for line in proc.stdout.splitlines() if line.startswith("logits ")]
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("name", list(SPECS))
def test_cpp_classify_images_matches_the_reference(images, bundles, name, cpp_images):
    bundle = bundles[name]
    expected = reference_logits(bundle, images)
    diffs = assert_parity("edgekd_classify", images, expected, run_cpp_logits(cpp_images, bundle, images))
    assert max(diffs.values()) <= 1e-5, diffs  # libpng/libjpeg-turbo decode as Pillow does: same inputs


def test_cpp_preprocessed_pixels_equal_pillow_exactly(tmp_path, cpp_images, images):
    """scale 1, mean 0, std 1: the dumped model input is the resized, cropped pixels themselves."""
    rng = np.random.default_rng(12)
    identity = {**SPECS["rgb-64-crop-56"], "scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    files = list(images)
    for i, (w, h, c, *_rest) in enumerate(RESIZE_CASES):
        pixels = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(tmp_path / f"noise{i}.png")
        files.append(tmp_path / f"noise{i}.png")
    for name, pre in (("crop", identity), ("squash", {**identity, "resize": None, "crop": None})):
        bundle = make_bundle(tmp_path / name, pre, seed=0)
        dump = tmp_path / f"{name}.f32"
        run_cpp_logits(cpp_images, bundle, files, "--dump-input", str(dump))
        got = np.fromfile(dump, np.float32).reshape(len(files), 3, 56, 56).transpose(0, 2, 3, 1)
        for path, have in zip(files, got):
            assert int(np.abs(have - reference_pixels(path, pre)).max()) <= PILLOW_LEVELS, (name, path.name)


def test_cpp_refuses_a_file_that_is_not_an_image(tmp_path, cpp_images, bundles):
    (tmp_path / "notes.txt").write_text("hello")
    proc = subprocess.run([str(cpp_images), str(bundles["rgb-64-crop-56"]), "--images", str(tmp_path / "notes.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {tmp_path / 'notes.txt'}: not a JPEG or PNG file"
