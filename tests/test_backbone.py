"""ImageNet weights of the backbone (offline error, local files) and which backbone parameters train."""
import urllib.error

import pytest
import torch
import torchvision
from model_helpers import SMALL, build, parse
from torchvision.models._api import WeightsEnum

from models.backbone import load_pretrained_backbone

R18 = SMALL + ["--backbone", "resnet18"]
R18_STEM = ("conv1.", "bn1.", "layer1.")


@pytest.fixture
def offline(monkeypatch):
    """Every way torchvision could download weights raises URLError, as on a machine without network."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)


def _resnet_file(tmp_path, name, seed=0):
    """A torchvision-format ImageNet state dict (classifier included) of random values, saved to a file."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, name)(weights=None).state_dict()
    with torch.no_grad():  # random BatchNorm statistics too, so a skipped buffer would be noticed
        for key, value in state.items():
            if value.is_floating_point() and value.dim() == 1:
                value.copy_(torch.rand(value.shape) + 0.5)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


def test_offline_imagenet_weights_give_a_clear_error(offline):
    model, _, _, _ = build(R18)
    with pytest.raises(RuntimeError) as info:
        load_pretrained_backbone(model, parse(R18))
    message = str(info.value)
    assert "--pretrained_backbone_path" in message and "--no_pretrained_backbone" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_local_resnet_file_is_loaded(tmp_path, offline):
    path, state = _resnet_file(tmp_path, "resnet18")
    flags = R18 + ["--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    load_pretrained_backbone(model, parse(flags))
    body = model.backbone[0].body.state_dict()
    compared = 0
    for key, value in body.items():
        assert torch.equal(value, state[key]), key
        compared += 1
    assert compared == len([k for k in state if not k.startswith("fc.") and "num_batches_tracked" not in k])


def test_resnet_file_of_another_depth_is_rejected(tmp_path, offline):
    """resnet18 weights lack resnet34's extra blocks: the error names the file and the missing keys."""
    path, _ = _resnet_file(tmp_path, "resnet18")
    flags = SMALL + ["--backbone", "resnet34", "--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    with pytest.raises(RuntimeError, match="does not fit --backbone resnet34") as info:
        load_pretrained_backbone(model, parse(flags))
    assert str(path) in str(info.value) and "layer1.2" in str(info.value)


def test_resnet_file_of_another_architecture_is_rejected(tmp_path, offline):
    """resnet18 (basic blocks) weights in a resnet50 (bottlenecks): shapes and keys differ."""
    path, _ = _resnet_file(tmp_path, "resnet18")
    flags = SMALL + ["--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    with pytest.raises(RuntimeError, match="does not fit"):
        load_pretrained_backbone(model, parse(flags))


def test_architecture_error_names_the_file_and_backbone(tmp_path, offline):
    path, _ = _resnet_file(tmp_path, "resnet18")
    flags = SMALL + ["--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    with pytest.raises(RuntimeError) as info:
        load_pretrained_backbone(model, parse(flags))
    assert str(path) in str(info.value) and "resnet50" in str(info.value)


def test_a_detector_checkpoint_as_resnet_weights_points_to_finetune(tmp_path, offline):
    """torch's own error for a file holding main.py's args suggested loading it with weights_only=False."""
    import argparse
    model, _, _, _ = build(R18)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(backbone="resnet18")}, path)
    flags = R18 + ["--pretrained_backbone_path", str(path)]
    with pytest.raises(RuntimeError, match=f"{path} holds Python objects other than tensors.*--finetune"):
        load_pretrained_backbone(model, parse(flags))


def test_missing_resnet_file(tmp_path, offline):
    flags = R18 + ["--pretrained_backbone_path", str(tmp_path / "absent.pth")]
    model, _, _, _ = build(flags)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_pretrained_backbone(model, parse(flags))


def test_swin_without_its_file(tmp_path):
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    flags = SMALL + ["--backbone", "swin_tiny", "--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained_backbone(model, parse(flags))
    assert str(path) in str(info.value)


def test_stem_and_layer1_are_frozen():
    model, _, _, args = build(R18)
    assert args.lr_backbone > 0
    body = model.backbone[0].body
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in body.named_parameters() if p.requires_grad]
    assert frozen and all(n.startswith(R18_STEM) for n in frozen)
    assert trainable and all(n.startswith(("layer2.", "layer3.", "layer4.")) for n in trainable)
    assert {n.split(".")[0] for n in frozen} == {"conv1", "layer1"}  # FrozenBatchNorm has buffers only
    assert {n.split(".")[0] for n in trainable} == {"layer2", "layer3", "layer4"}
    # BatchNorm statistics and affine terms are frozen buffers
    assert all(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for n, m in body.named_modules() if "bn" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))


def test_lr_backbone_zero_freezes_the_backbone():
    model, _, _, _ = build(R18 + ["--lr_backbone", "0"])
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))


def test_resnet_layer4_is_the_last_module():
    """The body stops at layer4: no average pooling or classifier parameters."""
    model, _, _, _ = build(R18)
    assert list(model.backbone[0].body.keys())[-1] == "layer4"
    assert not any(k.startswith(("fc.", "avgpool")) for k in model.backbone[0].body.state_dict())


SWIN_T = SMALL + ["--backbone", "swin_tiny"]


def test_swin_is_initialised_at_construction_as_upstream():
    """Upstream re-initialises the Swin body when it is built: truncated-normal (std 0.02) Linear weights, zero
    biases, unit LayerNorms (plain nn.Linear defaults would have a std of about 0.06 and non-zero biases)."""
    model, _, _, _ = build(SWIN_T)
    body = model.backbone[0].body
    linears = [m for m in body.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in body.modules() if isinstance(m, torch.nn.LayerNorm)]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 5e-4 and abs(weights.mean().item()) < 1e-4
    assert all(m.bias is None or not m.bias.any() for m in linears)
    assert all((m.weight == 1).all() and not m.bias.any() for m in norms)


def test_local_swin_file_is_loaded_without_reinitialising(tmp_path):
    """The ImageNet file is loaded over the body as built: its tensors are copied, the detection norms it lacks
    keep their values (nothing is re-initialised, so no random numbers are drawn)."""
    model, _, _, _ = build(SWIN_T)
    body = model.backbone[0].body
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in body.state_dict().items() if not k.startswith(("norm1.", "norm2.", "norm3."))}
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)
    with torch.no_grad():
        for name, p in body.named_parameters():
            if name.startswith(("norm1.", "norm2.", "norm3.")):
                p.add_(0.5)
    kept = {k: v.clone() for k, v in body.state_dict().items() if k.startswith(("norm1.", "norm2.", "norm3."))}
    rng = torch.get_rng_state()
    load_pretrained_backbone(model, parse(SWIN_T + ["--pretrained_backbone_path", str(path)]))
    assert torch.equal(torch.get_rng_state(), rng)
    loaded = body.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert all(torch.equal(loaded[k], v) for k, v in kept.items())


def _swin_file(tmp_path, name, rename=lambda key: key):
    """An ImageNet-style file of Swin `name` (detection norms left out, keys renamed by `rename`)."""
    from models.swin_transformer import build_swin_backbone
    state = {rename(k): v for k, v in build_swin_backbone(name).state_dict().items()
             if not k.startswith(("norm1.", "norm2.", "norm3."))}
    path = tmp_path / f"{name}.pth"
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("file_name, backbone, message", [
    ("swin_tiny", "swin_small", r"lacks 156 of the model's patch_embed./layers. tensors \(e.g. layers.2.blocks.6"),
    ("swin_small", "swin_tiny", r"has 156 tensors the model does not \(e.g. layers.2.blocks.6"),
])
def test_swin_file_of_another_depth_is_rejected(tmp_path, file_name, backbone, message):
    """Swin-T and Swin-S differ only in the depth of stage 3: the file of the one fitted the other's tensors by
    name and shape, so a Swin-T file left 12 blocks of a Swin-S random (and the reverse ignored 12 blocks), with
    only the routine list of missing keys printed."""
    path = _swin_file(tmp_path, file_name)
    flags = SMALL + ["--backbone", backbone, "--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    before = {k: v.clone() for k, v in model.backbone[0].body.state_dict().items()}
    with pytest.raises(RuntimeError, match=message) as info:
        load_pretrained_backbone(model, parse(flags))
    assert f"{path} does not fit {backbone}" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone[0].body.state_dict().items())  # nothing loaded


def test_swin_file_in_mmdet_layout_is_rejected(tmp_path):
    """mmdet / mmpretrain name a Swin's tensors otherwise (stages.*, attn.w_msa.*, ffn.*): only a few LayerNorms
    matched by name, the rest of the backbone stayed random."""
    def mm_name(key):
        key = key.replace("layers.", "stages.", 1).replace(".attn.", ".attn.w_msa.")
        return key.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
    path = _swin_file(tmp_path, "swin_tiny", mm_name)
    flags = SWIN_T + ["--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    with pytest.raises(RuntimeError, match=r"mmdet / mmpretrain's layout \(stages.\*, attn.w_msa.\*\)"):
        load_pretrained_backbone(model, parse(flags))


@pytest.mark.parametrize("flags,checkpointed", [([], True), (["--no_backbone_checkpoint"], False),
                                                 (["--no_backbone_checkpoint", "--use_checkpoint"], True)])
def test_swin_checkpointing_flags(flags, checkpointed, monkeypatch):
    """Swin blocks are checkpointed by default, as upstream; --no_backbone_checkpoint turns that off, and
    --use_checkpoint (which checkpoints the transformer) keeps it on."""
    model, _, _, _ = build(SWIN_T + flags)
    assert {layer.use_checkpoint for layer in model.backbone[0].body.layers} == {checkpointed}
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.train()
    model([torch.randn(3, 128, 96)])
    assert bool(calls) == checkpointed
