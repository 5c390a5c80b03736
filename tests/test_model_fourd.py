"""4D two-stream model: shapes, what each sync variant is at initialisation, frozen base."""

from __future__ import annotations

import copy

import pytest
import torch

from model import CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME, SYNC_VARIANTS, FourDConfig, FourDModel, grid_condition_mask
from model import rectified_flow as rf
from model.fourd import SYNCS, HardSync, Passes, SyncVariant, schedule_weight
from tests.model_helpers import tiny_dit


def grid_inputs(B=2, V=3, T=4, H=8, W=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, T, 3, H, W, generator=g)
    cond = torch.randn(B, V, T, 3, H, W, generator=g)
    return x, torch.rand(B, generator=g), cond, grid_condition_mask(B, V, T)


@pytest.mark.parametrize("sync", SYNC_VARIANTS)
@pytest.mark.parametrize("V,T,H,W", [(2, 3, 8, 8), (4, 1, 12, 4)])
def test_output_shape_any_grid(sync, V, T, H, W):
    model = FourDModel(tiny_dit(), FourDConfig(sync=sync))
    x, t, cond, mask = grid_inputs(2, V, T, H, W)
    out = model(x, t, cond, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_grid_condition_mask_is_first_row_and_column():
    mask = grid_condition_mask(1, 3, 4)[0]
    assert mask[0].eq(1).all() and mask[:, 0].eq(1).all() and mask[1:, 1:].eq(0).all()


def test_soft_sync_zero_init_is_the_base_model_along_each_axis():
    base = tiny_dit()
    model = FourDModel(base, FourDConfig(sync="soft", soft_init="zero"))
    x, t, cond, mask = grid_inputs()
    B, V, T = mask.shape
    out_view, out_time = model(x, t, cond, mask, return_streams=True)
    freeze = torch.full((B,), CONTEXT_FREEZE_TIME)
    dynamic = torch.full((B,), CONTEXT_DYNAMIC)
    for ti in range(T):  # view stream: each time column is a freeze-time video over V views
        ref = base(x[:, :, ti], t, freeze, cond[:, :, ti], mask[:, :, ti])
        torch.testing.assert_close(out_view[:, :, ti], ref)
    for vi in range(V):  # time stream: each view row is a dynamic video over T times
        ref = base(x[:, vi], t, dynamic, cond[:, vi], mask[:, vi])
        torch.testing.assert_close(out_time[:, vi], ref)
    torch.testing.assert_close(model(x, t, cond, mask), 0.5 * (out_view + out_time))


@pytest.mark.parametrize("full", [True, False])
def test_hard_sync_at_init_is_the_average_of_the_streams(full):
    sync = HardSync(32, full=full)
    yv, yt = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    torch.testing.assert_close(sync(yv, yt, torch.randn(2, 32)), 0.5 * (yv + yt))
    # The whole model: learned hard sync at init equals the training-free average of Eq. 12.
    base = tiny_dit()
    x, t, cond, mask = grid_inputs()
    variant = "hard" if full else "hard_channel"
    hard = FourDModel(base, FourDConfig(sync=variant))(x, t, cond, mask)
    torch.testing.assert_close(hard, FourDModel(base, FourDConfig(sync="train_free_hard"))(x, t, cond, mask))


def test_hard_sync_is_a_full_linear_map_modulated_by_flow_time():
    """Eq. 8's W^v, W^t are linear maps over channels (I/2 at init), not per-channel scales."""
    sync = HardSync(16, full=True)
    assert sync.w_view.weight.shape == (16, 16)
    torch.testing.assert_close(sync.w_view.weight, torch.eye(16) * 0.5)
    yv, yt, temb = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    sync(yv, yt, temb).pow(2).sum().backward()
    off_diagonal = sync.w_view.weight.grad - torch.diag(torch.diagonal(sync.w_view.weight.grad))
    assert off_diagonal.abs().sum() > 0  # channels mix: a per-channel weight would have no such gradient
    assert sync.time_mod.weight.grad.abs().sum() > 0  # the flow-time modulation is trained too
    with torch.no_grad():  # and it acts: a non-zero modulation changes the output with the flow time
        sync.time_mod.weight.normal_()
    assert not torch.allclose(sync(yv, yt, temb), sync(yv, yt, -temb))
    channel = HardSync(16, full=False)
    assert sum(p.numel() for p in channel.parameters()) < sum(p.numel() for p in sync.parameters())


def test_train_free_sequential_is_the_sequential_variant_before_training():
    base = tiny_dit()
    x, t, cond, mask = grid_inputs()
    seq = FourDModel(base, FourDConfig(sync="sequential"))
    free = FourDModel(base, FourDConfig(sync="train_free_sequential"))
    assert not free.sync_parameters() and seq.sync_parameters()
    torch.testing.assert_close(seq(x, t, cond, mask), free(x, t, cond, mask))
    with torch.no_grad():  # once the copied attention moves, the trained variant differs
        seq.time_attn[0].proj.weight.add_(0.1)
    assert not torch.allclose(seq(x, t, cond, mask), free(x, t, cond, mask))


def test_soft_schedule_init_is_the_training_free_soft_sync():
    base = tiny_dit()
    x, t, cond, mask = grid_inputs()
    soft = FourDModel(base, FourDConfig(sync="soft", soft_init="schedule"))(x, t, cond, mask)
    free = FourDModel(base, FourDConfig(sync="train_free_soft"))(x, t, cond, mask)
    torch.testing.assert_close(soft, free, atol=1e-5, rtol=1e-5)
    assert schedule_weight(0, 24) == pytest.approx(0.1 + 0.4 / 24) and schedule_weight(23, 24) == pytest.approx(0.5)


@pytest.mark.parametrize("sync", ["soft", "hard", "sequential"])
def test_only_sync_parameters_receive_gradients(sync):
    model = FourDModel(tiny_dit(), FourDConfig(sync=sync))
    trainable = model.sync_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for p in model.base.parameters())
    x, t, cond, mask = grid_inputs(1, 2, 3)
    loss, _ = rf.training_loss(lambda x_t, tt, c, m: model(x_t, tt, c, m), x, mask)
    loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum() for p in trainable) > 0


def test_train_free_variants_have_nothing_to_train():
    for sync in ("train_free_hard", "train_free_soft"):
        assert FourDModel(tiny_dit(), FourDConfig(sync=sync)).sync_parameters() == []


def test_bad_config_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown sync variant"):
        FourDConfig(sync="average")
    with pytest.raises(ValueError, match="soft_init"):
        FourDConfig(soft_init="ones")
    model = FourDModel(tiny_dit())
    x, t, cond, mask = grid_inputs()
    with pytest.raises(ValueError, match=r"\[B, V, T, C, H, W\]"):
        model(x[:, 0], t)
    with pytest.raises(ValueError, match="mask must be"):
        model(x, t, cond, mask[:, :1])


def test_flop_formula_counts_both_streams_and_sync():
    with torch.device("meta"):
        from model import DIT_PRESETS, VideoDiT
        base = VideoDiT(DIT_PRESETS["paper"])
        soft, hard = FourDModel(base, FourDConfig("soft")), FourDModel(base, FourDConfig("hard"))
    # One grid of V x T frames costs the two streams (each ~ V*T frames through the base), plus sync.
    per_frame = base.flops_per_sample(1, 72, 128)
    assert 2 * 64 * per_frame < hard.flops_per_sample(8, 8, 72, 128) < soft.flops_per_sample(8, 8, 72, 128)
    assert soft.train_flops_per_sample(8, 8, 72, 128) > 2 * soft.flops_per_sample(8, 8, 72, 128)


@pytest.mark.parametrize("sync", ["soft", "hard"])
def test_flop_formula_matches_torch_flop_counter(sync):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = FourDModel(tiny_dit(width=64, heads=4), FourDConfig(sync=sync))
    x, t, cond, mask = grid_inputs(1, 3, 2, 16, 8)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, cond, mask)
    assert counter.get_total_flops() == pytest.approx(model.flops_per_sample(3, 2, 16, 8), rel=0.03)


def test_a_sync_variant_is_one_registered_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extending.md: a new variant is a SYNCS entry (its step, and its layers if trained); the model,
    its FLOP count and its trainable parameters follow from the entry alone."""
    import torch.nn as nn

    def step(model, l, block, xv, xt, p: Passes):
        yv, yt = p.view(block, xv), p.time(block, xt)
        g = torch.sigmoid(model.hard[l].weight)  # a learned per-layer mix (stored under "hard")
        return g * yv + (1 - g) * yt, g * yt + (1 - g) * yv

    def build(base, cfg):
        return nn.ModuleList(nn.Linear(1, 1, bias=False) for _ in base.blocks)
    monkeypatch.setitem(SYNCS, "gated", SyncVariant(step, "hard", build, flops_per_token=lambda w: 4.0 * w))
    base = tiny_dit()
    model = FourDModel(base, FourDConfig(sync="gated"))
    assert [p.shape for p in model.sync_parameters()] == [torch.Size([1, 1])] * base.cfg.depth
    x, t, cond, mask = grid_inputs()
    out = model(x, t, cond, mask)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sync_parameters())
    B, V, T, C, H, W = x.shape
    tokens = V * T * (H // base.cfg.patch_size) * (W // base.cfg.patch_size)
    plain = FourDModel(tiny_dit(), FourDConfig(sync="train_free_hard")).flops_per_sample(V, T, H, W)
    assert model.flops_per_sample(V, T, H, W) - plain == pytest.approx(base.cfg.depth * tokens * 4.0 * base.cfg.width)
    with pytest.raises(ValueError, match="unknown sync variant"):
        FourDConfig(sync="nope")


def test_tokenwise_maps_and_layouts_follow_memory_order():
    from model.fourd import in_layout, memory_order, tokenwise
    x = torch.randn(2, 4, 3, 5, 6).transpose(1, 2)  # [2, 3, 4, 5, 6] laid out as the view pass leaves it
    assert memory_order(x) == [0, 2, 1, 3, 4] and not x.is_contiguous()
    lin = torch.nn.Linear(6, 7)
    seen = []
    out = tokenwise(lambda y: seen.append(y) or lin(y), x)
    torch.testing.assert_close(out, lin(x))
    assert seen[0].is_contiguous() and seen[0].data_ptr() == x.data_ptr()  # the GEMM read x where it lies
    y = in_layout(x + 1, x)
    torch.testing.assert_close(y, x + 1)
    assert memory_order(y) == memory_order(x) and y.transpose(1, 2).is_contiguous()
    assert in_layout(x, x).data_ptr() == x.data_ptr()  # already laid out: no copy
    plain = torch.randn(2, 3, 6)
    assert memory_order(in_layout(plain, plain)) == [0, 1, 2]


@pytest.mark.parametrize("sync,compiled", [("soft", False), ("soft", True), ("hard", False)])
def test_sync_layers_keep_each_stream_and_its_gradient_in_its_pass_layout(sync, compiled):
    """The view pass leaves its tokens time column outermost (a transposed view of the block's output); the sync
    layer writes each stream back as its next pass reads it, and the view stream's gradient the same way even
    when the gradient arriving is laid out otherwise, so neither pass regroups by a copy, forward or backward."""
    from model.fourd import SoftSync, memory_order
    torch.manual_seed(0)
    layer = SoftSync(16, 0.3) if sync == "soft" else HardSync(16)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = copy.deepcopy(layer)
    if compiled:
        layer.compile()
    yv_mem = torch.randn(2, 4, 3, 5, 16, requires_grad=True)  # [B, T, V, n, w]: the view pass's memory
    yv = yv_mem.transpose(1, 2)  # [B, V, T, n, w] indexed like yt
    yt = torch.randn(2, 3, 4, 5, 16, requires_grad=True)
    temb = torch.randn(2, 16)
    out = layer(yv, yt, temb)
    expect = ref(yv.detach().contiguous(), yt.detach(), temb)
    outs, expects = (out, expect) if sync == "soft" else ((out,), (expect,))
    for o, e in zip(outs, expects):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    if sync == "soft":
        assert memory_order(out[0]) == [0, 2, 1, 3, 4] and out[1].is_contiguous()
    else:
        assert out.is_contiguous()  # the merged stream, laid out for the time pass
    seen = []
    yv.register_hook(lambda g: seen.append(memory_order(g)))
    grads = [torch.randn(o.shape) for o in outs]  # contiguous: laid out otherwise than the view stream
    torch.autograd.backward(list(outs), grads)
    assert seen == [[0, 2, 1, 3, 4]]  # so the view pass's input gradient is a view, not a copy
    assert yv_mem.grad is not None and yt.grad is not None


def test_compiled_4d_step_regroups_the_streams_without_copies_per_layer():
    """Compiled, the regrouping between the view and the time pass fuses into the sync layer's kernels: the
    eager copies of a training step do not grow with depth (they were four clones a layer), and the compiled
    model computes what the eager one does."""
    from collections import Counter

    from torch.profiler import profile

    def clones(depth):
        model = FourDModel(tiny_dit(depth=depth), FourDConfig(sync="soft"))
        eager = FourDModel(tiny_dit(depth=depth), FourDConfig(sync="soft"))
        with torch.no_grad():
            for p in model.sync_parameters():
                p.normal_(0, 0.05)
        eager.load_state_dict(model.state_dict())
        model.compile_blocks()
        x, t, cond, mask = grid_inputs()

        def step(m):
            out = m(x, t, cond, mask)
            out.square().mean().backward()
            return out
        step(model)
        with profile() as prof:
            out = step(model)
        ref = step(eager)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for p, q in zip(model.sync_parameters(), eager.sync_parameters()):
            torch.testing.assert_close(p.grad, 2 * q.grad, atol=1e-4, rtol=1e-3)  # model stepped twice
        return Counter(e.name for e in prof.events())["aten::clone"]
    assert clones(2) == clones(4)
