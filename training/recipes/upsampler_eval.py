"""Score the x4 upsampler on held-out clips against plain bicubic upsampling of the same low-res frames.

    python -m training.recipes.upsampler_eval --checkpoint outputs/proof/upsampler/checkpoint_final \\
        --grids outputs/proof/data/upsampler_heldout --out outputs/proof/eval_upsampler

Each held-out grid's rows are the high-resolution truth; the low-res input is their 4x box filter (what the
base model's resolution is to the upsampler's). Reports PSNR and SSIM (which favour blur) and the
high-frequency energy relative to the truth (1 = as sharp as the truth), per method, with per-clip spread,
and a picture: low-res (nearest), bicubic, upsampler, truth.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file from a checkout without install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipelines.common.config import doc, parse_config, run_cli, write_resolved  # noqa: E402
from pipelines.common.errors import UserError  # noqa: E402


@dataclass
class UpsamplerEvalConfig:
    checkpoint: str = doc("", "upsampler checkpoint (checkpoint_final folder, model.pt or runs:/<id>)")
    grids: str = doc("", "held-out grid shards at the high resolution")
    out: str = doc("outputs/eval_upsampler", "report folder")
    max_grids: int = doc(16, "held-out grids (their rows are the clips)")
    steps: int = doc(0, "upsampler sampling steps (0 = the model's own default, saved with it)")
    aug_level: float = doc(-1.0, "noise level put on the low-res condition before sampling (-1 = the model's "
                           "own sample_aug_level); the held-out low-res frames are clean, so 0 scores the model "
                           "on what it is given")
    seed: int = doc(0, "noise seed")
    device: str = doc("auto", "cuda, cpu or auto")


def evaluate_upsampler(cfg: UpsamplerEvalConfig) -> dict:
    from pipelines.common.shards import iter_tar_samples
    from pipelines.common.visuals import contact_sheet, to_uint8
    from pipelines.eval_metrics import high_frequency_energy, psnr, spread, ssim
    from pipelines.common.checkpoints import load_checkpoint, upsampler_from_checkpoint
    from pipelines.common.shards import LazyGrid, resolve_shards, to_tensor
    import random

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    ckpt = load_checkpoint(cfg.checkpoint)
    model = upsampler_from_checkpoint(ckpt, cfg.checkpoint).to(device).eval()
    train = ckpt.get("config", {}).get("data", {})
    size = (int(train.get("height", 256)), int(train.get("width", 256)))
    seen = set(ckpt.get("data_items", {}).get("items", []))

    grids = []
    for shard in resolve_shards(cfg.grids):
        for key, files in iter_tar_samples(shard):
            g = LazyGrid(files)
            if g.meta.get("item_id") in seen:
                raise UserError(f"held-out grid {key} ({g.meta.get('item_id')}) was in the upsampler's training "
                                "data; evaluate on grids made from other seeds")
            grids.append(g)
            if len(grids) >= cfg.max_grids:
                break
        if len(grids) >= cfg.max_grids:
            break
    if not grids:
        raise UserError(f"no grids in '{cfg.grids}'")

    per: dict[str, dict[str, list[float]]] = {m: {"psnr": [], "ssim": [], "hf_ratio": []} for m in ("bicubic", "upsampler")}
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the sampler draws its noise on the model's device
    sheet = None
    for i, g in enumerate(grids):
        V, T = g.shape
        truth = to_tensor(g.cells(range(V), range(T)), *size, "white", random.Random(0))  # rows: [V, T, 3, H, W]
        low = F.avg_pool2d(truth.flatten(0, 1), 4).view(V, T, 3, size[0] // 4, size[1] // 4)
        bicubic = model.bicubic(low)  # the baseline, and the residual model's starting point
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            up = model.upsample(low.to(device), steps=cfg.steps or None, generator=gen,
                                aug_level=None if cfg.aug_level < 0 else cfg.aug_level).float().cpu()
        t01 = (truth + 1) / 2
        for name, out in (("bicubic", bicubic), ("upsampler", up)):
            o01 = (out + 1) / 2
            per[name]["psnr"] += psnr(o01, t01).flatten().tolist()
            per[name]["ssim"] += ssim(o01, t01).flatten().tolist()
            hf_t = high_frequency_energy(t01).flatten()
            per[name]["hf_ratio"] += (high_frequency_energy(o01).flatten() / hf_t.clamp_min(1e-12)).tolist()
        if i == 0:
            nearest = F.interpolate(low.flatten(0, 1), scale_factor=4, mode="nearest").view_as(truth)
            sheet = torch.stack([nearest[0], bicubic[0], up[0], truth[0]])  # rows: low-res, bicubic, ours, truth
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    contact_sheet(to_uint8(sheet), out / "upsampler_vs_bicubic.png")
    results = {m: {k: spread(v) for k, v in d.items()} for m, d in per.items()}
    # Paired: on how many frames the upsampler beats bicubic of the same low-res frame (a mean can hide a
    # few large wins). Sharpness wins by being nearer the truth's (|log ratio| smaller), so added noise or
    # over-sharpening past the truth does not count as a win.
    near = {m: [abs(math.log(max(r, 1e-12))) for r in per[m]["hf_ratio"]] for m in per}
    results["upsampler_wins"] = {k: sum(u > b for u, b in zip(per["upsampler"][k], per["bicubic"][k]))
                                 / len(per["bicubic"][k]) for k in ("psnr", "ssim")}
    results["upsampler_wins"]["hf_ratio"] = sum(u < b for u, b in zip(near["upsampler"], near["bicubic"])) / len(near["bicubic"])
    results["clips"] = sum(g.shape[0] for g in grids)
    results["frames"] = len(per["bicubic"]["psnr"])
    results["seconds"] = time.time() - t0
    results["steps"] = cfg.steps or model.cfg.steps
    results["aug_level"] = model.cfg.sample_aug_level if cfg.aug_level < 0 else cfg.aug_level
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for m in ("bicubic", "upsampler"):
        r = results[m]
        print(f"[eval upsampler] {m}: PSNR {r['psnr']['mean']:.2f} dB, SSIM {r['ssim']['mean']:.4f}, "
              f"HF energy {r['hf_ratio']['mean']:.2f} x truth over {results['frames']} frames", flush=True)
    wins = results["upsampler_wins"]
    print(f"[eval upsampler] {results['steps']} steps; frames where the upsampler beats bicubic: PSNR "
          f"{wins['psnr']:.0%}, SSIM {wins['ssim']:.0%}, sharpness {wins['hf_ratio']:.0%}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(UpsamplerEvalConfig, {"default": UpsamplerEvalConfig}, argv,
                          description=__doc__.split("\n\n")[0], default_preset="default")
    if not (cfg.checkpoint and cfg.grids):
        raise UserError("give --checkpoint (an upsampler) and --grids (held-out high-resolution grids)")
    if cfg.steps < 0:
        raise UserError(f"--steps must be 0 (the model's own) or more, got {cfg.steps}")
    if cfg.aug_level != -1 and not 0 <= cfg.aug_level <= 1:
        raise UserError(f"--aug-level must be in [0, 1] (or -1 for the model's own), got {cfg.aug_level}")
    write_resolved(cfg, cfg.out)
    evaluate_upsampler(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
