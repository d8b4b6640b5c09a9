"""ONNX export (tools/export_onnx.py, models.onnx_export) and inference with onnxruntime (tools/infer.py --onnx):
the graph's inputs, outputs and metadata, onnxruntime against PyTorch on images of several sizes and a padded
batch, detections equal to the checkpoint's, no torch in the runtime path, bad inputs."""
import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from model_helpers import ROOT, SMALL, TINY_VIT, TWO_STAGE_HYBRID, build, perturb, register_tiny_vit
from PIL import Image

from datasets.synthetic import make_synthetic_coco
from models.onnx_export import check_export, export_onnx
from util.checkpoint import save_checkpoint
from util.onnx_runtime import OnnxDetector

for _package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_package, reason=f"the ONNX tests need {_package}: pip install onnx onnxscript onnxruntime")
import onnx  # noqa: E402

EXPORT = runpy.run_path(str(ROOT / "tools" / "export_onnx.py"))
INFER = runpy.run_path(str(ROOT / "tools" / "infer.py"))
BASE = SMALL + ["--no_pretrained_backbone", "--num_feature_levels", "2", "--val_scale", "72", "--max_size", "128",
                "--topk", "20"]
FLAGS = BASE + TWO_STAGE_HYBRID + ["--backbone", "resnet18"]
SIZES = [(72, 108), (90, 54), (64, 64)]  # (h, w): landscape, portrait, square


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint of the small two-stage hybrid model (mixed selection) on a synthetic COCO dataset, with a weight
    average (--model_ema), exported at opset 18 with the post-processing by the tool (which checks the file). Returns
    (folder, the average's model, postprocess, the model of the checkpoint's "model" weights)."""
    root = tmp_path_factory.mktemp("onnx")
    make_synthetic_coco(root / "coco", 0, 3, image_size=96, seed=2)
    flags = FLAGS + ["--coco_path", str(root / "coco"), "--num_classes", "7"]
    model, _, post, args = build(flags, seed=1)
    trained = build(flags, seed=6)[0]
    perturb(model), perturb(trained, seed=1)  # the zero-initialised heads take part
    save_checkpoint({"model": trained.state_dict(), "model_ema": model.state_dict(), "args": args},
                    root / "checkpoint.pth")
    code = EXPORT["main"](["--resume", str(root / "checkpoint.pth"), "--out", str(root / "model.onnx"),
                           "--with_postprocess", "--opset", "18"])
    assert code == 0
    return root, model.eval(), post["bbox"], trained.eval()


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_inputs_outputs_and_metadata(exported):
    root = exported[0]
    proto = onnx.load(str(root / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18  # --opset 18
    assert {v.name: dims(v) for v in proto.graph.input} == {
        "images": ["batch", 3, "height", "width"], "mask": ["batch", "height", "width"], "orig_sizes": ["batch", 2]}
    assert {v.name: dims(v) for v in proto.graph.output} == {
        "pred_logits": ["batch", 10, 7], "pred_boxes": ["batch", 10, 4], "scores": ["batch", 20],
        "labels": ["batch", 20], "boxes": ["batch", 20, 4]}
    # standard operators only (no compiled op); deformable attention samples with GridSample
    ops = {node.op_type for node in proto.graph.node}
    assert {node.domain for node in proto.graph.node} <= {""} and "GridSample" in ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["hdetr.val_scale"], meta["hdetr.max_size"], meta["hdetr.topk"]) == ("72", "128", "20")
    names = json.loads((root / "coco" / "annotations" / "instances_val2017.json").read_text())["categories"]
    assert json.loads(meta["hdetr.category_names"]) == {str(c["id"]): c["name"] for c in names}


def test_onnxruntime_matches_pytorch_on_three_sizes_and_a_padded_batch(exported):
    root, model, post, _ = exported
    report = check_export(model, root / "model.onnx", SIZES, post, seed=3)
    assert [shapes for shapes, _, _ in report] == [[s] for s in SIZES] + [SIZES[:2]]
    assert all(logits <= 1e-4 and boxes <= 1e-4 for _, logits, boxes in report), report

    # the post-processed outputs too, for a batch of two images of different original sizes
    detector = OnnxDetector(root / "model.onnx")
    gen = torch.Generator().manual_seed(4)
    from util.misc import nested_tensor_from_tensor_list
    samples = nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=gen) for h, w in SIZES[:2]])
    orig_sizes = torch.tensor([[480, 640], [300, 200]])
    got = detector.run(samples.tensors.numpy(), samples.mask.numpy(), orig_sizes.numpy())
    with torch.no_grad():
        expected = post(model(samples), orig_sizes)
    for i, want in enumerate(expected):
        np.testing.assert_allclose(got["scores"][i], want["scores"].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["labels"][i], want["labels"].numpy())
        np.testing.assert_allclose(got["boxes"][i], want["boxes"].numpy(), rtol=0, atol=1e-2)  # pixels


def test_the_weight_average_is_exported_and_the_check_fails_on_other_weights(exported):
    """The file computes the checkpoint's weight average (model_ema), not its "model" weights: the check fails
    on those."""
    root, _, post, trained = exported
    with pytest.raises(RuntimeError, match="differs from PyTorch|other two-stage proposals"):
        check_export(trained, root / "model.onnx", SIZES, post)


def same_detections(a, b):
    """Every detection of a has one in b with the same label, a score within 2e-4 and a box within 0.2 px (rounded
    values; detections of near-equal scores may come in either order)."""
    assert len(a) == len(b)
    for det in a:
        assert any(d["label"] == det["label"] and d.get("name") == det.get("name")
                   and abs(d["score"] - det["score"]) <= 2e-4
                   and max(abs(x - y) for x, y in zip(d["box"], det["box"])) <= 0.2 for d in b), det


def test_infer_onnx_equals_infer_checkpoint_without_torch(exported, tmp_path):
    root = exported[0]
    images = root / "coco" / "val2017"
    assert INFER["main"](["--resume", str(root / "checkpoint.pth"), "--images", str(images), "--out",
                          str(tmp_path / "torch"), "--threshold", "0"]) == 0
    # the ONNX run in a fresh interpreter in which torch cannot be imported
    argv = ["tools/infer.py", "--onnx", str(root / "model.onnx"), "--images", str(images), "--out",
            str(tmp_path / "onnx"), "--threshold", "0"]
    script = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = {argv!r}; "
              "runpy.run_path('tools/infer.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    by_torch = json.loads((tmp_path / "torch" / "detections.json").read_text())
    by_onnx = json.loads((tmp_path / "onnx" / "detections.json").read_text())
    assert [(r["file"], r["width"], r["height"]) for r in by_onnx] == [
        (r["file"], r["width"], r["height"]) for r in by_torch]
    named = {1, 2, 3, 4, 5, 6}  # the synthetic categories; label 0 has no name
    assert all(len(r["detections"]) == 20 and all(("name" in d) == (d["label"] in named) for d in r["detections"])
               for r in by_onnx)
    for a, b in zip(by_torch, by_onnx):
        same_detections(a["detections"], b["detections"])
    drawings = sorted(p.name for p in (tmp_path / "torch").glob("*_detections.jpg"))
    assert len(drawings) == 3 and drawings == sorted(p.name for p in (tmp_path / "onnx").glob("*_detections.jpg"))
    for name in drawings:
        a, b = (np.asarray(Image.open(tmp_path / run / name), dtype=np.float32) for run in ("torch", "onnx"))
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5  # the same boxes and labels drawn


@pytest.mark.parametrize("flags", [
    ["--backbone", "resnet18"],  # one-stage, no box refinement
    ["--backbone", "swin_tiny", "--with_box_refine", "--two_stage", "--use_checkpoint"],  # checkpointing off
    ["--backbone", TINY_VIT, "--with_box_refine", "--use_checkpoint", "--num_feature_levels", "3"],
], ids=["r18-one-stage", "swin-two-stage", "vit-box-refine"])
def test_other_architectures_export(flags, tmp_path, monkeypatch):
    register_tiny_vit(monkeypatch)
    model, _, _, _ = build(BASE + flags, seed=2)
    perturb(model).eval()
    # traced at multiples of 32: the ViT's batch padding and position resizing must still follow other sizes
    proto = export_onnx(model, tmp_path / "model.onnx", example_size=(512, 640))
    assert [v.name for v in proto.graph.output] == ["pred_logits", "pred_boxes"]
    report = check_export(model, tmp_path / "model.onnx", SIZES + [(96, 128)])
    assert len(report) == 5 and all(max(diffs) <= 1e-4 for _, *diffs in report), report


def test_bad_inputs(exported, tmp_path):
    root = exported[0]
    out = ["--out", str(tmp_path / "m.onnx")]
    with pytest.raises(ValueError, match="--resume"):
        EXPORT["main"](out)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        EXPORT["main"](out + ["--resume", str(tmp_path / "missing.pth")])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="is not a PyTorch checkpoint"):
        EXPORT["main"](out + ["--resume", str(tmp_path / "junk.pth")])
    with pytest.raises(ValueError, match="--example_size must be at least 400"):
        EXPORT["main"](out + ["--resume", str(root / "checkpoint.pth"), "--example_size", "72", "96"])

    images = ["--images", str(root / "coco" / "val2017"), "--out", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        INFER["main"](images + ["--onnx", str(tmp_path / "nothing.onnx")])
    with pytest.raises(ValueError, match="main.py flags do not apply"):
        INFER["main"](images + ["--onnx", str(root / "model.onnx"), "--device", "cpu"])
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="cannot load ONNX model"):
        INFER["main"](images + ["--onnx", str(tmp_path / "broken.onnx")])
    other = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="not a detector exported by tools/export_onnx.py"):
        INFER["main"](images + ["--onnx", str(tmp_path / "other.onnx")])


class PoolingDetector(torch.nn.Module):
    """The smallest model ExportableDetector takes: the mean colour of the unpadded pixels, as one query."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, samples, one2one_only):
        weights = (~samples.mask).float()
        pooled = (samples.tensors * weights[:, None]).sum((2, 3)) / weights.sum((1, 2))[:, None]
        out = self.proj(pooled)[:, None]
        return {"pred_logits": out, "pred_boxes": out.sigmoid()}


@pytest.mark.filterwarnings("ignore:# The axis name")  # torch.onnx naming the small model's shared axes once
def test_opsets_outside_the_written_range_are_refused(tmp_path, monkeypatch):
    """torch.onnx writes opset 18 when asked for a lower one (its down-conversion fails on this model) or for one
    newer than onnx defines: the tool refuses both first thing, and export_onnx saves no file of another opset."""
    import models.onnx_export as onnx_export

    newest = onnx.defs.onnx_opset_version()
    out = tmp_path / "m.onnx"
    for opset in (17, newest + 1):
        with pytest.raises(ValueError, match=rf"^--opset {opset}: the export writes opsets 18 \(torch.onnx's "
                                             rf"lowest\) to {newest} \(the newest"):  # before the checkpoint is read
            EXPORT["main"](["--out", str(out), "--resume", str(tmp_path / "missing.pth"), "--opset", str(opset)])
    monkeypatch.setattr(onnx_export, "supported_opsets", lambda: range(1, newest + 2))
    with pytest.raises(RuntimeError, match=f"torch.onnx wrote opset 18 instead of the requested {newest + 1}"):
        export_onnx(PoolingDetector(), out, example_size=(400, 400), opset=newest + 1)
    assert not out.exists()


def test_an_unusable_out_or_tta_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    for argv, message in (
            (["--out", str(tmp_path)], f"--out {tmp_path} is a directory, not a file to write"),
            (["--out", str(tmp_path / "file" / "m.onnx")],
             f"--out {tmp_path / 'file' / 'm.onnx'}: {tmp_path / 'file'} is not a directory"),
            (["--out", str(tmp_path / "m.onnx"), "--tta", "--tta_flip"],
             "--tta, --tta_flip: the export writes the single-scale evaluation graph; the multi-scale test runs in "
             "PyTorch (main.py --eval --tta, tools/infer.py --tta)"),
            (["--out", str(tmp_path / "m.onnx"), "--tta_max_dets", "5"],  # it was ignored
             "--tta_max_dets: the export writes the single-scale evaluation graph; the multi-scale test runs in "
             "PyTorch (main.py --eval --tta, tools/infer.py --tta)")):
        monkeypatch.setattr(sys, "argv", ["tools/export_onnx.py", *argv, "--resume", str(tmp_path / "missing.pth")])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "tools" / "export_onnx.py"), run_name="__main__")
        assert info.value.code == f"export_onnx: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_command_line_errors_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["tools/export_onnx.py", "--out", str(tmp_path / "m.onnx"), "--resume",
                                      str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "tools" / "export_onnx.py"), run_name="__main__")
    assert str(info.value.code).startswith("export_onnx: ") and "missing.pth" in str(info.value.code)


def test_benchmark_times_eager_and_onnxruntime(exported, capsys):
    root = exported[0]
    bench = runpy.run_path(str(ROOT / "tools" / "benchmark_onnx.py"))
    code = bench["main"](["--resume", str(root / "checkpoint.pth"), "--onnx", str(root / "model.onnx"),
                          "--image_size", "72", "96", "--num_iters", "3", "--warm_iters", "1", "--threads", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "one 72x96 image, 1 threads, median of 2 runs after 1 warm-up" in out
    times = [float(line.rsplit(": ", 1)[1].rstrip(" s")) for line in out.splitlines() if line.startswith("  ")]
    assert len(times) == 2 and all(t > 0 for t in times) and "onnxruntime CPU" in out
    with pytest.raises(ValueError, match="--warm_iters"):
        bench["main"](["--resume", str(root / "checkpoint.pth"), "--onnx", str(root / "model.onnx"),
                       "--num_iters", "2", "--warm_iters", "2"])
    for precision in (["--amp", "bf16"], ["--use_fp16"]):  # timed in float32 whatever was asked, before
        with pytest.raises(ValueError, match="--amp (bf16|fp16): the ONNX graph and the PyTorch model it is timed "
                                             "against run in float32 here"):
            bench["main"](["--resume", str(root / "checkpoint.pth"), "--onnx", str(root / "model.onnx"), *precision])
