"""model/qk_rope.py: queries and keys normalised and rotated in one operator each way (Triton kernels on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.dit as dit
import model.qk_rope as qr
from model.dit import Attention, apply_rope, rope_3d

CUDA = pytest.mark.skipif(not torch.cuda.is_available() or qr.triton is None,
                          reason="the Triton kernels run on CUDA GPUs (the lent machine)")


def inputs(S=2, N=12, heads=3, d=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(S, N, 3 * heads * d, generator=g) * 2).to(device, dtype)
    w_q = (1 + 0.3 * torch.randn(d, generator=g)).to(device)
    w_k = (1 + 0.3 * torch.randn(d, generator=g)).to(device)
    cos, sin = rope_3d(3, 2, N // 6, d)
    return qkv, w_q, w_k, cos.to(device), sin.to(device)


def inline(qkv, w_q, w_k, cos, sin, heads, eps=1e-6):
    """What Attention computes without the operator (model/dit.py)."""
    S, N, C = qkv.shape
    q, k, v = qkv.view(S, N, 3, heads, C // (3 * heads)).unbind(2)
    c, s = cos[:, None], sin[:, None]
    norm = lambda x, w: F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)  # noqa: E731
    return apply_rope(norm(q, w_q), c, s), apply_rope(norm(k, w_k), c, s), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_is_the_inline_formula(dtype):
    qkv, w_q, w_k, cos, sin = inputs(dtype=dtype)
    q, k, rstd = qr.forward_reference(qkv, w_q, w_k, cos, sin, 3, 1e-6)
    q_ref, k_ref, _ = inline(qkv, w_q, w_k, cos, sin, 3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the inline path rounds once more, between norm and RoPE
    torch.testing.assert_close(q, q_ref, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(k, k_ref, atol=tol * 4, rtol=tol)
    assert rstd.shape == (2, 2, 12, 3) and rstd.dtype == torch.float32


def test_the_backward_reference_is_autograd_of_the_forward():
    qkv, w_q, w_k, cos, sin = (t.double() for t in inputs())
    heads = 3
    qkv.requires_grad_(True), w_q.requires_grad_(True), w_k.requires_grad_(True)
    q, k, rstd = qr.forward_reference(qkv, w_q, w_k, cos, sin, heads, 1e-6)
    v = qr._split(qkv, heads)[2]
    g = torch.Generator().manual_seed(1)
    dq, dk, dv = (torch.randn(q.shape, generator=g, dtype=torch.float64) for _ in range(3))
    auto = torch.autograd.grad([q, k, v], [qkv, w_q, w_k], [dq, dk, dv])
    ours = qr.backward_reference(qkv.detach(), w_q.detach(), w_k.detach(), cos, sin, rstd.detach(), dq, dk, dv, heads)
    for a, b in zip(auto, ours):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_gradcheck_through_the_operators():
    qkv, w_q, w_k, cos, sin = (t.double() for t in inputs(S=1, N=6, heads=2, d=16))
    for t in (qkv, w_q, w_k):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: qr.qk_norm_rope(a, b, c, cos, sin, 2, 1e-6), (qkv, w_q, w_k))


def test_the_operators_pass_opcheck():
    qkv, w_q, w_k, cos, sin = inputs()
    torch.library.opcheck(qr.qk_norm_rope_forward, (qkv, w_q, w_k, cos, sin, 3, 1e-6))
    q, k, rstd = qr.forward_reference(qkv, w_q, w_k, cos, sin, 3, 1e-6)
    torch.library.opcheck(qr.qk_norm_rope_backward,
                          (qkv, w_q, w_k, cos, sin, rstd, torch.randn_like(q), torch.randn_like(k), torch.randn_like(q),
                           3, True))


def attention_grads(attn, x, rope):
    x = x.detach().requires_grad_(True)
    attn.zero_grad(set_to_none=True)
    out = attn(x, rope)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype))
    module = getattr(attn, "_orig_mod", attn)  # a compiled module's parameters under their own names
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_through_the_operator_is_attention_inline(monkeypatch, compiled):
    torch.manual_seed(0)
    attn = Attention(48, 3, qk_norm=True, bias=False)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5), attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 12, 48)
    rope = rope_3d(3, 2, 2, 16)
    ref = attention_grads(attn, x, rope)
    calls = []
    real = qr.forward_reference
    monkeypatch.setattr(qr, "forward_reference", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dit, "routes_to_op", lambda qkv: True)  # the CUDA route, on CPU: the operators' torch forms
    run = torch.compile(attn, fullgraph=True) if compiled else attn
    got = attention_grads(run, x, rope)
    assert calls, "the operator was not called"
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_frozen_norm_weights_get_no_gradient_and_qk_norm_off_keeps_the_inline_path(monkeypatch):
    attn = Attention(48, 3, qk_norm=True, bias=False).requires_grad_(False)
    x = torch.randn(1, 12, 48, requires_grad=True)
    rope = rope_3d(3, 2, 2, 16)
    (inline_grad,) = torch.autograd.grad(attn(x, rope).sum(), x)
    monkeypatch.setattr(dit, "routes_to_op", lambda qkv: True)
    attn(x, rope).sum().backward()  # the input's gradient still flows through the operator's backward
    torch.testing.assert_close(x.grad, inline_grad, atol=1e-5, rtol=1e-5)
    assert attn.q_norm.weight.grad is None
    plain = Attention(48, 3, qk_norm=False, bias=False)
    called = []
    monkeypatch.setattr(dit, "qk_norm_rope", lambda *a: called.append(1))
    plain(torch.randn(1, 12, 48), rope_3d(3, 2, 2, 16))
    assert not called


def test_rope_tables_of_another_length_are_refused():
    qkv, w_q, w_k, cos, sin = inputs(N=12)
    with pytest.raises(ValueError, match="cos and sin must be"):
        qr.qk_norm_rope(qkv, w_q, w_k, cos[:6], sin[:6], 3, 1e-6)
    with pytest.raises(ValueError, match="cos and sin must be"):
        qr.qk_norm_rope(qkv, w_q, w_k, cos[:, None], sin[:, None], 3, 1e-6)


def kernels_only_refuse(*args):
    raise AssertionError("the operator fell back to its torch formula")


@pytest.fixture
def kernels_only(monkeypatch):
    """On CUDA the operators must run their kernels: the torch formulas they fall back to raise (the test gets
    the real ones to compare with)."""
    reference = (qr.forward_reference, qr.backward_reference)
    monkeypatch.setattr(qr, "forward_reference", kernels_only_refuse)
    monkeypatch.setattr(qr, "backward_reference", kernels_only_refuse)
    return reference


# ----------------------------------------------------------------------------- CUDA: the kernels themselves


@CUDA
@pytest.mark.parametrize("heads,d,N", [(8, 128, 144), (3, 48, 10), (2, 16, 7)])
def test_kernels_match_the_reference(heads, d, N, kernels_only):
    forward_reference, backward_reference = kernels_only
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(N, d // 2, generator=g) * 6  # every pair rotated, by its own angle
    cos, sin = angles.cos().cuda(), angles.sin().cuda()
    S = 3
    qkv = (torch.randn(S, N, 3 * heads * d, generator=g) * 2).cuda().bfloat16()
    w_q, w_k = (1 + 0.3 * torch.randn(2, d, generator=g)).cuda()
    q, k, rstd = qr.qk_norm_rope_forward(qkv, w_q, w_k, cos, sin, heads, 1e-6)
    q_ref, k_ref, rstd_ref = forward_reference(qkv, w_q, w_k, cos, sin, heads, 1e-6)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(k.float(), k_ref.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(rstd, rstd_ref, atol=1e-5, rtol=1e-5)
    # gradients laid out as the attention's backward may hand them: [S, heads, N, d] memory seen as
    # [S, N, heads, d], or contiguous
    dq, dv = (torch.randn(S, heads, N, d, generator=g).cuda().bfloat16().transpose(1, 2) for _ in range(2))
    dk = torch.randn(S, N, heads, d, generator=g).cuda().bfloat16()
    for need_dw in (True, False):
        dqkv, dw_q, dw_k = qr.qk_norm_rope_backward(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, heads, need_dw)
        ref = backward_reference(qkv, w_q, w_k, cos, sin, rstd, dq, dk, dv, heads)
        torch.testing.assert_close(dqkv.float(), ref[0].float(), atol=3e-2, rtol=2e-2)
        if need_dw:
            torch.testing.assert_close(dw_q, ref[1], atol=1e-2, rtol=1e-3)
            torch.testing.assert_close(dw_k, ref[2], atol=1e-2, rtol=1e-3)
        else:
            assert not dw_q.any() and not dw_k.any()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@CUDA
def test_compiled_attention_on_cuda_matches_the_inline_path(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(256, 2, qk_norm=True, bias=False).cuda()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5), attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 144, 256, device="cuda")
    rope = tuple(t.cuda() for t in rope_3d(4, 6, 6, 128))
    compiled = torch.compile(attn, fullgraph=True)
    # fp32: the kernels against the inline formulas, as tight as fp32 allows (layouts and strides as compiled)
    with monkeypatch.context() as m:
        m.setattr(qr, "forward_reference", kernels_only_refuse)
        m.setattr(qr, "backward_reference", kernels_only_refuse)
        got = attention_grads(compiled, x, rope)
    with monkeypatch.context() as m:
        m.setattr(dit, "routes_to_op", lambda qkv: False)
        ref = attention_grads(attn, x, rope)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            inline_bf16 = attention_grads(attn, x, rope)
    for a, b in zip(got[:2] + tuple(got[2].values()), ref[:2] + tuple(ref[2].values())):
        assert rel_err(a, b) < 1e-5
    # bf16 (autocast, as the blocks train): no further from fp32 than the inline formulas are
    with torch.autocast("cuda", dtype=torch.bfloat16), monkeypatch.context() as m:
        m.setattr(qr, "forward_reference", kernels_only_refuse)
        m.setattr(qr, "backward_reference", kernels_only_refuse)
        got_bf16 = attention_grads(compiled, x, rope)
    for a, b, r in zip(got_bf16[:2] + tuple(got_bf16[2].values()), inline_bf16[:2] + tuple(inline_bf16[2].values()),
                       ref[:2] + tuple(ref[2].values())):
        assert rel_err(a, r) < 1.5 * rel_err(b, r) + 1e-3
