"""Full-size models have exactly upstream's state-dict keys and shapes and parameter counts (checkpoint_keys.json)."""
import gc

import pytest
from model_helpers import build, reference_configs

CONFIGS = reference_configs()
EXPECTED = {"r50_deformable_detr", "r50_deformable_detr_single_scale",
            "r50_deformable_detr_plus_iterative_bbox_refinement", "r50_two_stage_baseline", "r50_hybrid_mqs_lft",
            "r101_hybrid_mqs_lft", "swin_tiny_hybrid_mqs_lft", "swin_large_hybrid_n900"}


def test_reference_lists_resnet_and_swin_configs(reference_dir):
    assert EXPECTED <= set(CONFIGS)


def _state_dict_report(model, expected):
    """Human-readable differences between the model's state-dict keys/shapes and the expected ones."""
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    mismatched = sorted((k, actual[k], expected[k]) for k in set(actual) & set(expected) if actual[k] != expected[k])
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing, e.g. {missing[:8]}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:8]}")
    if mismatched:
        lines.append(f"{len(mismatched)} shapes differ (key, ours, upstream), e.g. {mismatched[:8]}")
    return lines


@pytest.mark.parametrize("name", sorted(CONFIGS) or [None])
def test_state_dict_matches_upstream(reference_dir, name):
    config = CONFIGS[name]
    model, _, _, _ = build(config["argv"] + ["--device", "cpu"])
    try:
        report = _state_dict_report(model, config["state_dict"])
        assert not report, f"{name}: " + "; ".join(report)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert (n_params, n_trainable) == (config["n_params"], config["n_trainable_params"])
        # same order too: optimizer states in upstream checkpoints are stored by parameter position
        assert list(model.state_dict()) == list(config["state_dict"]), f"{name}: state-dict order differs"
    finally:
        del model
        gc.collect()
