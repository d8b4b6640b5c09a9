"""Mixed precision (--amp fp32 | bf16 | fp16) on any device: the autocast context of a mode, its dtype, whether
it needs a gradient scaler, the model's outputs brought back to float32, and whether this CPU runs the reduced
dtypes natively.

The model runs under torch.autocast; everything after its forward (losses and matching, post-processing, TTA
merging) takes its outputs in float32. fp16 scales the loss (torch.amp.GradScaler), bf16 (the float32 exponent
range) needs no scaler.
"""
import torch

AMP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def amp_mode(args):
    """The precision a main.py Namespace asks for: --amp when given (None: not given), else fp16 with upstream's
    --use_fp16, else fp32. So `bash <a config with --use_fp16> --amp fp32` (or bf16) runs as asked."""
    amp = getattr(args, "amp", None)
    if amp is not None:
        return amp
    return "fp16" if getattr(args, "use_fp16", False) else "fp32"


def amp_dtype(amp):
    """torch dtype of a mode ("fp32" -> float32, "bf16" -> bfloat16, "fp16" -> float16)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown precision {amp!r}; choose one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def needs_grad_scaler(amp):
    """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range."""
    return amp_dtype(amp) is torch.float16


def grad_scaler(device, amp):
    """The torch.amp.GradScaler of a training run (disabled, a pass-through, unless fp16)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=needs_grad_scaler(amp))


def autocast(device, amp):
    """The torch.autocast context of `amp` on `device` (disabled for fp32: the float32 computation as it is).

    Without autocast's weight cache: each weight is used once per forward here, and the cache would keep a
    reduced copy of every weight to the forward's end (evaluating R50 at 800x1066 in bf16: a peak 200 MiB above
    fp32's instead of level with it)."""
    dtype = amp_dtype(amp)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not torch.float32,
                          cache_enabled=False)


def to_float32(tensor):
    """A float16/bfloat16 tensor as float32; any other tensor (float32, float64, integer, bool) as it is."""
    return tensor.float() if tensor.dtype in REDUCED_DTYPES else tensor


def float32_outputs(outputs):
    """The model's nested outputs (dicts, lists, tuples of tensors) with every reduced-precision tensor in float32."""
    if isinstance(outputs, dict):
        return {key: float32_outputs(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float32_outputs(value) for value in outputs)
    return to_float32(outputs) if torch.is_tensor(outputs) else outputs


def float32_call(module, x):
    """module(x), in float32 when autocast is on for x's device (x cast, autocast off around the call): for the
    small layers whose outputs are compared or selected (two-stage proposal scores, one-stage reference points)
    or fix the boxes (the box heads)."""
    if not torch.is_autocast_enabled(x.device.type):
        return module(x)
    with torch.autocast(x.device.type, enabled=False):
        return module(to_float32(x))


def forward(model, samples, device, amp):
    """model(samples) under autocast(device, amp), its outputs in float32 (for fp32: just model(samples))."""
    if amp_dtype(amp) is torch.float32:
        return model(samples)
    with autocast(device, amp):
        outputs = model(samples)
    return float32_outputs(outputs)


# ------------------------------------------------------------------------------------------- the CPU


def cpu_capability():
    """The vector instruction set torch's CPU kernels use here (e.g. "AVX512", "AVX2", "DEFAULT")."""
    return torch.backends.cpu.get_cpu_capability()


def native_on_cpu(amp):
    """True when this CPU computes `amp`'s dtype in hardware (oneDNN: bf16 with AVX512-BF16 or AMX, fp16 with
    AVX512-FP16 or AMX-FP16); float32 always is. Elsewhere bf16/fp16 kernels emulate, many times slower."""
    dtype = amp_dtype(amp)
    if dtype is torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype is torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def slow_precision_warning(device, amp, training=False):
    """The warning for running `amp` where it is many times slower than fp32, else None: on a CPU without hardware
    support for its dtype, and fp16 training on any CPU (torch has no fast CPU kernel for the gradient of a
    float16 convolution's weights: about 100x slower than bf16)."""
    if torch.device(device).type != "cpu" or amp_dtype(amp) is torch.float32:
        return None
    if not native_on_cpu(amp):
        return (f"warning: --amp {amp} on this CPU (capability {cpu_capability()}, no native {amp} support) "
                f"emulates {amp} arithmetic and runs many times slower than fp32 (30-80x in matrix products); use "
                "--amp fp32 here")
    if training and amp == "fp16":
        return ("warning: --amp fp16 training on the CPU: torch's gradient of float16 convolution weights has no "
                "fast CPU kernel (about 100x slower than bf16); " +
                ("--amp bf16 trains fast on this CPU" if native_on_cpu("bf16") else "use --amp fp32 here"))
    return None


def warn_if_slow(device, amp, training=False, report=None):
    """Report slow_precision_warning(device, amp, training) (with `report`, default print), when there is one;
    returns it."""
    message = slow_precision_warning(device, amp, training)
    if message is not None:
        if report is None:
            print(message, flush=True)  # the builtin at call time: a distributed run's prints only on rank 0
        else:
            report(message)
    return message


def cpu_precision_summary():
    """One line: the CPU capability and which reduced dtypes it runs natively (tools/benchmark.py's header)."""
    native = ", ".join(f"{amp} {'native' if native_on_cpu(amp) else 'emulated (slow)'}" for amp in ("bf16", "fp16"))
    return f"CPU capability {cpu_capability()}: {native}"
