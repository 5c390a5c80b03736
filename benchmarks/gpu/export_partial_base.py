"""Export a base model from a training run's latest Ray Train checkpoint (its EMA weights), as a slim bf16
base.pt.gz: for a lent machine whose lease ends before the job does (docs/results.md, run 7). The model config
and data geometry come from the checkpoint the run started from (``--init-from``); the step is recorded.

    python benchmarks/gpu/export_partial_base.py <run folder> <start checkpoint> <out file>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipelines.common.checkpoints import load_checkpoint, save_checkpoint_file, state_digest  # noqa: E402


def main(run: str, start: str, out: str) -> None:
    ckpts = [c for c in (Path(run) / "ray").glob("*/checkpoint_*")
             if (c / "ema.pt").is_file() and (c / "train_state.json").is_file()]
    if not ckpts:
        raise SystemExit(f"error: no Ray checkpoint with ema.pt under {run}/ray")
    latest = max(ckpts, key=lambda c: json.loads((c / "train_state.json").read_text())["step"])
    ema = torch.load(latest / "ema.pt", map_location="cpu")
    payload = load_checkpoint(start)
    sd = payload["state_dict"]
    taken: set[str] = set()
    for name, value in ema.items():
        key = name.removeprefix("net.").replace("_orig_mod.", "")
        if key in sd:
            sd[key] = value.to(torch.bfloat16).contiguous()
            taken.add(key)
    if taken != set(sd):
        raise SystemExit(f"error: the EMA of {latest} covers {len(taken)} of the model's {len(sd)} tensors")
    from training.loop import data_items
    state = json.loads((latest / "train_state.json").read_text())  # step, samples seen
    payload.update(digest=state_digest(sd), ema=True, partial_from=str(latest), partial_state=state,
                   data_items=data_items(Path(run) / "data_items.json"))
    size = save_checkpoint_file(Path(out), payload)
    print(f"exported {latest.name} ({state}) -> {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
