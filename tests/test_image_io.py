"""The torch-free image path of the ONNX runtime (util.image_io, util.onnx_runtime) against the torch one, and its
imports: torch never, onnxruntime only when a model is run, with a clear error when it is missing. Images with a
corrupt EXIF block."""
import io
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from model_helpers import ROOT
from PIL import Image, features

from datasets.transforms import make_coco_transforms
from models.deformable_detr import PostProcess
from util.image_io import decode_image, eval_image_array, pad_batch
from util.misc import nested_tensor_from_tensor_list
from util.onnx_runtime import OnnxDetector, top_detections


def photo(width, height, seed=0):
    """An RGB image with smooth gradients and noise (resizing it exercises the interpolation)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    pixels = np.clip(pixels + rng.integers(-40, 40, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize("width, height, size, max_size", [
    (120, 90, 72, 128),    # landscape, upscaled
    (90, 160, 64, 100),    # portrait, longer side capped by max_size
    (96, 72, 72, 1333),    # already at size: no resize
    (641, 480, 800, 1333),  # upstream's evaluation resize
])
def test_numpy_preprocessing_equals_the_evaluation_transform(width, height, size, max_size):
    image = photo(width, height)
    expected, _ = make_coco_transforms("val", val_size=size, max_size=max_size)(image, {})
    got = eval_image_array(image, size, max_size)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected.numpy())  # the same operations in float32: bit for bit


def test_pad_batch_equals_nested_tensor():
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=gen) for h, w in [(20, 30), (25, 18), (7, 9)]]
    batch, mask = pad_batch([im.numpy() for im in images])
    expected = nested_tensor_from_tensor_list(images)
    np.testing.assert_array_equal(batch, expected.tensors.numpy())
    np.testing.assert_array_equal(mask, expected.mask.numpy())
    with pytest.raises(ValueError, match="no images"):
        pad_batch([])


@pytest.mark.parametrize("topk", [5, 100, 10_000])  # 10_000 > queries x classes: all of them
def test_numpy_postprocessing_equals_postprocess(topk):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 12, 7, generator=gen) * 3
    boxes = torch.rand(2, 12, 4, generator=gen) * 0.5 + 0.1
    sizes = torch.tensor([[480, 640], [300, 200]])
    expected = PostProcess(topk)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    scores, labels, xyxy = top_detections(logits.numpy(), boxes.numpy(), sizes.numpy(), topk)
    for i, want in enumerate(expected):
        np.testing.assert_allclose(scores[i], want["scores"].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(labels[i], want["labels"].numpy())
        np.testing.assert_allclose(xyxy[i], want["boxes"].numpy(), rtol=0, atol=1e-4)


def test_runtime_path_imports_no_torch():
    """util.image_io, util.onnx_runtime and tools/infer.py load with torch made unimportable."""
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.path.insert(0, '.'); "
              "import util.image_io, util.onnx_runtime; runpy.run_path('tools/infer.py'); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') and sys.modules[m]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"')) == []


def test_missing_onnxruntime_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="needs the onnxruntime package"):
        OnnxDetector(tmp_path / "model.onnx")


def test_missing_onnx_is_named(monkeypatch, tmp_path):
    from models.onnx_export import export_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="needs the onnx and onnxscript packages"):
        export_onnx(torch.nn.Identity(), tmp_path / "model.onnx")


def quarters(width=32, height=24):
    """Red, green, blue and black quarters: which way up it is shows after lossy compression."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2:] = (0, 255, 0)
    pixels[height // 2:, : width // 2] = (0, 0, 255)
    return Image.fromarray(pixels)


def with_exif(image, fmt, exif_bytes):
    buffer = io.BytesIO()
    options = {"JPEG": {"quality": 98, "subsampling": 0}, "WEBP": {"lossless": True}}[fmt]
    image.save(buffer, format=fmt, exif=exif_bytes, **options)
    return buffer.getvalue()


def orientation_6_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise
    exif[0x0110] = "Model"
    return exif.tobytes()  # b"Exif\0\0" + a TIFF header (b"MM\0*" or b"II*\0") + entries


@pytest.mark.parametrize("fmt", ["JPEG", pytest.param("WEBP", marks=pytest.mark.skipif(
    not features.check("webp"), reason="Pillow without WebP"))])
def test_an_unreadable_exif_block_leaves_the_image_as_stored_with_a_warning(fmt):
    """A TIFF header PIL rejects (SyntaxError inside PIL): the pixels are fine, the orientation unknown."""
    exif = orientation_6_exif()
    corrupt = exif[:6] + b"\xf8M" + exif[8:]
    stored = quarters()
    with pytest.warns(UserWarning, match=r"image /d/x\.img: cannot read its EXIF block \(SyntaxError: not a TIFF "
                                         r"file.*using it as stored") as caught:
        decoded = decode_image(with_exif(stored, fmt, corrupt), "/d/x.img")
    assert len([w for w in caught if "EXIF" in str(w.message)]) == 1
    assert decoded.size == (32, 24) and decoded.mode == "RGB"
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(stored, dtype=float)).mean() < 4


def test_the_orientation_applies_when_another_exif_entry_is_corrupt():
    """Model (an ASCII tag) relabelled SMaxSampleValue (a float tag): PIL reads the orientation but cannot write
    the block back (struct.error in ImageOps.exif_transpose); the orientation is applied, nothing is warned."""
    exif = orientation_6_exif()
    tag = exif.index(b"\x01\x10\x00\x02") if exif[6:8] == b"MM" else exif.index(b"\x10\x01\x02\x00")
    corrupt = exif[:tag] + (b"\x01\x55" if exif[6:8] == b"MM" else b"\x55\x01") + exif[tag + 2:]
    stored = quarters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="image ")
        decoded = decode_image(with_exif(stored, "JPEG", corrupt), "/d/x.jpg")
    displayed = stored.transpose(Image.Transpose.ROTATE_270)
    assert decoded.size == (24, 32)
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(displayed, dtype=float)).mean() < 4
