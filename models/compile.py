"""--compile: torch.compile of the model for training and evaluation (docs/compile.md)."""
import torch

from models.ops.functions import extension


def compile_model(model, device):
    """Compile `model` (the DeformableDETR, or its DistributedDataParallel wrapper) in place with torch.compile's
    default backend and return it: nn.Module.compile() keeps the module, so its state_dict keys, checkpoints and
    the weight average are those of the eager model. Every forward of a new shape family is compiled on first use
    (after the first size change dynamo makes the image sizes dynamic); the losses and the matcher stay eager.

    The deformable-attention op for `device` is loaded first, so that the trace sees it loaded (one graph)."""
    extension.compiled_extension(torch.device(device))
    model.compile()
    return model
