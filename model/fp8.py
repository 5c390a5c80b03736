"""FP8 matmuls for training: the blocks' linear layers on H100-class tensor cores at twice the bf16 rate.

Tensorwise dynamic scaling, the recipe torchao calls "tensorwise": each matmul scales its operands by
``fp8_max / amax`` of the tensor itself, multiplies in FP8 (activations and weights in e4m3, gradients in
e5m2, which trade precision for range) and accumulates in higher precision. Weights, gradients and the
optimizer state stay as they were (fp32 masters under autocast); only the three GEMMs of each layer (forward,
input gradient, weight gradient) run in FP8, so a checkpoint is the same with or without it. Operands whose
sizes the FP8 kernels cannot take (not multiples of 16) fall back to the plain matmul.

``enable_fp8(module)`` switches the ``nn.Linear`` layers in ``module`` in place (same parameters and state-dict
keys); ``disable_fp8`` switches them back. The training job leaves them on for its logged samples too: they
are previews, and the exported weights are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x * s in ``dtype``, 1 / s) with s = fp8 max / amax(x): the whole tensor uses the format's range."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def _col_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major, the layout the FP8 GEMM wants for its second operand."""
    return x.t().contiguous().t()


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w.T with x [M, K], w [N, K]; the backward's two GEMMs in FP8 as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, sx = _quantize(x, E4M3)
        w8, sw = _quantize(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)  # FP8 copies: half the activation memory of bf16
        ctx.dtypes = (x.dtype, w.dtype)
        return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, sg = _quantize(grad.contiguous(), E5M2)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch._scaled_mm(g8, _col_major(w8), scale_a=sg, scale_b=sw, out_dtype=grad.dtype).to(x_dtype)
        if ctx.needs_input_grad[1]:  # a frozen layer (the 4D model's base) needs no weight gradient: one GEMM less
            gw = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=sg, scale_b=sx,
                                  out_dtype=torch.float32).to(w_dtype)
        return gx, gw, None


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper); CPUs run the same math, slowly."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs in FP8 (the class ``enable_fp8`` swaps in; same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        M = x.numel() // K if K else 0
        if M == 0 or M % 16 or K % 16 or N % 16 or not x.is_floating_point():
            return F.linear(x, self.weight, self.bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        # row-major first operand, as the FP8 GEMM requires (a transposed view would reshape without a copy)
        y = _FP8Matmul.apply(x.reshape(M, K).contiguous(), self.weight, out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], N)


def enable_fp8(module: nn.Module, skip: tuple[str, ...] = ("ada",)) -> int:
    """Run the ``nn.Linear`` layers inside ``module`` in FP8, in place; returns how many were switched.

    Layers named in ``skip`` stay as they are: the blocks' adaLN layers map one conditioning vector per
    sequence (a handful of rows, no speed to gain) to the shifts, scales and gates of every token.
    """
    n = 0
    for name, m in module.named_modules():
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            m.__class__ = Float8Linear
            n += 1
    return n


def disable_fp8(module: nn.Module) -> int:
    """Switch ``enable_fp8``'s layers back to ``nn.Linear`` (same parameters); returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is Float8Linear:
            m.__class__ = nn.Linear
            n += 1
    return n
