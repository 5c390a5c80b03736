"""Base video DiT: shapes, conditioning, presets, FLOP formula, clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME, DIT_PRESETS, VideoDiT, dit_config
from model.dit import DiTConfig
from tests.model_helpers import tiny_dit


@pytest.mark.parametrize("frames,height,width", [(1, 8, 8), (3, 8, 12), (5, 16, 4), (2, 12, 20)])
def test_output_shape_any_frames_and_resolution(frames, height, width):
    model = tiny_dit()
    x = torch.randn(2, frames, 3, height, width)
    mask = torch.zeros(2, frames)
    mask[0, 0] = 1
    out = model(x, torch.rand(2), torch.tensor([CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME]), cond=torch.randn_like(x), mask=mask)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_adaln_zero_init_predicts_zero_velocity():
    model = VideoDiT(DIT_PRESETS["tiny"])
    out = model(torch.randn(1, 2, 3, 8, 8), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))


def test_given_frames_enter_clean_and_condition_the_rest():
    model = tiny_dit()
    x = torch.randn(1, 3, 3, 8, 8)
    cond = torch.randn_like(x)
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    t, ctx = torch.rand(1), torch.zeros(1, dtype=torch.long)
    base = model(x, t, ctx, cond, mask)
    # Noise left in a given frame is ignored: the clean frame replaces it.
    x2 = x.clone()
    x2[:, 0] = torch.randn(3, 8, 8)
    torch.testing.assert_close(model(x2, t, ctx, cond, mask), base)
    # Changing the clean frame changes the prediction for the unknown frames.
    cond2 = cond.clone()
    cond2[:, 0] += 1.0
    assert not torch.allclose(model(x, t, ctx, cond2, mask)[:, 1:], base[:, 1:])


def test_context_and_time_change_the_prediction():
    model = tiny_dit()
    x = torch.randn(1, 2, 3, 8, 8)
    t = torch.full((1,), 0.5)
    dyn = model(x, t, torch.tensor([CONTEXT_DYNAMIC]))
    assert not torch.allclose(dyn, model(x, t, torch.tensor([CONTEXT_FREEZE_TIME])))
    assert not torch.allclose(dyn, model(x, t * 0.5, torch.tensor([CONTEXT_DYNAMIC])))


def test_text_conditioning_interface():
    model = tiny_dit(text_dim=16)
    x = torch.randn(2, 2, 3, 8, 8)
    t, ctx = torch.rand(2), torch.zeros(2, dtype=torch.long)
    text = torch.randn(2, 5, 16)
    assert not torch.allclose(model(x, t, ctx, text=text), model(x, t, ctx))
    with pytest.raises(ValueError, match="text_dim=0"):
        tiny_dit()(x, t, ctx, text=text)


def test_bad_inputs_give_clear_errors():
    model = tiny_dit()
    t, ctx = torch.rand(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 2, 3, 9, 8), t, ctx)
    with pytest.raises(ValueError, match="mask must be"):
        model(torch.randn(1, 2, 3, 8, 8), t, ctx, mask=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("huge")


def test_checkpointing_gives_the_same_gradients():
    x = torch.randn(1, 2, 3, 8, 8)
    t, ctx = torch.rand(1), torch.zeros(1, dtype=torch.long)
    grads = []
    for ckpt in (False, True):
        model = tiny_dit(checkpointing=ckpt)
        model(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_paper_preset_is_about_600m_parameters():
    with torch.device("meta"):
        model = VideoDiT(DIT_PRESETS["paper"])
    assert len(model.blocks) == 24 and model.cfg.width == 1024
    assert 570e6 < model.num_parameters() < 630e6


def test_bias_free_blocks_halve_the_tensors_and_old_configs_keep_biases():
    """bias=False (the paper preset) drops the blocks' linear biases only; a config saved before the field
    existed (no "bias" key) builds the model with biases, so its state dict loads."""
    free = VideoDiT(dit_config("tiny", bias=False))
    full = VideoDiT(dit_config("tiny"))
    per_block = lambda m: len(list(m.blocks[0].parameters()))  # noqa: E731
    assert per_block(full) == 12 and per_block(free) == 7  # 5 linears x (weight, bias) + 2 qk norms
    assert not any(n.startswith("blocks.") and n.endswith(".bias") for n, _ in free.named_parameters())
    assert free.patch_embed.bias is not None  # the embedding and output layers keep theirs
    out = free(torch.randn(1, 2, 3, 8, 8), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero still starts at zero velocity
    old = {k: v for k, v in dataclasses.asdict(full.cfg).items() if k != "bias"}
    VideoDiT(DiTConfig(**old)).load_state_dict(full.state_dict())
    assert DIT_PRESETS["paper"].bias is False


def test_flop_formula_matches_torch_flop_counter():
    model = VideoDiT(dit_config("tiny", width=64, heads=4, depth=3))
    x = torch.randn(2, 4, 3, 16, 24)
    # The math backend runs attention as plain matmuls, which the counter sees on CPU.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, torch.rand(2), torch.zeros(2, dtype=torch.long))
    counted = counter.get_total_flops() / 2
    assert counted == pytest.approx(model.flops_per_sample(4, 16, 24), rel=0.03)


def test_text_is_pooled_over_real_tokens_and_dropped_to_a_null_embedding():
    from model.dit import dit_config
    torch.manual_seed(0)
    model = VideoDiT(dit_config("tiny", text_dim=8, text_dropout=0.0)).eval()
    with torch.no_grad():
        model.null_text.normal_()
    t, ctx = torch.rand(2), torch.zeros(2, dtype=torch.long)
    text = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = text.clone()
    padded[0, 2:] = 100.0  # padding content must not matter once masked
    c1 = model.time_context_embedding(t, ctx, text, mask)
    c2 = model.time_context_embedding(t, ctx, padded, mask)
    torch.testing.assert_close(c1, c2)
    assert not torch.allclose(c1, model.time_context_embedding(t, ctx, padded))  # unmasked mean is diluted
    # no text = the learned null embedding, which dropout also uses in training
    null = model.time_context_embedding(t, ctx, None)
    model.cfg.text_dropout = 1.0
    model.train()
    torch.testing.assert_close(model.time_context_embedding(t, ctx, text, mask), null)


def test_tuned_compilation_passes_inductor_options_every_torch_knows(monkeypatch):
    """``compile_blocks(tune=True)`` compiles every block (and a 4D model's sync layers) with TUNED_COMPILE as
    inductor options, which torch.compile accepts (it checks names and types when called, on any device); a
    compile mode becomes its own options with the tuning added, since torch.compile takes one or the other."""
    from model.dit import TUNED_COMPILE, compile_kwargs
    from model.fourd import FourDConfig, FourDModel

    assert TUNED_COMPILE
    torch.nn.Linear(2, 2).compile(**compile_kwargs(True, {"fullgraph": True}))  # raises on an unknown option
    assert compile_kwargs(False, {"mode": "max-autotune-no-cudagraphs"}) == {"mode": "max-autotune-no-cudagraphs"}
    assert compile_kwargs(True, {}) == {"options": TUNED_COMPILE}
    assert compile_kwargs(True, {"mode": "default", "options": {"trace.enabled": True}}) == \
        {"options": {**TUNED_COMPILE, "trace.enabled": True}}
    tuned_autotune = compile_kwargs(True, {"mode": "max-autotune-no-cudagraphs"})
    assert set(tuned_autotune) == {"options"} and tuned_autotune["options"]["max_autotune"] is True
    torch.nn.Linear(2, 2).compile(**tuned_autotune)
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    model = FourDModel(tiny_dit(), FourDConfig(sync="soft"))
    model.compile_blocks(tune=True)
    blocks = len(model.base.blocks)
    assert [name for name, _ in calls][:blocks] == ["DiTBlock"] * blocks and len(calls) > blocks  # + sync layers
    assert all(kw == {"options": TUNED_COMPILE} for _, kw in calls)
    calls.clear()
    model.compile_blocks()
    assert calls and all(kw == {} for _, kw in calls)
