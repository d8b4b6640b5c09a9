"""Parity with upstream H-Deformable-DETR: the reference check_parity.py on every fixture."""
import copy
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import engine
import main
import models.deformable_transformer
import models.ops.modules.ms_deform_attn
from models import build_model

from model_helpers import ROOT, reference_fixture_names


def _check_parity(reference_dir):
    """The reference module check_parity, imported from reference_dir."""
    if str(reference_dir) not in sys.path:
        sys.path.insert(0, str(reference_dir))
    return importlib.import_module("check_parity")


def _reference_model(check_parity, fx):
    """(model, criterion, args) set up exactly as check() sets them up, in train mode."""
    args = main.get_args_parser().parse_args(fx["argv"])
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    check_parity.fill_backbone(model)
    state = dict(fx["state_dict_without_body"])
    state.update({k: v for k, v in model.state_dict().items() if k.startswith(check_parity.FILLED_PREFIXES)})
    model.load_state_dict(state, strict=True)
    model.train()
    return model, criterion, args


def _model_encoder_scores(check_parity, fx):
    """Our encoder proposal scores [B, S] on the fixture, and the number of proposals selected in training."""
    model, _, _ = _reference_model(check_parity, fx)
    with torch.no_grad():
        out = model([im.clone() for im in fx["images"]])
    return out["enc_outputs"]["pred_logits"][..., 0], model.transformer.two_stage_num_proposals


def _train_step(check_parity, fx, monkeypatch, nudge=0.0):
    """Gradient norms per parameter and the final logits of check()'s training step, with every deformable
    sampling location shifted by `nudge` (normalised coordinates)."""
    original = models.ops.modules.ms_deform_attn.ms_deform_attn

    def shifted(value, shapes, start_index, locations, weights, im2col_step):
        return original(value, shapes, start_index, locations + nudge, weights, im2col_step)

    model, criterion, args = _reference_model(check_parity, fx)
    with monkeypatch.context() as patch:
        patch.setattr(models.ops.modules.ms_deform_attn, "ms_deform_attn", shifted)
        out = model([im.clone() for im in fx["images"]])
    tgts = copy.deepcopy(fx["targets"])
    if args.k_one2many > 0:
        losses = engine.train_hybrid(out, tgts, args.k_one2many, criterion, args.lambda_one2many)
    else:
        losses = criterion(out, tgts)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    norms = {n: (p.grad.norm().item() if p.grad is not None else 0.0) for n, p in model.named_parameters()}
    return norms, out["pred_logits"].detach()


def _assert_near_tie(model_scores, fixture_scores, k, tol=1e-5):
    """Positions (image, rank) where the top-k orders of the two score sets differ; they may differ only where
    the swapped proposals' scores are within tol of each other in both sets."""
    ours = torch.topk(model_scores, k, dim=1)[1]
    theirs = torch.topk(fixture_scores, k, dim=1)[1]
    differing = (ours != theirs).nonzero().tolist()
    for b, pos in differing:
        i, j = ours[b, pos], theirs[b, pos]
        for name, scores in (("model", model_scores), ("fixture", fixture_scores)):
            gap = (scores[b, i] - scores[b, j]).abs().item()
            assert gap <= tol, (f"image {b} rank {pos}: proposals {i.item()} and {j.item()} differ by {gap:.2e} "
                                f"in the {name} scores: not a near-tie")
    return differing


# check_parity.py itself converts loss tensors that require grad with float()
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")
@pytest.mark.parametrize("name", reference_fixture_names())
def test_fixture_parity(reference_dir, name, monkeypatch):
    """check_parity.check() finds no problem. For a two-stage fixture a failure is accepted only when (a) our
    top-k proposal order differs from the fixture's at near-ties alone (scores within 1e-5, which float
    rounding may swap) and (b) the check passes with the ranking pinned to the fixture's own scores, except
    for gradient norms shown to sit on a discontinuity (see _assert_ill_conditioned_gradients)."""
    check_parity = _check_parity(reference_dir)
    path = reference_dir / f"{name}.pt"
    problems = check_parity.check(str(path))
    if not problems:
        return
    fx = torch.load(path, weights_only=True)
    assert "enc_outputs.pred_logits" in fx["train_out"], f"{name}: {problems}"

    fixture_scores = fx["train_out"]["enc_outputs.pred_logits"][..., 0]
    model_scores, k = _model_encoder_scores(check_parity, fx)
    torch.testing.assert_close(model_scores, fixture_scores, rtol=0, atol=1e-4)
    differing = _assert_near_tie(model_scores, fixture_scores, k)
    print(f"{name}: {problems}; proposal order differs at near-ties (image, rank) {differing}")

    calls = []

    def pinned(scores, num):
        torch.testing.assert_close(scores, fixture_scores, rtol=0, atol=1e-4)
        calls.append(num)
        return torch.topk(fixture_scores, num, dim=1)[1]

    monkeypatch.setattr(models.deformable_transformer.DeformableTransformer, "select_proposals",
                        staticmethod(pinned))
    problems = check_parity.check(str(path))
    assert calls == [k, fx["eval_out"]["pred_logits"].shape[1]], "the pinned ranking was not used"
    if not problems:
        return
    _assert_ill_conditioned_gradients(check_parity, fx, problems, monkeypatch)


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


SAMPLING_OFFSETS = re.compile(r"transformer\.decoder\.layers\.\d+\.cross_attn\.sampling_offsets\.(weight|bias)")


def _assert_ill_conditioned_gradients(check_parity, fx, problems, monkeypatch):
    """What is left with the ranking pinned may only be gradient norms of the decoder's sampling offsets that
    sit on a discontinuity: at initialisation the two-stage reference boxes are pixel centres and the offsets a
    fixed pattern, so many sampling points fall exactly on pixel-grid lines, where the derivative of bilinear
    sampling jumps; an ulp decides the side. Shown by shifting every sampling location by +-3e-7: the outputs
    move by < 1e-5 but these gradient norms jump apart by more than the 1 % tolerance."""
    assert all("gradient norms differ" in p for p in problems), problems
    reference = {n: float(v) for n, v in fx["grad_norms"].items()}
    norms, logits = _train_step(check_parity, fx, monkeypatch)
    rel = {n: abs(g - reference.get(n, 0.0)) / max(reference.get(n, 0.0), 1e-4) for n, g in norms.items()}
    flagged = sorted(n for n, r in rel.items() if r > 1e-2)
    assert flagged, problems
    assert all(SAMPLING_OFFSETS.fullmatch(n) for n in flagged), f"unexpected gradient differences: {flagged}"
    assert all(rel[n] < 5e-2 for n in flagged), {n: rel[n] for n in flagged}
    plus, logits_plus = _train_step(check_parity, fx, monkeypatch, 3e-7)
    minus, logits_minus = _train_step(check_parity, fx, monkeypatch, -3e-7)
    for shifted in (logits_plus, logits_minus):
        assert ((shifted - logits).abs().max() / logits.abs().max()).item() < 1e-5
    jumps = {n: abs(plus[n] - minus[n]) / reference[n] for n in flagged}
    print("with the fixture's ranking, gradient norms off by", {n: f"{rel[n]:.2%}" for n in flagged},
          "; a +-3e-7 shift of the sampling locations moves them apart by", {n: f"{j:.2%}" for n, j in jumps.items()})
    assert all(j > 5e-3 for j in jumps.values()) and max(jumps.values()) > 1e-2, jumps


def test_parity_command(reference_dir):
    """The command of the issue: python ../shared/reference/check_parity.py one_stage_box_refine two_stage_baseline"""
    script = os.path.relpath(reference_dir / "check_parity.py", ROOT)
    names = ["one_stage_box_refine", "two_stage_baseline"]
    for name in names:
        if not (reference_dir / f"{name}.pt").is_file():
            pytest.skip(f"fixture {name} not found")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as this process
    result = subprocess.run([sys.executable, script, *names], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in names:
        assert f"PASS {name}" in result.stdout.splitlines(), result.stdout
    assert "upstream parity: 2 passed, 0 failed" in result.stdout
