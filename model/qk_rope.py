"""Queries and keys RMS-normalised per head and rotated (3D RoPE) in one pass each way, on CUDA.

The attention's inputs come from one GEMM, ``qkv = [q | k | v]`` per token, and the norms and RoPE sit between that
GEMM and cuDNN's attention, both opaque to inductor. Compiled by inductor, the backward of "RMSNorm, then RoPE" for
q and k took four kernels a block at the paper preset (RoPE's backward writing q's gradient in fp32, two
reductions for the norms, and a ``cat`` of dq, dk and dv into the GEMM's layout): about 18 tensor-sized transfers
(0.53 ms a block on an H100, 13 ms a step) where 8 do (read dq, dk, dv and the pre-norm q and k; write dqkv), and
the forward 6 where 4 do. ``qk_norm_rope`` gives both directions a Triton kernel: the forward reads q and k once
and writes the rotated q and k; the backward reads the incoming gradients and the pre-norm q and k once, writes
the whole ``dqkv`` (dv copied into its slot) and leaves the norms' weight gradients as per-program partial sums.
On CPU (and wherever Triton is missing) the operators run the same formulas in torch, which the CPU tests route
to; ``Attention`` itself keeps the inline torch expressions there (model/dit.py).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

try:  # Triton ships with CUDA builds of torch; CPU builds (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ROWS = 16
"""(token, head) rows per Triton program."""


def _split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [S, N, heads, d] views of qkv [S, N, 3 * heads * d]."""
    S, N, C = qkv.shape
    q, k, v = qkv.view(S, N, 3, heads, C // (3 * heads)).unbind(2)
    return q, k, v


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of the last dim of x by the angles of each token (cos, sin [..., d/2]
    broadcast against x: [N, d/2] for x [..., N, d], [N, 1, d/2] for x [..., N, heads, d]), in fp32 at least;
    returned in x's dtype. Attention's inline path (model/dit.py) and the operators' reference use it."""
    x1, x2 = x.to(_acc(x)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def forward_reference(qkv: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotated q and k [S, N, heads, d] in qkv's dtype and the norms' 1/rms [2, S, N, heads], computed in fp32 and
    rounded once, as the kernel does (in fp64 for fp64 inputs, which the kernel leaves to this). cos, sin: [N, d/2]."""
    acc = _acc(qkv)
    out, rstds = [], []
    for x, w in zip(_split(qkv, heads)[:2], (w_q, w_k)):
        x = x.to(acc)
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out.append(apply_rope(x * rstd * w.to(acc), cos[:, None].to(acc), sin[:, None].to(acc)).to(qkv.dtype))
        rstds.append(rstd[..., 0])
    return out[0], out[1], torch.stack(rstds)


def backward_reference(qkv: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       rstd: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, heads: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dqkv (qkv's layout and dtype) and the two weights' gradients (fp32) for the incoming dq, dk, dv
    [S, N, heads, d]."""
    acc = _acc(qkv)
    c, s = cos[:, None].to(acc), sin[:, None].to(acc)
    grads, dws = [], []
    for x, w, r, g in zip(_split(qkv, heads)[:2], (w_q, w_k), rstd.to(acc), (dq, dk)):
        g1, g2 = g.to(acc).chunk(2, dim=-1)
        gy = torch.cat([g1 * c + g2 * s, g2 * c - g1 * s], dim=-1)  # the rotation's transpose
        x_hat = x.to(acc) * r[..., None]
        dws.append((gy * x_hat).sum(dim=(0, 1, 2)))
        dx_hat = gy * w.to(acc)
        grads.append(r[..., None] * (dx_hat - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True)))
    dqkv = torch.stack([grads[0], grads[1], dv.to(acc)], dim=2).to(qkv.dtype).reshape(qkv.shape)
    return dqkv, dws[0].to(w_q.dtype), dws[1].to(w_k.dtype)


@torch.library.custom_op("fourreal::qk_norm_rope", mutates_args=())
def qk_norm_rope_forward(qkv: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``forward_reference`` as an operator: the Triton kernel on CUDA."""
    return forward_reference(qkv, w_q, w_k, cos, sin, heads, eps)


@qk_norm_rope_forward.register_fake
def _(qkv, w_q, w_k, cos, sin, heads, eps):
    S, N, C = qkv.shape
    q = qkv.new_empty(S, N, heads, C // (3 * heads))
    return q, torch.empty_like(q), qkv.new_empty(2, S, N, heads, dtype=_acc(qkv))


@torch.library.custom_op("fourreal::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(qkv: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, rstd: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                          heads: int, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backward_reference`` as an operator: the Triton kernel on CUDA (``need_dw`` false: the norms' weights are
    frozen, and the kernel leaves their gradients zero)."""
    return backward_reference(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, heads)


@qk_norm_rope_backward.register_fake
def _(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, heads, need_dw):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(w_q),
            torch.empty_like(w_k))


if triton is not None:
    @triton.jit
    def _fwd_rows(qkv_ptr, w_ptr, out_ptr, rstd_ptr, r, j, rm, jm, m, token, head, c, s, part: tl.constexpr, rows,
                  heads, eps, HALF: tl.constexpr):
        # q (part 0) or k (part 1) of each row: normalise, scale, rotate the pairs (i, i + HALF)
        D = 2 * HALF
        src = qkv_ptr + (token * 3 * heads + part * heads + head)[:, None] * D + j[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        w1 = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)
        y1 = x1 * rstd[:, None] * w1[None, :]
        y2 = x2 * rstd[:, None] * w2[None, :]
        dst = out_ptr + r[:, None] * D + j[None, :]
        tl.store(dst, (y1 * c - y2 * s).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (y1 * s + y2 * c).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(rstd_ptr + part * rows + r, rstd, mask=rm)

    @triton.jit
    def _fwd_kernel(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, rstd_ptr, rows, heads, seq, eps,
                    HALF: tl.constexpr, HALF_P2: tl.constexpr, ROWS: tl.constexpr):
        # rows = tokens * heads, one (token, head) pair a row; q and k of a row are 2 * HALF values each
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, HALF_P2)
        rm, jm = r < rows, j < HALF
        m = rm[:, None] & jm[None, :]
        token, head = r // heads, r % heads
        pos = (token % seq)[:, None] * HALF + j[None, :]
        c = tl.load(cos_ptr + pos, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos, mask=m, other=0.0).to(tl.float32)
        _fwd_rows(qkv_ptr, wq_ptr, q_ptr, rstd_ptr, r, j, rm, jm, m, token, head, c, s, 0, rows, heads, eps, HALF)
        _fwd_rows(qkv_ptr, wk_ptr, k_ptr, rstd_ptr, r, j, rm, jm, m, token, head, c, s, 1, rows, heads, eps, HALF)

    @triton.jit
    def _bwd_rows(qkv_ptr, w_ptr, rstd_ptr, g_ptr, dqkv_ptr, dw_ptr, pid, r, j, rm, jm, m, token, head, seq_i, n_i,
                  c, s, part: tl.constexpr, rows, heads, g_s0, g_s1, g_s2, HALF: tl.constexpr, NEED_DW: tl.constexpr):
        # the gradient of q (part 0) or k (part 1): undo the rotation, then the norm's backward
        D = 2 * HALF
        g_at = g_ptr + (seq_i * g_s0 + n_i * g_s1 + head * g_s2)[:, None] + j[None, :]
        g1 = tl.load(g_at, mask=m, other=0.0).to(tl.float32)
        g2 = tl.load(g_at + HALF, mask=m, other=0.0).to(tl.float32)
        gy1 = g1 * c + g2 * s
        gy2 = g2 * c - g1 * s
        src = (token * 3 * heads + part * heads + head)[:, None] * D + j[None, :]
        rstd = tl.load(rstd_ptr + part * rows + r, mask=rm, other=0.0)[:, None]
        xh1 = tl.load(qkv_ptr + src, mask=m, other=0.0).to(tl.float32) * rstd
        xh2 = tl.load(qkv_ptr + src + HALF, mask=m, other=0.0).to(tl.float32) * rstd
        w1 = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)
        d1 = gy1 * w1[None, :]
        d2 = gy2 * w2[None, :]
        mean = (tl.sum(d1 * xh1, axis=1) + tl.sum(d2 * xh2, axis=1)) / D
        tl.store(dqkv_ptr + src, (rstd * (d1 - xh1 * mean[:, None])).to(dqkv_ptr.dtype.element_ty), mask=m)
        tl.store(dqkv_ptr + src + HALF, (rstd * (d2 - xh2 * mean[:, None])).to(dqkv_ptr.dtype.element_ty), mask=m)
        if NEED_DW:  # this program's share of the weight's gradient: [programs, 2, D] partial sums
            at = dw_ptr + (pid * 2 + part) * D + j
            tl.store(at, tl.sum(gy1 * xh1, axis=0), mask=jm)
            tl.store(at + HALF, tl.sum(gy2 * xh2, axis=0), mask=jm)

    @triton.jit
    def _bwd_kernel(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, rstd_ptr, dq_ptr, dk_ptr, dv_ptr, dqkv_ptr, dw_ptr,
                    rows, heads, seq, q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2,
                    HALF: tl.constexpr, HALF_P2: tl.constexpr, ROWS: tl.constexpr, NEED_DW: tl.constexpr):
        # q_s*, k_s*, v_s*: the strides of dq, dk and dv as [S, N, heads, d] (d's is 1): the attention's backward
        # lays its gradients out as it likes
        pid = tl.program_id(0).to(tl.int64)
        r = pid * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, HALF_P2)
        rm, jm = r < rows, j < HALF
        m = rm[:, None] & jm[None, :]
        token, head = r // heads, r % heads
        D = 2 * HALF
        pos = (token % seq)[:, None] * HALF + j[None, :]
        c = tl.load(cos_ptr + pos, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos, mask=m, other=0.0).to(tl.float32)
        seq_i, n_i = token // seq, token % seq
        _bwd_rows(qkv_ptr, wq_ptr, rstd_ptr, dq_ptr, dqkv_ptr, dw_ptr, pid, r, j, rm, jm, m, token, head, seq_i, n_i,
                  c, s, 0, rows, heads, q_s0, q_s1, q_s2, HALF, NEED_DW)
        _bwd_rows(qkv_ptr, wk_ptr, rstd_ptr, dk_ptr, dqkv_ptr, dw_ptr, pid, r, j, rm, jm, m, token, head, seq_i, n_i,
                  c, s, 1, rows, heads, k_s0, k_s1, k_s2, HALF, NEED_DW)
        # dv into its slot of dqkv, as it came
        v_at = dv_ptr + (seq_i * v_s0 + n_i * v_s1 + head * v_s2)[:, None] + j[None, :]
        dst = dqkv_ptr + (token * 3 * heads + 2 * heads + head)[:, None] * D + j[None, :]
        tl.store(dst, tl.load(v_at, mask=m, other=0.0).to(dqkv_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, tl.load(v_at + HALF, mask=m, other=0.0).to(dqkv_ptr.dtype.element_ty), mask=m)

    def _launch_shape(qkv: torch.Tensor, heads: int) -> tuple[int, int, int, int]:
        S, N, C = qkv.shape
        half = C // (6 * heads)
        return S * N * heads, half, triton.next_power_of_2(half), N

    def _kernel_takes(qkv: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, *grads: torch.Tensor) -> bool:
        # the layouts and dtypes the kernels index and compute in (fp32 at most); anything else runs the reference
        return (qkv.dtype in (torch.float16, torch.bfloat16, torch.float32) and qkv.is_contiguous()
                and w_q.is_contiguous() and w_k.is_contiguous() and all(g.stride(-1) == 1 for g in grads))

    @qk_norm_rope_forward.register_kernel("cuda")
    def _(qkv, w_q, w_k, cos, sin, heads, eps):
        if not _kernel_takes(qkv, w_q, w_k):
            return forward_reference(qkv, w_q, w_k, cos, sin, heads, eps)
        S, N, C = qkv.shape
        rows, half, half_p2, seq = _launch_shape(qkv, heads)
        q = qkv.new_empty(S, N, heads, 2 * half)
        k = torch.empty_like(q)
        rstd = qkv.new_empty(2, S, N, heads, dtype=torch.float32)
        _fwd_kernel[(triton.cdiv(rows, ROWS),)](qkv, w_q, w_k, cos.contiguous(), sin.contiguous(), q, k, rstd,
                                                rows, heads, seq, eps, HALF=half, HALF_P2=half_p2, ROWS=ROWS,
                                                num_warps=4)
        return q, k, rstd

    @qk_norm_rope_backward.register_kernel("cuda")
    def _(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, heads, need_dw):
        if not (_kernel_takes(qkv, w_q, w_k, dq, dk, dv) and rstd.dtype == torch.float32 and rstd.is_contiguous()):
            return backward_reference(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, heads)
        rows, half, half_p2, seq = _launch_shape(qkv, heads)
        programs = triton.cdiv(rows, ROWS)
        dqkv = torch.empty_like(qkv)
        partial = qkv.new_empty(programs if need_dw else 1, 2, 2 * half, dtype=torch.float32)
        _bwd_kernel[(programs,)](qkv, w_q, w_k, cos.contiguous(), sin.contiguous(), rstd, dq, dk, dv, dqkv, partial,
                                 rows, heads, seq, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                                 HALF=half, HALF_P2=half_p2, ROWS=ROWS, NEED_DW=need_dw, num_warps=4)
        if not need_dw:
            return dqkv, torch.zeros_like(w_q), torch.zeros_like(w_k)
        dw = partial.view(programs, -1).sum(0).view(2, -1)  # one column sum over the programs' partial sums
        # copies, not views of one tensor: an operator's outputs may not alias each other
        return dqkv, dw[0].to(w_q.dtype, copy=True), dw[1].to(w_k.dtype, copy=True)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, w_q, w_k, cos, sin, heads, eps):
        q, k, rstd = qk_norm_rope_forward(qkv, w_q, w_k, cos, sin, heads, eps)
        ctx.save_for_backward(qkv, w_q, w_k, cos, sin, rstd)
        ctx.heads = heads
        return q, k, _split(qkv, heads)[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        qkv, w_q, w_k, cos, sin, rstd = ctx.saved_tensors
        q = _split(qkv, ctx.heads)[0]
        dq, dk, dv = (torch.zeros(q.shape, dtype=qkv.dtype, device=qkv.device) if g is None else g
                      for g in (dq, dk, dv))
        dqkv, dw_q, dw_k = qk_norm_rope_backward(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, ctx.heads,
                                                 ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        return dqkv, dw_q, dw_k, None, None, None, None


def routes_to_op(qkv: torch.Tensor) -> bool:
    """Whether ``Attention`` takes q and k through ``qk_norm_rope``: on CUDA, where its operators have kernels (with
    Triton installed, as CUDA builds of torch ship it; without, the same formulas in torch)."""
    return qkv.is_cuda


def qk_norm_rope(qkv: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k RMS-normalised (weights w_q, w_k) and rotated, and v, from qkv [S, N, 3 * heads * d]; each
    [S, N, heads, d] (v a view of qkv). cos, sin [N, d/2]: the angles of each position (model/dit.py, rope_3d)."""
    S, N, C = qkv.shape
    if C % (3 * heads) or (C // (3 * heads)) % 2:
        raise ValueError(f"qkv's last dim {C} is not 3 x {heads} heads x an even head size")
    if cos.shape != (N, C // (6 * heads)) or sin.shape != cos.shape:  # the kernels index them by position
        raise ValueError(f"cos and sin must be [{N}, {C // (6 * heads)}] for {N} positions, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    return _QKNormRope.apply(qkv, w_q, w_k, cos, sin, heads, eps)
