"""The model of a trained checkpoint, rebuilt as tools/infer.py, export_onnx.py and benchmark_onnx.py run it."""
import torch

from util.amp import amp_mode
from util.arguments import check_device, check_values, get_args_parser
from util.checkpoint import evaluation_weights, load_checkpoint, load_model_state
from util.config_script import main_arguments

from . import build_model


def trained_model(flags, config=None, device=None, fp32_only=None):
    """(model in eval mode on its device, its postprocessors, its main.py arguments) of the --resume in `flags`.

    The model is built from the arguments saved in the checkpoint (else from the config script `config`),
    overridden by `flags`; `device` replaces --device. The precision (--amp / --use_fp16) is the one `flags` ask for
    (fp32 by default), never the checkpoint's training precision. A checkpoint with a weight average (--model_ema)
    gives the average, as evaluation does. The arguments are this tool's own Namespace (parsed here from `flags`),
    set up before anything is built from them. `fp32_only` (why, for a tool that runs float32 only): a reduced
    precision asked for is refused with that reason.
    """
    given = get_args_parser().parse_known_args(flags)[0]
    resume = given.resume
    if not resume:
        raise ValueError("pass the trained model with --resume <checkpoint>")
    checkpoint = load_checkpoint(resume)
    if config is not None and checkpoint.get("args") is not None:
        raise ValueError(f"--config {config}: {resume} holds the arguments it was trained with, which rebuild its "
                         "model; --config is for a checkpoint without them (override single flags on the command "
                         "line instead)")
    model_args = main_arguments(get_args_parser(), flags, config, checkpoint.get("args"))
    check_values(model_args)  # as main.py's: --topk 0 gave no detections, --val_scale 0 the default
    model_args.amp = amp_mode(given)
    model_args.use_fp16 = model_args.amp == "fp16"
    if fp32_only is not None and model_args.amp != "fp32":
        raise ValueError(f"--amp {model_args.amp}: {fp32_only}")
    if device is not None:
        model_args.device = device
    check_device(model_args)
    model, _, postprocessors = build_model(model_args)
    weights, averaged = evaluation_weights(checkpoint)
    load_model_state(model, weights, resume, model_args)
    if averaged:
        print(f"using the weight average (model_ema) of {resume}")
    return model.to(torch.device(model_args.device)).eval(), postprocessors, model_args
