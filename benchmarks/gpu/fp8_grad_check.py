"""Do the compiled blocks' FP8 GEMMs give the gradients bf16 gives, on the GPU? (model/fp8.py)

    python benchmarks/gpu/fp8_grad_check.py [--width 1024] [--checkpoint weights/proof/base.pt.gz] [--device cpu]

One DiTBlock at the paper preset's width (so the same GEMMs run in FP8 as in the job), random weights with the
adaLN map non-zero (at adaLN-Zero's init the blocks' gradients are all zero and would hide a missing one),
bf16 autocast, eager and torch.compile'd, trained (``Float8Linear``) and frozen (``FrozenFloat8Linear``, the 4D
stage's base), each against the bf16 block: the output's and every gradient's cosine similarity, and how many
FP8 GEMMs each pass ran (profiler). ``--checkpoint`` adds a whole trained model and its masked training loss.
Exits 1 if a gradient is missing, non-finite or far off.

Why: compiled code on the GPU machine (torch 2.11) can lose a gradient that eager code and the CI's newer torch
keep. Session 16 found two such cases with an experimental recipe (branch exp/fp8-rowwise-trained,
docs/performance.md): a no-op ``.to()`` on an autograd Function's output dropped every gradient through it
(call 1's kernel table showed it; this check, written then, reproduces it;
the shipped recipes have none), and non-finite gradient norms that only the training job
showed (benchmarks/gpu/ab_train_device.sh with AB_STAGE=base).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model.dit import DiTBlock, rope_3d  # noqa: E402
from model.fp8 import enable_fp8  # noqa: E402


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def run(block: torch.nn.Module, fn, x: torch.Tensor, c: torch.Tensor, rope, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """fn (the block or its compiled twin) forward and backward; the residual is taken off the output and the
    input gradient, so what is compared is the block's own branches."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = fn(x, c, rope)
    y.float().backward(g)
    out = {"output": (y.detach() - x.detach()).float(), "input grad": (x.grad - g).float()}
    out.update({n: p.grad.float() for n, p in block.named_parameters() if p.grad is not None})
    return out


def model_check(spec: str, dev: str, batch: int = 4) -> int:
    """The same comparison on a whole trained model (e.g. weights/proof/base.pt.gz) and its training loss: a
    trained model's activations and gradients, not random ones."""
    from model import rectified_flow as rf
    from model.dit import DiTConfig, VideoDiT
    from pipelines.common.checkpoints import load_checkpoint
    ck = load_checkpoint(spec)
    ref = VideoDiT(DiTConfig(**ck["model_config"]))
    ref.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
    ref = ref.to(dev)
    p = ref.cfg.patch_size
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 8, 3, 16 * p, 16 * p, generator=gen) * 2 - 1).to(dev)
    context = torch.zeros(batch, dtype=torch.long, device=dev)
    # the first frame given, as the job's masked conditioning gives some: their tokens' gradients are exact zeros
    mask = torch.zeros(batch, 8, dtype=torch.bool, device=dev)
    mask[:, 0] = True

    def grads(model: VideoDiT) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss, _ = rf.training_loss(lambda x, t, c, m: model(x, t, context, c, m), x0, mask,
                                       generator=torch.Generator(device=dev).manual_seed(1),
                                       shift=model.cfg.flow_shift)  # the flow times the job trains on
        loss.backward()
        out = {"loss": loss.detach().float().reshape(1)}
        out.update({n: q.grad.float() for n, q in model.named_parameters() if q.grad is not None})
        return out

    want = grads(ref)
    bad = 0
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(ref)
        switched = sum(enable_fp8(b) for b in model.blocks)
        print(f"{mode}: {switched} layers in FP8")
        if mode == "compiled":
            model.compile_blocks()
            grads(model)
        got = grads(model)
        missing = sorted(set(want) - set(got))
        worst = min((_cos(got[n], w) if n != "loss" else 1.0, n) for n, w in want.items() if n in got)
        nonfinite = [n for n, t in got.items() if not torch.isfinite(t).all()]
        # only non-finite or missing gradients fail here: with random frames, gradients that sum over every
        # token (the output bias) are small and FP8-noisy, eager as much as compiled (cosine 0.86 at a batch of 64)
        bad += bool(nonfinite or missing or not switched)
        print(f"  loss {float(got['loss']):.5f} (bf16 {float(want['loss']):.5f}); lowest gradient cosine "
              f"{worst[0]:.4f} ({worst[1]}); non-finite gradients: {', '.join(nonfinite[:6]) or 'none'}; "
              f"missing: {', '.join(missing[:6]) or 'none'}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--device", default="cuda", help="cpu runs the same check, slowly (no FP8 tensor cores)")
    ap.add_argument("--checkpoint", default="", help="also check this base checkpoint's whole model, trained weights")
    ap.add_argument("--batch", type=int, default=4, help="clips of 8 frames in --checkpoint's batch (the proof job: 64)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = args.device
    heads = args.width // 128
    ref = DiTBlock(args.width, heads, int(args.width * 4.5), qk_norm=True, bias=False).to(dev)
    with torch.no_grad():
        for p in ref.ada.parameters():
            p.normal_(0, 0.02)
    rows, cols = 9, 16
    rope = tuple(t.to(dev) for t in rope_3d(args.frames, rows, cols, args.width // heads))
    x = torch.randn(4, args.frames * rows * cols, args.width, device=dev)
    c = torch.randn(4, args.width, device=dev)
    g = torch.randn_like(x)
    want = run(ref, ref, x, c, rope, g)
    bad = 0
    for kind in ("trained", "frozen"):
        for mode in ("eager", "compiled"):
            block = copy.deepcopy(ref).requires_grad_(kind == "trained")
            switched = enable_fp8(block)
            print(f"{kind}, {mode}: {switched} layers in FP8")
            fn = torch.compile(block) if mode == "compiled" else block
            run(block, fn, x, c, rope, g)  # compile / warm up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                got = run(block, fn, x, c, rope, g)
            fp8_gemms = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")
            print(f"  aten::_scaled_mm calls in one forward and backward: {fp8_gemms}")
            # no FP8 GEMM at all would pass every cosine below (bf16 against bf16): that is a failure too
            bad += not (switched and fp8_gemms)
            for name, ref_t in want.items():
                if kind == "frozen" and name not in ("output", "input grad"):
                    continue  # a frozen block has no parameter gradients
                t = got.get(name)
                cos = _cos(t, ref_t) if t is not None else float("nan")
                ok = t is not None and bool(torch.isfinite(t).all()) and cos > 0.99 \
                    and float(t.norm()) > 0.5 * float(ref_t.norm())
                bad += not ok
                print(f"  {name:24s} cos {cos:.5f}  norm {float(t.norm()) if t is not None else 0:.4g} "
                      f"(bf16 {float(ref_t.norm()):.4g}){'' if ok else '  <-- WRONG'}")
    if args.checkpoint:
        bad += model_check(args.checkpoint, args.device, args.batch)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
