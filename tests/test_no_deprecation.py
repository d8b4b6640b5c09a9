"""No deprecation or future warnings (and no torch/torchvision warnings) from importing and running the model."""
import json
import os
import subprocess
import sys

import torch
from model_helpers import ROOT

# run in a fresh interpreter with -W error::DeprecationWarning -W error::FutureWarning so that import-time
# warnings fail too; warnings while building and running are recorded and reported as JSON
SCRIPT = r'''
import importlib, json, pkgutil, sys, warnings
sys.path[:0] = [".", "tests"]
import torch
import engine, main, models, util
for package in (models, util):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.rsplit(".", 1)[-1] not in ("setup", "test"):  # scripts, not modules
            importlib.import_module(info.name)
import model_helpers as H

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runs = [(H.SMALL + H.TWO_STAGE_HYBRID + ["--backbone", "resnet18"], [(64, 96), (64, 64)]),
            (H.SMALL + ["--backbone", "swin_tiny", "--with_box_refine"], [(64, 64), (64, 96)]),
            (H.SMALL + H.TWO_STAGE_HYBRID + ["--backbone", H.TINY_VIT, "--use_checkpoint"], [(70, 90), (64, 64)])]
    H.register_tiny_vit()
    for flags, sizes in runs:
        model, criterion, post, args = H.build(flags)
        model.train()
        out = model(H.images(sizes))
        _, total = H.hybrid_total(out, H.targets([2, 1]), criterion, args)
        total.backward()
        model.eval()
        model.num_queries = model.num_queries_one2one
        model.transformer.two_stage_num_proposals = model.num_queries
        with torch.no_grad():
            post["bbox"](model(H.images(sizes)), torch.tensor(sizes))
print(json.dumps([{"category": w.category.__name__, "file": w.filename, "line": w.lineno,
                   "message": str(w.message)[:300]} for w in caught]))
'''


def _ours_or_torch(filename):
    return any(part in filename for part in ("/torch/", "/torchvision/", str(ROOT)))


def test_no_warnings_from_import_build_and_training_step():
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this process
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
                             "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    caught = json.loads(result.stdout.strip().splitlines()[-1])
    deprecations = [w for w in caught if w["category"] in ("DeprecationWarning", "FutureWarning")]
    assert not deprecations, deprecations
    others = [w for w in caught if _ours_or_torch(w["file"])]
    assert not others, others
