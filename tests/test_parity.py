"""Parity with upstream H-Deformable-DETR: the reference check_parity.py on every fixture."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from model_helpers import ROOT, reference_fixture_names

import main
from models import build_model


def _check_parity(reference_dir):
    """The reference module check_parity, imported from reference_dir."""
    if str(reference_dir) not in sys.path:
        sys.path.insert(0, str(reference_dir))
    return importlib.import_module("check_parity")


# check_parity.py itself converts loss tensors that require grad with float()
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")
@pytest.mark.parametrize("name", reference_fixture_names())
def test_fixture_parity(reference_dir, name):
    """check_parity.check() finds no problem: outputs, every loss term, the weight dict, every gradient norm, the
    one-to-one evaluation outputs and the post-processed detections equal upstream's."""
    problems = _check_parity(reference_dir).check(str(reference_dir / f"{name}.pt"))
    assert not problems, f"{name}: {problems}"


@pytest.mark.parametrize("name", reference_fixture_names())
def test_initialisation_matches_upstream(reference_dir, name):
    """The fixtures hold upstream's freshly initialised weights (seed 0). Built under the same seed, every one of
    our tensors equals them bit for bit: the same initialisers, applied in the same order, drawing the same
    random numbers (which also keeps dropout and drop-path masks in step with upstream's after a seed)."""
    fx = torch.load(reference_dir / f"{name}.pt", weights_only=True)
    torch.manual_seed(0)
    model, _, _ = build_model(main.get_args_parser().parse_args(fx["argv"]))
    ours = model.state_dict()
    differing = [k for k, v in fx["state_dict_without_body"].items() if not torch.equal(ours[k], v)]
    assert not differing, f"{len(differing)} initial tensors differ from upstream's, e.g. {differing[:5]}"


def test_parity_command(reference_dir):
    """The command of the issue, `python ../shared/reference/check_parity.py`: PASS for every fixture."""
    names = [name for name in reference_fixture_names() if name is not None]
    if not names:
        pytest.skip("no parity fixtures found")
    script = os.path.relpath(reference_dir / "check_parity.py", ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this process
    result = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in names:
        assert f"PASS {name}" in result.stdout.splitlines(), result.stdout
    assert f"upstream parity: {len(names)} passed, 0 failed" in result.stdout
