"""pycocotools is needed only where COCO files are read or evaluated: with it made unimportable, the model builds and
tools/benchmark.py, tools/infer.py and tools/export_onnx.py run; reading a COCO file names the missing package."""
import importlib.util
import json
import subprocess
import sys

from model_helpers import ROOT

ONNX_INSTALLED = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))

FLAGS = ["--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels", "2",
         "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "32",
         "--num_queries_one2one", "5", "--num_queries_one2many", "5", "--val_scale", "64", "--max_size", "96",
         "--num_classes", "7"]

SCRIPT = """
import importlib.abc, importlib.util, json, runpy, sys
from pathlib import Path


class BlockPycocotools(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pycocotools":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, BlockPycocotools())
sys.path.insert(0, ".")
out, flags, coco = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
done = []

import main  # noqa: E402  (engine, datasets, models)
from datasets.synthetic import make_synthetic_coco  # noqa: E402
from models import build_model  # noqa: E402
from util.checkpoint import save_checkpoint  # noqa: E402

args = main.get_args_parser().parse_args(flags + ["--coco_path", coco])
model, criterion, postprocessors = build_model(args)
save_checkpoint({"model": model.state_dict(), "args": args}, out / "model.pth")
done.append("build_model")

runpy.run_path("tools/benchmark.py")["main"](["--image_size", "64", "80", "--num_iters", "2", "--warm_iters", "1",
                                               *flags])
done.append("benchmark")

image = out / "photo.jpg"
make_synthetic_coco(out / "images", 0, 1, image_size=64, seed=0)
next((out / "images" / "val2017").iterdir()).rename(image)
assert runpy.run_path("tools/infer.py")["main"](["--resume", str(out / "model.pth"), "--images", str(image),
                                                 "--out", str(out / "detections"), "--coco_path", coco]) == 0
done.append("infer")

if all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
    assert runpy.run_path("tools/export_onnx.py")["main"](["--resume", str(out / "model.pth"), "--out",
                                                           str(out / "model.onnx"), "--example_size", "400",
                                                           "400", "--no_check"]) == 0
    assert (out / "model.onnx").stat().st_size > 1000
    done.append("export_onnx")

from datasets.coco import load_coco_api  # noqa: E402

try:
    load_coco_api(Path(coco) / "annotations" / "instances_val2017.json")
except ImportError as error:
    done.append(f"load_coco_api: {error}")
print(json.dumps({"done": done, "imported": sorted(m for m in sys.modules if m.split(".")[0] == "pycocotools")}))
"""


def test_model_and_tools_work_without_pycocotools(tmp_path):
    from datasets.synthetic import make_synthetic_coco

    make_synthetic_coco(tmp_path / "coco", 0, 2, image_size=64, seed=1)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(FLAGS), str(tmp_path / "coco")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    expected = ["build_model", "benchmark", "infer"] + (["export_onnx"] if ONNX_INSTALLED else [])
    assert report["done"] == expected + ["load_coco_api: reading and evaluating COCO annotation files needs "
                                         "pycocotools: pip install pycocotools"]
    detections = json.loads((tmp_path / "detections" / "detections.json").read_text())
    assert len(detections) == 1 and detections[0]["width"] > 0


def test_importing_the_project_imports_no_pycocotools():
    """pycocotools installed: still not imported by importing the datasets, the evaluator, engine or main."""
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import datasets.coco, "
                             "datasets.coco_eval, engine, main; "
                             "print([m for m in sys.modules if m.startswith('pycocotools')])"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
