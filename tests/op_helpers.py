"""Test helpers of the deformable-attention op: forcing the PyTorch path, as the tests (and only they) may."""
from models.ops.functions import ms_deform_attn_func


def force_pytorch_path(monkeypatch):
    """For the test's duration (or a pytest.MonkeyPatch.context() block), ms_deform_attn takes the PyTorch path on
    every device: use_compiled, the one place that chooses, says no."""
    monkeypatch.setattr(ms_deform_attn_func, "use_compiled", lambda value: False)
