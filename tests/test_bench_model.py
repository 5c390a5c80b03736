"""The 4D benchmarks' random base: gradients flow through it as through a trained one (an adaLN-Zero base as built
gives exactly zero gradients, which GPUs multiply faster than real ones)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_model  # noqa: E402
from bench_model import random_base  # noqa: E402
from model import DIT_PRESETS, FourDConfig, FourDModel, VideoDiT, grid_condition_mask  # noqa: E402
from model import rectified_flow as rf  # noqa: E402


def _sync_grad_norms(base: VideoDiT) -> tuple[float, float]:
    """(the 4D sync layers' gradient norm, the base's output norm) for one training step on a random grid."""
    model = FourDModel(base, FourDConfig(sync="soft"))
    g = torch.Generator().manual_seed(0)
    B, V, T = 1, 3, 3
    x0 = torch.rand(B, V, T, 3, 32, 32, generator=g) * 2 - 1
    loss, _ = rf.training_loss(lambda x, t, c, m: model(x, t, c, m), x0, grid_condition_mask(B, V, T), g)
    loss.backward()
    grads = [p.grad for p in model.sync_parameters() if p.grad is not None]
    with torch.no_grad():
        out = base(x0[:, 0], torch.full((B,), 0.5), torch.zeros(B, dtype=torch.long))
    return float(torch.stack([gr.norm() for gr in grads]).norm()) if grads else 0.0, float(out.norm())


def test_the_4d_benchmarks_random_base_passes_gradients_and_a_fresh_one_does_not() -> None:
    torch.manual_seed(0)
    zero_grad, zero_out = _sync_grad_norms(VideoDiT(DIT_PRESETS["tiny"]))
    assert zero_grad == 0.0 and zero_out == 0.0  # what the benchmarks timed before: zeros through the whole backward
    torch.manual_seed(0)
    base = random_base(DIT_PRESETS["tiny"])
    assert all(p.any() for p in base.parameters())
    grad, out = _sync_grad_norms(base)
    assert grad > 1e-3 and out > 1e-3
    # Seeded: runs compared in one device call train over the same base, whatever the RNG did before.
    torch.manual_seed(123)
    again = random_base(DIT_PRESETS["tiny"])
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters()))


def test_the_4d_benchmarks_build_their_base_that_way() -> None:
    """bench_model's 4D cases (training and generation) and bench_train_loop's 4D job go through random_base."""
    args = argparse.Namespace(preset="tiny", model=[], checkpointing=0, fp8=0, compile=0)
    model = bench_model.build_fourd(args, torch.device("cpu"), torch.float32)
    assert all(p.any() for p in model.base.parameters())
    up = bench_model.fill_zero_parameters_(bench_model.VideoUpsampler(bench_model.UPSAMPLER_PRESETS["tiny"]))
    assert all(p.any() for p in up.parameters())
    generate = (Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py").read_text()
    assert "fill_zero_parameters_(VideoUpsampler(" in generate
    source = (Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_loop.py").read_text()
    assert "random_base(DIT_PRESETS[\"paper\"])" in source and "VideoDiT(" not in source
