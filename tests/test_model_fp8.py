"""FP8 matmuls (model/fp8.py): close to the bf16/fp32 result, gradients included, same parameters, and the
training stages switch exactly the blocks' token matmuls. CPUs run torch._scaled_mm too, so all of this runs
in CI; the speed is measured on an H100 (docs/performance.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.dit import DiTBlock, VideoDiT, dit_config
from model.fp8 import Float8Linear, disable_fp8, enable_fp8


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten().float(), b.detach().flatten().float(), dim=0))


def test_fp8_linear_matches_the_plain_one_forward_and_backward() -> None:
    torch.manual_seed(0)
    ref = nn.Linear(64, 96)
    fp8 = nn.Linear(64, 96)
    fp8.load_state_dict(ref.state_dict())
    assert enable_fp8(nn.Sequential(fp8)) == 1 and type(fp8) is Float8Linear
    x = torch.randn(4, 8, 64) * 3
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fp8 = ref(x_ref), fp8(x_fp8)
    assert y_fp8.shape == y_ref.shape and y_fp8.dtype == y_ref.dtype
    assert _cos(y_fp8, y_ref) > 0.998 and not torch.equal(y_fp8, y_ref)  # FP8 rounding, not the same GEMM
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_fp8.backward(g)
    assert _cos(x_fp8.grad, x_ref.grad) > 0.99  # e5m2 gradients: fewer mantissa bits, still close
    assert _cos(fp8.weight.grad, ref.weight.grad) > 0.99
    torch.testing.assert_close(fp8.bias.grad, ref.bias.grad)  # the bias is added outside the FP8 GEMM
    assert fp8.weight.grad.dtype == torch.float32


def test_sizes_the_fp8_kernel_cannot_take_fall_back_to_the_exact_matmul() -> None:
    layer = nn.Linear(20, 32)  # K = 20 is not a multiple of 16
    x = torch.randn(16, 20)
    want = layer(x)
    enable_fp8(nn.Sequential(layer))
    assert torch.equal(layer(x), want)


def test_a_frozen_layer_gets_no_weight_gradient_but_passes_one_on() -> None:
    layer = nn.Linear(32, 32, bias=False)
    layer.weight.requires_grad_(False)
    enable_fp8(nn.Sequential(layer))
    x = torch.randn(16, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and x.grad.abs().sum() > 0


def test_a_block_switches_its_token_matmuls_only_and_keeps_its_state_dict() -> None:
    block = DiTBlock(64, 4, 128, qk_norm=True)
    keys = list(block.state_dict())
    assert enable_fp8(block) == 4  # qkv, proj, SwiGLU in and out; adaLN stays
    assert type(block.ada) is nn.Linear and type(block.attn.qkv) is Float8Linear
    assert list(block.state_dict()) == keys
    assert disable_fp8(block) == 4 and type(block.attn.qkv) is nn.Linear


def test_a_dit_trains_in_fp8_like_in_full_precision() -> None:
    """Forty Adam steps of one small DiT overfitting one clip, from the same init, with and without FP8:
    both losses fall, and they end close (FP8 is a rounding of the same training, not another one)."""
    from model import rectified_flow as rf

    def train(fp8: bool) -> list[float]:
        torch.manual_seed(0)
        model = VideoDiT(dit_config("tiny", width=64, heads=4, depth=2))
        if fp8:
            for block in model.blocks:
                enable_fp8(block)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x0 = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        context = torch.zeros(2, dtype=torch.long)
        losses = []
        for step in range(40):
            g = torch.Generator().manual_seed(step)
            loss, _ = rf.training_loss(lambda x, t, c, m: model(x, t, context, c, m), x0, None, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return losses

    full, fp8 = train(False), train(True)
    first = lambda losses: sum(losses[:5]) / 5  # noqa: E731  (flow times differ per step: average a few)
    last = lambda losses: sum(losses[-5:]) / 5  # noqa: E731
    assert last(full) < 0.7 * first(full) and last(fp8) < 0.7 * first(fp8)
    assert abs(last(fp8) - last(full)) < 0.1 * last(full), (last(full), last(fp8))
    assert fp8 != full


def test_the_training_option_switches_every_stages_blocks(tmp_path) -> None:
    """TrainConfig.fp8 reaches the base's blocks, the upsampler's DiT and the 4D model's frozen base; the
    embedding, output, adaLN and sync layers stay in full precision."""
    import dataclasses

    from pipelines.common.checkpoints import save_checkpoint
    from pipelines.common.config import apply_overrides
    from training.config import presets_for
    from training.stages import build_stage

    base = VideoDiT(dit_config("tiny"))
    ckpt = save_checkpoint(tmp_path / "base", {"stage": "base", "model_config": dataclasses.asdict(base.cfg),
                                               "state_dict": base.state_dict()})
    for name in ("base", "upsampler", "4d"):
        cfg = apply_overrides(presets_for(name)["tiny"](), {"fp8": True, "base_checkpoint": str(ckpt.parent)})
        stage = build_stage(cfg)
        kinds = {n: type(m) for n, m in stage.named_modules() if isinstance(m, nn.Linear)}
        switched = {n for n, k in kinds.items() if k is Float8Linear}
        assert switched and all(".blocks." in n and not n.endswith("ada") for n in switched), (name, switched)
        assert all(k is Float8Linear for n, k in kinds.items() if n.endswith(("qkv", "proj", "w_in", "w_out"))
                   and ".blocks." in n), name
        without = build_stage(apply_overrides(cfg, {"fp8": False}))
        assert not any(isinstance(m, Float8Linear) for m in without.modules())


def test_under_bf16_autocast_the_output_is_bf16_and_master_gradients_stay_fp32() -> None:
    """The training job's setting: fp32 master weights, bf16 autocast (DeepSpeed's torch_autocast)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    enable_fp8(nn.Sequential(layer))
    x = torch.randn(2, 8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    assert layer(torch.empty(0, 64)).shape == (0, 32)  # no rows: the plain matmul, no amax of nothing
    t = torch.randn(64, 16).t()  # a transposed (column-major) input is made row-major for the FP8 GEMM
    assert _cos(layer(t), F.linear(t, layer.weight, layer.bias)) > 0.998
