"""ViT backbone: attention numerics, window/global blocks, padding and masks, layout of the full-size detectors,
gradient checkpointing and layer-wise learning-rate decay."""
import functools

import pytest
import torch
import torch.nn.functional as F
from model_helpers import SMALL, TINY_VIT, TINY_VIT_SIZE, TWO_STAGE_HYBRID, build, images, parse, register_tiny_vit
from timm.models.vision_transformer import Block as TimmBlock

import main as project_main
from models.backbone import ViTBackbone
from models.vit import (
    VIT_SIZES,
    Block,
    build_vit_backbone,
    decomposed_rel_pos_bias,
    grid_position_embedding,
    vit_layer_id,
)
from util.misc import nested_tensor_from_tensor_list

TINY = SMALL + TWO_STAGE_HYBRID + ["--backbone", TINY_VIT]
# the fork's ViT-L config (H-Deformable-DETR + tricks), on the CPU
FULL = ["--device", "cpu", "--with_box_refine", "--two_stage", "--dim_feedforward", "2048", "--num_queries_one2one",
        "300", "--num_queries_one2many", "1500", "--k_one2many", "6", "--dropout", "0.0", "--mixed_selection",
        "--look_forward_twice"]


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    register_tiny_vit(monkeypatch)


def randomise(module, seed=0, scale=0.2):
    """Random values in every parameter (relative position tables included), so no path is zero by chance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + offset)
    return module


# ---------------------------------------------------------------- attention numerics

def test_decomposed_bias_is_the_sum_of_row_and_column_offset_embeddings():
    gen = torch.Generator().manual_seed(0)
    h, w, c = 3, 4, 5
    q = torch.randn(2, h * w, c, generator=gen)
    table_h, table_w = torch.randn(2 * h - 1, c, generator=gen), torch.randn(2 * w - 1, c, generator=gen)
    bias = decomposed_rel_pos_bias(q, table_h, table_w, h, w)
    expected = torch.empty(2, h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            (qi, qj), (ki, kj) = divmod(i, w), divmod(j, w)
            expected[:, i, j] = q[:, i] @ (table_h[qi - ki + h - 1] + table_w[qj - kj + w - 1])
    torch.testing.assert_close(bias, expected)


def test_relative_tables_are_resized_linearly_for_other_grids():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2 * 2, 3, generator=gen)
    table = torch.randn(7, 3, generator=gen)  # made for 4 x 4, used on 2 x 2: resized to 3 offsets
    resized = F.interpolate(table.t()[None], size=3, mode="linear")[0].t()
    torch.testing.assert_close(decomposed_rel_pos_bias(q, table, table, 2, 2),
                               decomposed_rel_pos_bias(q, resized, resized, 2, 2))


def test_global_block_with_zero_tables_is_timm_vit_block():
    """Without relative positions, a global block is the standard ViT block (timm's, as MAE trains it)."""
    ours = randomise(Block(32, 2, 4.0, 0.0, window_size=0, grid=5))
    with torch.no_grad():
        ours.attn.rel_pos_h.zero_()
        ours.attn.rel_pos_w.zero_()
    timm_block = TimmBlock(32, 2, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    missing = timm_block.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if "rel_pos" not in k}, strict=True)
    assert not missing.missing_keys
    x = torch.randn(2, 5, 6, 32)
    torch.testing.assert_close(ours(x), timm_block(x.reshape(2, 30, 32)).reshape(2, 5, 6, 32), rtol=1e-5, atol=1e-5)


def test_one_window_covering_the_grid_is_global_attention():
    window = randomise(Block(32, 2, 4.0, 0.0, window_size=4, grid=99))
    dense = Block(32, 2, 4.0, 0.0, window_size=0, grid=4)
    dense.load_state_dict(window.state_dict())
    x = torch.randn(1, 4, 4, 32)
    torch.testing.assert_close(window(x), dense(x), rtol=1e-5, atol=1e-5)


def test_window_attention_is_local_and_global_attention_is_not():
    x = torch.randn(1, 6, 7, 32, dtype=torch.float64)  # windows of 3: 2 x 3 windows, the last column padded
    moved = x.clone()
    moved[0, 0, 0, 0] += 1.0  # a token of the top-left window
    windowed = randomise(Block(32, 2, 4.0, 0.0, window_size=3, grid=99)).double()
    changed = (windowed(moved) - windowed(x)).abs().sum(-1)[0] > 0
    inside = torch.zeros(6, 7, dtype=torch.bool)
    inside[:3, :3] = True
    assert torch.equal(changed, inside)
    global_block = randomise(Block(32, 2, 4.0, 0.0, window_size=0, grid=6)).double()
    assert ((global_block(moved) - global_block(x)).abs().sum(-1) > 0).all()


def test_position_embedding_grid_is_resized_bicubically():
    pos = torch.randn(1, 1 + 16, 8)
    assert torch.equal(grid_position_embedding(pos, 4, 4), pos[:, 1:].reshape(1, 4, 4, 8))
    expected = F.interpolate(pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(3, 6), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(grid_position_embedding(pos, 3, 6), expected)


# ---------------------------------------------------------------- the backbone

def test_sizes_of_the_fork():
    base, large = VIT_SIZES["vit_base"], VIT_SIZES["vit_large"]
    assert (base.embed_dim, base.depth, base.num_heads, base.global_blocks) == (768, 12, 12, (2, 5, 8, 11))
    assert (large.embed_dim, large.depth, large.num_heads, large.global_blocks) == (1024, 24, 16, (5, 11, 17, 23))
    assert base.window_size == large.window_size == 14 and base.patch_size == large.patch_size == 16


def test_pyramid_levels_strides_and_masks_on_an_odd_size():
    """70 x 90 and 48 x 40 images: the batch (70 x 90) is padded to 96 x 96; levels of stride 8/16/32, masks mark
    every cell that holds no image pixel."""
    backbone = ViTBackbone(TINY_VIT, True, 3, 0.0)
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == [32, 32, 32]
    out = backbone(nested_tensor_from_tensor_list(images([(70, 90), (48, 40)])))
    assert sorted(out) == ["p3", "p4", "p5"]
    for name, stride in zip(("p3", "p4", "p5"), (8, 16, 32)):
        feature, mask = out[name].decompose()
        assert feature.shape == (2, 32, 96 // stride, 96 // stride)
        for index, (h, w) in enumerate([(70, 90), (48, 40)]):
            rows = torch.arange(96 // stride)[:, None] * stride >= h
            cols = torch.arange(96 // stride)[None, :] * stride >= w
            assert torch.equal(mask[index], rows | cols), (name, index)


@pytest.mark.parametrize("num_levels, strides", [(1, [32]), (2, [16, 32]), (4, [8, 16, 32])])
def test_number_of_levels(num_levels, strides):
    model, _, _, _ = build(TINY + ["--num_feature_levels", str(num_levels)])
    assert model.backbone.strides == strides
    assert sorted(model.backbone[0].body.levels) == [s.bit_length() - 1 for s in strides]


def test_bad_flags():
    with pytest.raises(ValueError, match="--dilation"):
        build(TINY + ["--dilation"])
    with pytest.raises(ValueError, match="vit_large"):
        build(SMALL + ["--backbone", "vit_huge"])


def test_lr_backbone_zero_freezes_the_vit():
    model, _, _, _ = build(TINY + ["--lr_backbone", "0"])
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_drop_path_rate_grows_linearly_over_the_blocks():
    net = build_vit_backbone(TINY_VIT, drop_path_rate=0.3).net
    rates = [0.0 if isinstance(b.drop_path, torch.nn.Identity) else b.drop_path.drop_prob for b in net.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("name, n_params, n_encoder, n_pyramid", [
    ("vit_base", 108_974_617, 85_889_024, 3_444_096),
    ("vit_large", 327_599_769, 303_432_704, 4_525_568),
])
def test_full_size_layout(name, n_params, n_encoder, n_pyramid):
    """Full-size detectors (built on the meta device: no memory, no time): the fork's keys and shapes."""
    with torch.device("meta"):
        model, _, _, _ = build(FULL + ["--backbone", name])
    size = VIT_SIZES[name]
    state = model.state_dict()
    body = {k[len("backbone.0.body."):]: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.0.")}
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(v.numel() for k, v in state.items() if k.startswith("backbone.0.body.net.")) == n_encoder
    assert sum(v.numel() for k, v in state.items() if k.startswith("backbone.0.body.simfp_")) == n_pyramid
    dim, head = size.embed_dim, size.embed_dim // size.num_heads
    assert body["net.pos_embed"] == (1, 197, dim) and body["net.patch_embed.proj.weight"] == (dim, 3, 16, 16)
    for i in range(size.depth):
        table = 127 if i in size.global_blocks else 27
        assert body[f"net.blocks.{i}.attn.rel_pos_h"] == body[f"net.blocks.{i}.attn.rel_pos_w"] == (table, head)
        assert body[f"net.blocks.{i}.attn.qkv.weight"] == (3 * dim, dim)
        assert body[f"net.blocks.{i}.mlp.fc1.weight"] == (4 * dim, dim)
    assert f"net.blocks.{size.depth}.norm1.weight" not in body
    assert body["simfp_3.0.weight"] == (dim, dim // 2, 2, 2)  # transposed conv, then 1x1, LN, 3x3, LN
    assert body["simfp_3.1.weight"] == (256, dim // 2, 1, 1) and body["simfp_3.3.weight"] == (256, 256, 3, 3)
    assert body["simfp_4.0.weight"] == (256, dim, 1, 1) and body["simfp_5.1.weight"] == (256, dim, 1, 1)
    assert [k for k in body if k.startswith("simfp_")] == [k for k in body if not k.startswith("net.")]
    assert list(body)[0].startswith("simfp_3.")  # registered before the encoder, as the fork
    assert state["input_proj.0.0.weight"].shape == (256, 256, 1, 1)
    assert state["input_proj.3.0.weight"].shape == (256, 256, 3, 3)  # the extra stride-64 level


# ---------------------------------------------------------------- training

def test_forward_backward_and_checkpointing_give_the_same_gradients(monkeypatch):
    """--use_checkpoint recomputes the ViT blocks in backward: same loss and gradients (drop path included)."""
    from model_helpers import hybrid_total, targets

    grads = []
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    for extra in ([], ["--use_checkpoint"]):
        model, criterion, _, args = build(TINY + ["--drop_path_rate", "0.2"] + extra)
        model.train()
        torch.manual_seed(5)
        out = model(images([(70, 90), (64, 64)]))
        _, total = hybrid_total(out, targets([2, 1]), criterion, args)
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("backbone.0.")})
        if not extra:
            assert not calls
    assert len(calls) >= TINY_VIT_SIZE.depth
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_layer_ids():
    assert vit_layer_id("backbone.0.body.net.pos_embed", 24) == 0
    assert vit_layer_id("backbone.0.body.net.patch_embed.proj.weight", 24) == 0
    assert vit_layer_id("backbone.0.body.net.blocks.0.attn.qkv.weight", 24) == 1
    assert vit_layer_id("backbone.0.body.net.blocks.23.attn.rel_pos_h", 24) == 24
    assert vit_layer_id("backbone.0.body.simfp_3.0.weight", 24) == 25


def _group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_layer_decay_learning_rates():
    flags = TINY + ["--lr_backbone", "1e-4", "--lr_layer_decay", "0.8", "--wd_backbone", "0.05"]
    model, _, _, _ = build(flags)
    args = parse(flags)
    optimizer, _ = project_main.build_optimizer(args, model)
    net = model.backbone[0].body.net
    depth = len(net.blocks)
    lrs = [_group_of(optimizer, block.attn.qkv.weight)["lr"] for block in net.blocks]
    for earlier, later in zip(lrs, lrs[1:]):
        assert earlier / later == pytest.approx(0.8)
    assert lrs[-1] == pytest.approx(1e-4 * 0.8)
    for block, lr in zip(net.blocks, lrs):  # a block's parameters share one learning rate
        assert {_group_of(optimizer, p)["lr"] for p in block.parameters()} == {lr}
    embedding = _group_of(optimizer, net.patch_embed.proj.weight)
    assert embedding["lr"] == pytest.approx(1e-4 * 0.8 ** (depth + 1)) and embedding["weight_decay"] == 0.05
    position = _group_of(optimizer, net.pos_embed)
    assert position["lr"] == embedding["lr"] and position["weight_decay"] == 0.0
    pyramid = _group_of(optimizer, model.backbone[0].body.simfp_3[0].weight)
    assert pyramid["lr"] == pytest.approx(1e-4) and pyramid["weight_decay"] == 0.05
    assert _group_of(optimizer, model.class_embed[0].weight)["lr"] == args.lr
    assert _group_of(optimizer, model.class_embed[0].weight)["weight_decay"] == args.weight_decay
    # every trainable parameter in exactly one group
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_layer_decay_groups_do_not_depend_on_the_weight_decay():
    """The groups are made from the parameter names: with --wd_backbone 0 the position embedding's group was merged
    into the patch embedding's, and a run could not be resumed with another weight decay."""
    model, _, _, _ = build(TINY)
    sizes = {}
    for decay in ("0", "0.05"):
        optimizer, _ = project_main.build_optimizer(parse(TINY + ["--lr_layer_decay", "0.8", "--wd_backbone", decay]),
                                                    model)
        sizes[decay] = [len(g["params"]) for g in optimizer.param_groups]
        net = model.backbone[0].body.net
        assert _group_of(optimizer, net.pos_embed)["params"] == [net.pos_embed]
        assert _group_of(optimizer, net.patch_embed.proj.weight)["weight_decay"] == float(decay)
    assert sizes["0"] == sizes["0.05"]


@pytest.mark.parametrize("flags", [["--lr_layer_decay", "0.8"], ["--wd_backbone", "0.1"]])
def test_backbone_group_flags_with_a_frozen_backbone_are_refused(flags):
    """--lr_backbone 0 freezes the backbone: its groups' flags would be read by nothing."""
    model, _, _, _ = build(TINY + ["--lr_backbone", "0"])
    with pytest.raises(ValueError, match=f"{flags[0]} set how the backbone trains, but it is frozen"):
        project_main.build_optimizer(parse(TINY + ["--lr_backbone", "0", *flags]), model)


def test_layer_decay_off_and_the_fork_spelling():
    model, _, _, _ = build(TINY)
    optimizer, _ = project_main.build_optimizer(parse(TINY), model)
    net = model.backbone[0].body.net
    assert _group_of(optimizer, net.blocks[0].attn.qkv.weight)["lr"] == parse(TINY).lr_backbone
    assert _group_of(optimizer, net.patch_embed.proj.weight)["lr"] == parse(TINY).lr_backbone
    assert parse(["--lr_backbone_decay_rate", "0.7"]).lr_layer_decay == 0.7


def test_layer_decay_needs_a_vit_and_keeps_other_optimizers_as_they_were():
    flags = SMALL + ["--backbone", "resnet18"]
    model, _, _, _ = build(flags)
    optimizer, _ = project_main.build_optimizer(parse(flags), model)
    assert len(optimizer.param_groups) == 3 and optimizer.param_groups[1]["lr"] == parse(flags).lr_backbone
    with pytest.raises(ValueError, match="--lr_layer_decay 0.8 applies to ViT backbones only"):
        project_main.build_optimizer(parse(flags + ["--lr_layer_decay", "0.8"]), model)
    optimizer, _ = project_main.build_optimizer(parse(flags + ["--wd_backbone", "0.1"]), model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.1, 1e-4]
