from .deformable_detr import build


def build_model(args):
    """(model, criterion, postprocessors) for the parsed command-line arguments."""
    return build(args)
