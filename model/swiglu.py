"""SwiGLU's gating, silu(gate) * value, with a backward that reads each input once.

The gate and the value come from one GEMM, ``h = [gate | value]`` (the blocks' ``w_in``), and the backward must
write ``dh = [d_gate | d_value]`` in the same layout. Left to autograd and inductor, that backward compiles into
one pointwise kernel over ``dh`` that decides per element which half it writes (a ``cat``): the left half's
elements load gate, value and the incoming gradient, the right half's load gate and the gradient again, so gate
and gradient cross HBM twice. That is 7 tensor-sized transfers where 5 do (3 reads, 2 writes); at the paper
preset the kernel ran at the bandwidth limit, 0.79 ms a block on an H100, the largest kernel of the step after
the GEMMs and attention (docs/performance.md). ``swiglu`` keeps the forward as it was (traced, so inductor
still fuses it with its neighbours, FP8 casts included) and gives the backward a Triton kernel that computes
both halves from one read of each input, on CUDA tensors when Triton is installed; elsewhere (CPU, or inputs
not laid out as one ``[..., 2 * hidden]`` GEMM output) it runs the same formula in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:  # Triton ships with CUDA builds of torch; CPU builds (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 1024
"""Elements of one half per Triton program (8 warps x 4 x 32)."""


def swiglu_backward_reference(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(silu(gate) * value)/dh for h = [gate | value] on the last dim, computed in fp32 and rounded once to h's
    dtype (as the Triton kernel does)."""
    gate, value = h.float().chunk(2, dim=-1)
    g = grad.float()
    sig = torch.sigmoid(gate)
    d_gate = g * value * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, g * gate * sig], dim=-1).to(h.dtype)


@torch.library.custom_op("fourreal::swiglu_backward", mutates_args=())
def swiglu_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dh for ``swiglu(h)``'s incoming gradient: the Triton kernel on CUDA, the reference formula elsewhere (which
    the CPU tests run through the same operator, its fake and the autograd wiring, by routing to it)."""
    return swiglu_backward_reference(h, grad)


@swiglu_backward.register_fake
def _(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h, memory_format=torch.contiguous_format)


if triton is not None:
    @triton.jit
    def _swiglu_backward_kernel(h_ptr, grad_ptr, dh_ptr, n, hidden, BLOCK: tl.constexpr):
        # One flat index over the [rows, hidden] gradient; each element writes its gate and value gradient.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = offs // hidden
        at = offs + row * hidden  # the gate's index in [rows, 2 * hidden]; the value's is hidden further
        gate = tl.load(h_ptr + at, mask=mask).to(tl.float32)
        value = tl.load(h_ptr + at + hidden, mask=mask).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = g * value * sig * (1.0 + gate * (1.0 - sig))
        d_value = g * gate * sig
        tl.store(dh_ptr + at, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at + hidden, d_value.to(dh_ptr.dtype.element_ty), mask=mask)

    @swiglu_backward.register_kernel("cuda")
    def _(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if not uses_kernel(h, grad):
            return swiglu_backward_reference(h, grad)  # a new tensor from torch.cat: contiguous
        dh = torch.empty_like(h)
        n = grad.numel()
        _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](h, grad, dh, n, grad.shape[-1], BLOCK=BLOCK, num_warps=8)
        return dh


def routes_to_op(h: torch.Tensor) -> bool:
    """Whether ``swiglu``'s backward calls the ``swiglu_backward`` operator: on CUDA, where it has the kernel."""
    return h.is_cuda


def uses_kernel(h: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``swiglu_backward`` runs the Triton kernel for this input and incoming gradient."""
    return (triton is not None and h.is_cuda and h.is_contiguous() and grad.is_contiguous()
            and grad.shape == h.shape[:-1] + (h.shape[-1] // 2,))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value

    @staticmethod
    @once_differentiable  # the operator has no autograd formula: no double backward on any device, alike
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        if routes_to_op(h):
            return swiglu_backward(h, grad)
        # Elsewhere the same formula inline, which inductor fuses with its neighbours as before (on CPU the
        # opaque operator costs more than the extra reads it would save).
        return swiglu_backward_reference(h, grad)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value for h = [gate | value] on the last dim (SwiGLU's gating)."""
    return _SwiGLU.apply(h)
