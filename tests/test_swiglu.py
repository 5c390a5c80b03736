"""model/swiglu.py: SwiGLU's gating with its own backward (the Triton kernel on GPUs, its operator on CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.swiglu as sw
from model.dit import SwiGLU

_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, _BENCH)
try:
    import bench_swiglu
    from bench_swiglu import autograd_gating  # the formula the blocks used before, as the benchmark times it
finally:
    sys.path.remove(_BENCH)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA GPUs (the lent machine)")


def grads(fn, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.detach().requires_grad_(True)
    y = fn(h)
    (dh,) = torch.autograd.grad(y, h, g)
    return y.detach(), dh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradient_match_autograd(dtype):
    torch.manual_seed(0)
    h = (torch.randn(2, 7, 2 * 24) * 3).to(dtype)  # leading dims, gates well into silu's curved part
    g = torch.randn(2, 7, 24).to(dtype)
    y_ref, dh_ref = grads(autograd_gating, h, g)
    y, dh = grads(sw.swiglu, h, g)
    assert y.dtype == dh.dtype == dtype and dh.shape == h.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the forward is the same expression
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(dh, dh_ref, **tol)
    # Both halves: the gate's gradient and the value's are different functions, so a swap or a wrong
    # offset shows in one of them.
    assert not torch.allclose(dh[..., :24].float(), dh[..., 24:].float(), atol=1e-2)


@pytest.mark.parametrize("routed", [False, True])
def test_gradcheck_float64(monkeypatch, routed):
    monkeypatch.setattr(sw, "routes_to_op", lambda h: routed)
    h = torch.randn(3, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sw.swiglu, (h,))


def test_operator_registration():
    """The operator's schema, fake (used under torch.compile) and autograd-free contract, as torch checks them."""
    torch.library.opcheck(torch.ops.fourreal.swiglu_backward, (torch.randn(4, 2 * 8), torch.randn(4, 8)))
    assert not sw.uses_kernel(torch.randn(4, 16), torch.randn(4, 8))  # no Triton kernel on CPU
    assert not sw.routes_to_op(torch.randn(4, 16))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("routed", [False, True])
def test_backward_routes_through_the_operator_where_told(monkeypatch, routed):
    """On CUDA the backward calls the operator (whose CUDA kernel is the Triton one); forcing that route on CPU
    runs the same wiring, eager and compiled, with the operator's CPU implementation."""
    monkeypatch.setattr(sw, "routes_to_op", lambda h: routed)
    torch.manual_seed(1)
    h, g = torch.randn(5, 2 * 16) * 2, torch.randn(5, 16)
    _, dh_ref = grads(autograd_gating, h, g)

    log = _OpLog()
    hh = h.clone().requires_grad_(True)
    y = sw.swiglu(hh)
    with log:
        (dh,) = torch.autograd.grad(y, hh, g)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-5)
    assert any("fourreal.swiglu_backward" in op for op in log.ops) == routed

    torch._dynamo.reset()
    from torch._inductor.utils import run_and_get_code
    compiled = torch.compile(lambda x: sw.swiglu(x), fullgraph=True)
    (_, dh_c), code = run_and_get_code(lambda: grads(compiled, h, g))
    torch.testing.assert_close(dh_c, dh_ref, rtol=1e-5, atol=1e-5)
    assert ("fourreal.swiglu_backward" in "\n".join(code)) == routed


def test_swiglu_module_uses_it():
    """The blocks' SwiGLU layer computes w_out(swiglu(w_in(x))): same output and gradients as the formula."""
    torch.manual_seed(2)
    m = SwiGLU(8, 12, bias=True)
    x = torch.randn(3, 4, 8, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    y_ref = m.w_out(autograd_gating(m.w_in(x)))
    y_ref.square().sum().backward()
    want = [x.grad] + [p.grad for p in m.parameters()]
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_benchmark_runs_on_cpu(monkeypatch, capsys):
    """benchmarks/bench_swiglu.py (the GPU measurement's script) at toy size: its check compares the two ways."""
    monkeypatch.setattr(sys, "argv", ["bench_swiglu.py", "--device", "cpu", "--tokens", "64", "--width", "16",
                                      "--hidden", "32", "--iters", "1", "--rounds", "1"])
    bench_swiglu.main()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    check = lines[0]["check"]
    assert check["kernel_used"] is False
    assert check["max_abs_kernel_vs_autograd"] <= 0.01 * check["ref_abs_max"]
    assert {(x["case"], x["way"]) for x in lines[1:]} == {(c, w) for c in ("gating", "layer")
                                                         for w in ("autograd", "kernel")}


# ----------------------------------------------------------------------------- the Triton kernel (GPU only)
# CI has no GPU and no Triton; these run on the lent GPU machine (`python3 -m pytest tests/test_swiglu.py`), where
# the kernel is the one the training step uses.


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 24), (1000, 40), (2, 513, 96)])  # elements not a multiple of the block
def test_kernel_matches_the_reference_on_cuda(dtype, shape):
    torch.manual_seed(3)
    *lead, hidden = shape
    h = (torch.randn(*lead, 2 * hidden, device="cuda") * 3).to(dtype)
    g = torch.randn(*lead, hidden, device="cuda").to(dtype)
    assert sw.routes_to_op(h) and sw.uses_kernel(h, g)
    got = sw.swiglu_backward(h, g)
    want = sw.swiglu_backward_reference(h, g)
    assert got.shape == h.shape and got.dtype == dtype and got.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    _, dh_ref = grads(autograd_gating, h.float(), g.float())
    torch.testing.assert_close(grads(sw.swiglu, h, g)[1].float(), dh_ref, **(tol if dtype == torch.float32 else
                                                                             dict(rtol=2e-2, atol=2e-2)))


@CUDA
def test_kernel_falls_back_for_inputs_it_does_not_take():
    """A gradient that is not one contiguous tensor (an expanded one, from a sum) takes the reference formula."""
    h = torch.randn(4, 2 * 32, device="cuda")
    g = torch.ones(1, 32, device="cuda").expand(4, 32)
    assert not sw.uses_kernel(h, g)
    torch.testing.assert_close(sw.swiglu_backward(h, g), sw.swiglu_backward_reference(h, g))
    hh = h.clone().requires_grad_(True)
    sw.swiglu(hh).sum().backward()
    torch.testing.assert_close(hh.grad, sw.swiglu_backward_reference(h, torch.ones(4, 32, device="cuda")))


@CUDA
def test_compiled_block_uses_the_kernel_on_cuda():
    """The compiled layer (as compile_blocks compiles the blocks, here in one graph) runs the operator and matches
    the eager formula."""
    torch._dynamo.reset()
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(4)
    m = SwiGLU(64, 96, bias=False).cuda().to(torch.bfloat16)
    x = torch.randn(2, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)

    def step():
        (dx,) = torch.autograd.grad(compiled(x).float().square().sum(), x)
        return dx
    dx, code = run_and_get_code(step)
    assert "fourreal.swiglu_backward" in "\n".join(code)
    (dx_ref,) = torch.autograd.grad(m.w_out(autograd_gating(m.w_in(x))).float().square().sum(), x)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=3e-2, atol=3e-2)
