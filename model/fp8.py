"""FP8 matmuls for training: the blocks' linear layers on H100-class tensor cores at twice the bf16 rate.

Tensorwise dynamic scaling, the recipe torchao calls "tensorwise": each matmul scales its operands by
``fp8_max / amax`` of the tensor itself, multiplies in FP8 (activations and weights in e4m3, gradients in
e5m2, which trade precision for range) and accumulates in higher precision. Weights, gradients and the
optimizer state stay as they were (fp32 masters under autocast); only the three GEMMs of each layer (forward,
input gradient, weight gradient) run in FP8, so a checkpoint is the same with or without it. Operands whose
sizes the FP8 kernels cannot take (not multiples of 16) fall back to the plain matmul.

Frozen layers (the 4D model's base) take another recipe, ``FrozenFloat8Linear``: rowwise scaling. Their
weights never change, so their FP8 copies are made once, each with one scale per row, and no weight gradient
is needed, so nothing but the weights is saved for the backward. Each activation or gradient row gets its own
scale: an amax over one row, which the compiled block computes inside the kernel that produces the row, but
only when that kernel holds the whole row at once (inductor's persistent reductions: rows of at most
``PERSISTENT_ROW`` values). A wider row compiles into a looped reduction that reads its inputs twice; measured
on an H200 at the 4D stage's shapes, that costs more than the FP8 GEMM saves (docs/performance.md). So each of
a frozen layer's two GEMMs runs in FP8 only where the operand it quantizes has a row that short: at the paper
preset the QKV and SwiGLU-input maps' forward (rows of the 1024-wide LayerNorm output) and the SwiGLU output
map's input gradient (rows of the 1024-wide block gradient); the attention projection stays in bf16 (its
input arrives permuted from attention, and quantizing it cost 5x what its GEMM saved).

``enable_fp8(module)`` switches the ``nn.Linear`` layers in ``module`` in place (same parameters and state-dict
keys; a frozen one becomes ``FrozenFloat8Linear``); ``disable_fp8`` switches them back. The training job leaves
them on for its logged samples too: they are previews, and the exported weights are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PERSISTENT_ROW = 1024
"""The widest row whose amax the compiled producer kernel computes in one pass (inductor's persistent-reduction
limit for rows): a frozen layer quantizes an operand only if its rows are at most this wide."""
_FROZEN_BUFFERS = ("w8_fwd", "w8_fwd_scale", "w8_bwd", "w8_bwd_scale")  # FrozenFloat8Linear's weight copies
FROZEN_SKIP = ("proj",)
"""Frozen layers left in bf16 by name (besides ``enable_fp8``'s ``skip``): see the module docstring."""


def _quantize(x: torch.Tensor, dtype: torch.dtype, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x * s in ``dtype``, 1 / s) with s = fp8 max / amax(x): the format's whole range is used. One scale
    for the tensor, or with ``rows`` one per row of x [M, K] (scales [M, 1]: the rowwise recipe's operand)."""
    fmax = torch.finfo(dtype).max
    x_abs = x.detach().abs()
    amax = (x_abs.amax(dim=-1, keepdim=True) if rows else x_abs.amax()).float().clamp(min=1e-12)
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


class _FrozenFP8Matmul(torch.autograd.Function):
    """y = x @ w.T for a frozen w [N, K]; the backward computes the input gradient only. bf16 output.

    ``w_fwd`` (w scaled per output row, row-major, scales [1, N]) makes the forward GEMM FP8; ``w_bwd`` (w scaled
    per input column, column-major, scales [1, K]) makes the input-gradient GEMM grad [M, N] @ w FP8. Either may
    be None: that GEMM runs in bf16. FP8 GEMMs are rowwise-scaled e4m3 (per-row scales leave e5m2's extra range
    unneeded).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, w_fwd: torch.Tensor | None, s_fwd: torch.Tensor | None,
                w_bwd: torch.Tensor | None, s_bwd: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w, w_bwd, s_bwd)  # the weights only: no activation is kept
        ctx.x_dtype = x.dtype
        if w_fwd is None:
            return x.to(torch.bfloat16) @ w.to(torch.bfloat16).t()
        x8, sx = _quantize(x, E4M3, rows=True)
        return torch._scaled_mm(x8, w_fwd.t(), scale_a=sx, scale_b=s_fwd, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, w_bwd, s_bwd = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            if w_bwd is None:
                gx = grad.to(torch.bfloat16) @ w.to(torch.bfloat16)
            else:
                g8, sg = _quantize(grad.contiguous(), E4M3, rows=True)
                gx = torch._scaled_mm(g8, w_bwd, scale_a=sg, scale_b=s_bwd, out_dtype=torch.bfloat16)
            gx = gx.to(ctx.x_dtype)
        return gx, None, None, None, None, None


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


class FrozenFloat8Linear(Float8Linear):
    """A frozen ``nn.Linear`` whose matmuls run in FP8 from weight copies made once (rowwise recipe, see above).

    ``fp8_forward`` / ``fp8_input_grad`` say which of its GEMMs run in FP8 (in, respectively out, features of
    at most ``fp8_row_limit``). The copies are non-persistent buffers: the state dict is the plain layer's. They
    are made again whenever the weight may have changed under them: after ``load_state_dict`` and after
    ``.to()``/``.cuda()`` (which would otherwise cast the FP8 buffers like any floating-point tensor). Outside
    bf16 autocast, or if the weight is made trainable again, the layer falls back to ``Float8Linear``'s recipe.
    """

    fp8_row_limit: int = PERSISTENT_ROW  # enable_fp8's row_limit, kept on the layer

    @property
    def fp8_forward(self) -> bool:
        return self.in_features <= self.fp8_row_limit

    @property
    def fp8_input_grad(self) -> bool:
        return self.out_features <= self.fp8_row_limit

    def refresh_fp8(self) -> None:
        """Make the weight's FP8 copies from its current values (called by ``enable_fp8``, loading and moving)."""
        w8_fwd = s_fwd = w8_bwd = s_bwd = None
        with torch.no_grad():
            w = self.weight.detach().float()
            if self.fp8_forward:
                w8_fwd, s_fwd = _quantize(w, E4M3, rows=True)  # one scale per output row
                s_fwd = s_fwd.reshape(1, -1)
            if self.fp8_input_grad:
                w8_bwd, s_bwd = _quantize(w.t().contiguous(), E4M3, rows=True)  # one scale per input column
                w8_bwd, s_bwd = w8_bwd.t(), s_bwd.reshape(1, -1)  # [N, K] column-major, as the GEMM wants it
        for name, value in zip(_FROZEN_BUFFERS, (w8_fwd, s_fwd, w8_bwd, s_bwd)):
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.weight.numel() == self.in_features * self.out_features:  # not a partitioned (ZeRO-3) stub
            self.refresh_fp8()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        M = x.numel() // K if K else 0
        dev = x.device.type
        if (self.weight.requires_grad or not (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev)
                                              == torch.bfloat16) or M == 0 or M % 16 or K % 16 or N % 16):
            return super().forward(x)
        y = _FrozenFP8Matmul.apply(x.reshape(M, K).contiguous(), self.weight, self.w8_fwd, self.w8_fwd_scale,
                                   self.w8_bwd, self.w8_bwd_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], N)


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:
    if type(module) is FrozenFloat8Linear:
        module.refresh_fp8()


def enable_fp8(module: nn.Module, skip: tuple[str, ...] = ("ada",), frozen_skip: tuple[str, ...] = FROZEN_SKIP,
               row_limit: int = PERSISTENT_ROW) -> int:
    """Run the ``nn.Linear`` layers inside ``module`` in FP8, in place; returns how many were switched.

    Layers named in ``skip`` stay as they are: the blocks' adaLN layers map one conditioning vector per
    sequence (a handful of rows, no speed to gain) to the shifts, scales and gates of every token. A layer
    whose weight does not require gradients becomes a ``FrozenFloat8Linear`` (weight copies made now), unless
    it is named in ``frozen_skip`` or neither of its GEMMs would run in FP8 (both row widths over ``row_limit``;
    benchmarks/fp8_quality.py sets it to a small model's width to pick the GEMMs the paper preset picks).
    """
    n = 0
    for name, m in module.named_modules():
        short = name.rsplit(".", 1)[-1]
        if type(m) is nn.Linear and short not in skip:
            if m.weight.requires_grad:
                m.__class__ = Float8Linear
            elif short in frozen_skip or min(m.in_features, m.out_features) > row_limit:
                continue
            else:
                m.__class__ = FrozenFloat8Linear
                m.fp8_row_limit = row_limit
                m.refresh_fp8()
                if not getattr(m, "_fp8_load_hook", None):
                    m._fp8_load_hook = m.register_load_state_dict_post_hook(_refresh_after_load)
            n += 1
    return n


def disable_fp8(module: nn.Module) -> int:
    """Switch ``enable_fp8``'s layers back to ``nn.Linear`` (same parameters); returns how many."""
    n = 0
    for m in module.modules():
        if type(m) in (Float8Linear, FrozenFloat8Linear):
            for name in _FROZEN_BUFFERS:
                m._buffers.pop(name, None)
            m.__dict__.pop("fp8_row_limit", None)
            hook = m.__dict__.pop("_fp8_load_hook", None)
            if hook is not None:
                hook.remove()
            m.__class__ = nn.Linear
            n += 1
    return n
