"""Whether torch.export is tracing the model, on every supported torch release."""
import torch


def is_exporting():
    """True while torch.export traces (torch.compiler.is_exporting, from torch 2.6; earlier releases cannot say, so
    False there)."""
    query = getattr(torch.compiler, "is_exporting", None)
    return query is not None and query()
