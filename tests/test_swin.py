"""Swin backbone: checkpoint layout, official-file loading, numerics and odd input sizes."""
import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmcv_custom import load_checkpoint
from models.swin_transformer import SwinTransformer, SwinTransformerBlock, build_swin_backbone, shifted_window_mask

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
BODY = "backbone.0.body."


def small_swin(window=7, **kwargs):
    kwargs.setdefault("drop_path_rate", 0.0)
    return SwinTransformer(window_size=window, **SMALL, **kwargs)


def randomise(model, seed=0):
    """Random values everywhere, so that a wrong copy cannot pass by chance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm scales near 1
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + offset)
    return model


def official_file(path, window, seed=0):
    """An ImageNet-style file {"model": ...} of a small Swin: classifier head and final norm
    added, detection norms removed, plus an attention-mask buffer as the official files have."""
    model = randomise(small_swin(window), seed)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("norm1.", "norm2.", "norm3."))}
    state["norm.weight"], state["norm.bias"] = torch.ones(256), torch.zeros(256)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 256), torch.zeros(1000)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, window * window, window * window)
    torch.save({"model": state}, path)
    return state


@pytest.fixture
def logger():
    return logging.getLogger("test_swin")


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize("name, config", [("swin_tiny", "swin_tiny_hybrid_mqs_lft"),
                                          ("swin_large", "swin_large_hybrid_n900")])
def test_state_dict_matches_upstream(name, config):
    path = REFERENCE / "checkpoint_keys.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    reference = json.loads(path.read_text())["configs"][config]["state_dict"]
    expected = {k[len(BODY):]: list(v) for k, v in reference.items() if k.startswith(BODY)}
    model = build_swin_backbone(name)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_factory():
    model = build_swin_backbone("swin_tiny", out_indices=(1, 2, 3))
    assert model.num_channels == [192, 384, 768] and model.strides == [8, 16, 32]
    assert model.variant == "swin_tiny" and not hasattr(model, "absolute_pos_embed")
    with pytest.raises(ValueError, match="swin_large_window12"):
        build_swin_backbone("swin_huge")


# ---------------------------------------------------------------- loading official files

@pytest.mark.parametrize("window", [7, 12])
def test_load_same_window(tmp_path, caplog, logger, window):
    file = tmp_path / "swin.pth"
    saved = official_file(file, window)
    model = small_swin(window)
    with caplog.at_level(logging.INFO, logger="test_swin"):
        checkpoint = load_checkpoint(model, str(file), logger=logger)
    assert set(checkpoint) == {"model"}
    own = model.state_dict()
    for key, value in saved.items():
        if key in own:
            assert torch.equal(own[key], value), key
    log = caplog.text
    assert "missing keys" in log and "norm3.weight" in log  # detection norms are not in the file
    assert "unexpected" not in log and "head.weight" in log  # classifier dropped, not unexpected


@pytest.mark.parametrize("file_window, model_window", [(7, 12), (12, 7)])
def test_load_other_window_interpolates_bias_tables(tmp_path, logger, file_window, model_window):
    file = tmp_path / "swin.pth"
    saved = official_file(file, file_window)
    constant_key = "layers.1.blocks.0.attn.relative_position_bias_table"
    saved[constant_key] = torch.full_like(saved[constant_key], 0.37)
    torch.save({"model": saved}, file)

    model = small_swin(model_window)
    index_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("relative_position_index")}
    load_checkpoint(model, str(file), logger=logger)
    own = model.state_dict()

    side_in, side_out = 2 * file_window - 1, 2 * model_window - 1
    tables = [k for k in own if k.endswith("relative_position_bias_table")]
    assert len(tables) == 8
    for key in tables:
        heads = saved[key].shape[1]
        grid = saved[key].t().reshape(1, heads, side_in, side_in)
        expected = F.interpolate(grid, size=(side_out, side_out), mode="bicubic", align_corners=False)
        assert own[key].shape == (side_out ** 2, heads)
        torch.testing.assert_close(own[key], expected.reshape(heads, -1).t())
    torch.testing.assert_close(own[constant_key], torch.full_like(own[constant_key], 0.37))
    for key, index in index_before.items():  # the model keeps its own index for its window
        assert torch.equal(own[key], index)
    assert torch.equal(own["layers.2.blocks.1.mlp.fc1.weight"], saved["layers.2.blocks.1.mlp.fc1.weight"])


def test_load_plain_and_prefixed_state_dicts(tmp_path, logger):
    saved = official_file(tmp_path / "a.pth", 7)
    for i, wrap in enumerate([lambda s: s,
                              lambda s: {"state_dict": {"module.backbone." + k: v for k, v in s.items()}}]):
        file = tmp_path / f"b{i}.pth"
        torch.save(wrap(saved), file)
        model = small_swin(7)
        model.init_weights(str(file), logger=logger)
        assert torch.equal(model.state_dict()["patch_embed.proj.weight"], saved["patch_embed.proj.weight"])


def test_absolute_pos_embed_from_token_layout(tmp_path, logger):
    model = small_swin(7, ape=True, pretrain_img_size=64)  # grid 16 x 16
    embed = torch.randn(1, 8 * 8, 32)  # file: [1, L, C] of an 8 x 8 grid
    torch.save({"absolute_pos_embed": embed}, tmp_path / "ape.pth")
    load_checkpoint(model, str(tmp_path / "ape.pth"), logger=logger)
    grid = embed.reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.absolute_pos_embed.detach(), expected)
    assert model(torch.randn(1, 3, 37, 50))["3"].shape == (1, 256, 2, 2)


def test_load_errors(tmp_path, logger):
    model = small_swin(7)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(model, str(missing))

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(RuntimeError, match="corrupt.pth.*not a readable torch checkpoint"):
        load_checkpoint(model, str(corrupt))

    pickled = tmp_path / "objects.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(RuntimeError, match="objects.pth.*weights_only"):
        load_checkpoint(model, str(pickled))

    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, resnet)
    with pytest.raises(RuntimeError, match="resnet.pth: none of its 2 tensors"):
        load_checkpoint(model, str(resnet))

    wider = tmp_path / "wider.pth"
    torch.save({"model": SwinTransformer(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)).state_dict()},
               wider)
    model.variant = "swin_tiny"
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(model, str(wider))
    message = str(err.value)
    assert "wider.pth" in message and "swin_tiny" in message and "tensors have other shapes" in message
    assert "patch_embed.proj.weight: file (48, 3, 4, 4) vs model (32, 3, 4, 4)" in message
    assert "--pretrained_backbone_path for --backbone swin_tiny" in message


# ---------------------------------------------------------------- numerics

def test_shifted_block_matches_dense_reference():
    """A shifted block on a padded map equals dense attention restricted to the same window and
    the same pre-shift region, with zero tokens as padding (the official semantics)."""
    torch.manual_seed(0)
    ws, shift, dim, heads, h, w = 4, 2, 8, 2, 6, 7
    block = SwinTransformerBlock(dim, heads, window_size=ws, shift_size=shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(1, h * w, dim)
    hp, wp = 8, 8
    got = block(x, h, w, shifted_window_mask(hp, wp, ws, shift, x.device))

    # reference: tokens on the padded, rolled grid; pairs allowed when same window and region
    t = F.pad(block.norm1(x).view(1, h, w, dim), (0, 0, 0, wp - w, 0, hp - h))
    t = torch.roll(t, (-shift, -shift), (1, 2)).reshape(hp * wp, dim)
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()

    def band(i, n):
        return (i >= n - ws).long() + (i >= n - shift).long()

    window = (rows // ws) * (wp // ws) + cols // ws
    region = band(rows, hp) * 3 + band(cols, wp)
    same_window = window[:, None] == window[None, :]
    mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0)
    dr = (rows % ws)[:, None] - (rows % ws)[None, :] + ws - 1
    dc = (cols % ws)[:, None] - (cols % ws)[None, :] + ws - 1
    bias = block.attn.relative_position_bias_table[dr * (2 * ws - 1) + dc].permute(2, 0, 1)  # [heads, L, L]
    q, k, v = block.attn.qkv(t).view(-1, 3, heads, dim // heads).permute(1, 2, 0, 3)
    logits = (q * (dim // heads) ** -0.5) @ k.transpose(-1, -2) + bias + mask
    logits = logits.masked_fill(~same_window, float("-inf"))
    out = block.attn.proj((logits.softmax(-1) @ v).permute(1, 0, 2).reshape(-1, dim))
    out = torch.roll(out.view(1, hp, wp, dim), (shift, shift), (1, 2))[:, :h, :w].reshape(1, h * w, dim)
    expected = x + out
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_matches_timm_port_on_window_multiples():
    """timm's Swin (verified on the official weights) gives the same stage features at 224."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    model = randomise(small_swin(7)).eval()
    state = dict(model.state_dict())
    state.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                  "head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10)})
    # always_partition: keep 7x7 windows (and the shift) on the 7x7 last stage, as the detection Swin does
    reference = timm_swin.SwinTransformer(img_size=224, num_classes=10, window_size=7, always_partition=True,
                                          drop_path_rate=0.0, **SMALL).eval()
    converted = timm_swin.checkpoint_filter_fn(state, reference)
    reference.load_state_dict({k: v for k, v in converted.items() if not k.startswith(("norm1.", "norm2.", "norm3."))})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
        theirs = reference.forward_intermediates(x, indices=[1, 2, 3], norm=False, intermediates_only=True)
    for i, feature in zip((1, 2, 3), theirs):
        norm = getattr(model, f"norm{i}")
        feature = F.layer_norm(feature.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias)
        torch.testing.assert_close(ours[str(i)], feature.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training

def test_forward_backward_odd_size_with_drop_path_and_checkpointing():
    x = torch.randn(2, 3, 97, 131)
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = small_swin(7, drop_path_rate=0.3, use_checkpoint=use_checkpoint).train()
        torch.manual_seed(1)
        outs = model(x)
        assert list(outs) == ["1", "2", "3"]
        assert [tuple(o.shape) for o in outs.values()] == [(2, 64, 13, 17), (2, 128, 7, 9), (2, 256, 4, 5)]
        sum(o.square().mean() for o in outs.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        results.append((outs, grads))
    # checkpointing replays the same drop-path masks: identical outputs and gradients
    (outs_a, grads_a), (outs_b, grads_b) = results
    for key in outs_a:
        torch.testing.assert_close(outs_a[key], outs_b[key])
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name])


def test_frozen_stages():
    model = small_swin(7, frozen_stages=2).train()
    assert not model.patch_embed.training and not model.layers[0].training and model.layers[1].training
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
