"""Streaming training data from the data jobs' WebDataset shards (docs/data_format.md).

Each Ray Train worker reads its own slice of the shards, in an order fixed by
(seed, epoch), through a seeded shuffle buffer. Its position is two numbers per
source (epoch, samples consumed), so a resumed run skips exactly the samples it
already trained on (without decoding them) and continues bit-identically.
Sources are mixed by weight with a counter-seeded draw, which resumes the same way.
"""

from __future__ import annotations

import glob
import io
import json
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.common.errors import UserError
from pipelines.common.shards import iter_tar_samples
from training.config import DataConfig

CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME = 0, 1
_BACKGROUNDS = {"white": 1.0, "black": 0.0, "gray": 0.5}


def resolve_shards(spec: str) -> list[str]:
    """A job output folder, a shards folder or a glob -> sorted list of tar files (or a clear error)."""
    p = Path(spec)
    if p.is_dir():
        for sub in ("shards", ""):
            found = sorted(str(f) for f in (p / sub).glob("shard-*.tar"))
            if found:
                return found
        found = sorted(str(f) for f in p.glob("*.tar"))
    else:
        found = sorted(glob.glob(spec))
    if not found:
        raise UserError(f"no shards found at '{spec}'; point data.grids/data.clips at a render or pseudo-4D output "
                        "folder (or its shards/ or clips/ folder), or run the data jobs first")
    return found


# ---------------------------------------------------------------- decoding

def _decode_png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(img.convert("RGBA") if img.mode in ("RGBA", "LA", "P") else img.convert("RGB"))


class LazyGrid:
    """A sample's frames, decoded only when a cell is asked for (a base clip needs one row of a grid)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.meta = json.loads(files["meta.json"]) if "meta.json" in files else {}
        names = sorted(k for k in files if k[0] in "vf" and k.endswith((".png", ".jpg")) and k.count(".") == 1)
        if not names:
            raise ValueError("sample has no frames")
        self.ext = names[0].rsplit(".", 1)[1]
        if names[0][0] == "f":  # a clip: f{TT}.png, one view
            self.views, self.times = [0], sorted(int(n[1:3]) for n in names)
            self.name = lambda v, t: f"f{t:02d}.{self.ext}"
        else:
            self.views = sorted({int(n[1:3]) for n in names})
            self.times = sorted({int(n[4:6]) for n in names})
            self.name = lambda v, t: f"v{v:02d}t{t:02d}.{self.ext}"

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.views), len(self.times)

    def cells(self, vs: range | list[int], ts: range | list[int]) -> np.ndarray:
        """uint8 [len(vs), len(ts), H, W, C] for view/time positions (0-based indices into the grid)."""
        return np.stack([np.stack([_decode_png(self.files[self.name(self.views[v], self.times[t])]) for t in ts])
                         for v in vs])


def decode_grid(files: dict[str, bytes]) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample members -> (uint8 [V, T, H, W, C], meta); clips come back as V = 1."""
    g = LazyGrid(files)
    return g.cells(range(g.shape[0]), range(g.shape[1])), g.meta


def to_tensor(frames: np.ndarray, height: int, width: int, background: str, rng: random.Random) -> torch.Tensor:
    """uint8 [..., H, W, C] -> float [..., 3, height, width] in [-1, 1]; RGBA composited, aspect kept."""
    lead = frames.shape[:-3]
    x = torch.from_numpy(np.ascontiguousarray(frames)).reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()
    x = x / 255.0
    if x.shape[1] == 4:
        bg = rng.random() if background == "random" else _BACKGROUNDS[background]
        alpha = x[:, 3:4]
        x = x[:, :3] * alpha + bg * (1 - alpha)
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - height) // 2, (nw - width) // 2
        x = x[..., top:top + height, left:left + width]
    return (x * 2 - 1).reshape(*lead, 3, height, width)


# ---------------------------------------------------------------- streams

class ShardStream:
    """Endless, resumable stream of raw samples from one source, split across workers."""

    def __init__(self, shards: list[str], rank: int, world: int, seed: int, shuffle_buffer: int,
                 position: dict[str, int] | None = None) -> None:
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.buffer = seed, max(1, shuffle_buffer)
        self.position = dict(position or {"epoch": 0, "consumed": 0})

    def _raw(self, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        order = list(self.shards)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if len(order) >= self.world:
            for shard in order[self.rank::self.world]:
                yield from iter_tar_samples(shard)
        else:
            # Fewer shards than workers: split by sample so no two workers see the same sample.
            i = 0
            for shard in order:
                for item in iter_tar_samples(shard):
                    if i % self.world == self.rank:
                        yield item
                    i += 1

    def _shuffled(self, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        rng = random.Random((self.seed * 7919 + epoch) * 65_537 + self.rank)
        buf: list[tuple[str, dict[str, bytes]]] = []
        for item in self._raw(epoch):
            buf.append(item)
            if len(buf) >= self.buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        while True:
            epoch, skip = self.position["epoch"], self.position["consumed"]
            produced = 0
            for i, item in enumerate(self._shuffled(epoch)):
                produced += 1
                if i < skip:
                    continue  # resume: already trained on, never decoded
                self.position = {"epoch": epoch, "consumed": i + 1}
                yield item
            if produced == 0:
                raise UserError(f"worker {self.rank} got no samples from {len(self.shards)} shard(s); "
                                "write more samples or use fewer workers")
            self.position = {"epoch": epoch + 1, "consumed": 0}


@dataclass
class Example:
    """One training example; tensors are float in [-1, 1]."""

    x: torch.Tensor                  # [F, 3, H, W] clip, or [V, T, 3, H, W] grid
    mask: torch.Tensor               # [F] or [V, T]; 1 = given clean
    context: int = CONTEXT_DYNAMIC
    lowres: torch.Tensor | None = None


Frames = Callable[[range | list[int], range | list[int]], torch.Tensor]


def _base_example(grid: LazyGrid, frames: Frames, cfg: DataConfig, rng: random.Random) -> Example | None:
    """A row (dynamic) or a column (freeze-time) of a grid, or a whole clip, with a random given-frame mask."""
    V, T = grid.shape
    n = cfg.frames
    if grid.meta.get("kind") == "clip" or V == 1:
        if T < n:
            return None
        context = CONTEXT_FREEZE_TIME if grid.meta.get("context") == "freeze-time" else CONTEXT_DYNAMIC
        t0 = rng.randrange(T - n + 1)
        clip = frames([0], range(t0, t0 + n))[0]
    else:
        options = (["row"] if T >= n else []) + (["col"] if V >= n else [])
        if not options:
            return None
        if rng.choice(options) == "row":
            v, t0 = rng.randrange(V), rng.randrange(T - n + 1)
            clip, context = frames([v], range(t0, t0 + n))[0], CONTEXT_DYNAMIC
        else:
            t, v0 = rng.randrange(T), rng.randrange(V - n + 1)
            clip, context = frames(range(v0, v0 + n), [t])[:, 0], CONTEXT_FREEZE_TIME
    mask = torch.zeros(n)
    if rng.random() < cfg.mask_prob:
        k = rng.randint(1, max(1, int(cfg.max_given * n)))
        mask[rng.sample(range(n), k)] = 1
    return Example(clip, mask, context)


def _upsampler_example(grid: LazyGrid, frames: Frames, cfg: DataConfig, rng: random.Random) -> Example | None:
    ex = _base_example(grid, frames, cfg, rng)
    if ex is None:
        return None
    lowres = F.avg_pool2d(ex.x, 4)  # the base model's resolution: a box filter is what area-resizing does
    return Example(ex.x, torch.zeros(cfg.frames), ex.context, lowres)


def _grid_example(grid: LazyGrid, frames: Frames, cfg: DataConfig, rng: random.Random) -> Example | None:
    """A V x T window with the first row (fixed-view video) and first column (freeze-time video) given."""
    V, T = grid.shape
    if V < cfg.views or T < cfg.frames:
        return None
    v0, t0 = rng.randrange(V - cfg.views + 1), rng.randrange(T - cfg.frames + 1)
    window = frames(range(v0, v0 + cfg.views), range(t0, t0 + cfg.frames))
    mask = torch.zeros(cfg.views, cfg.frames)
    mask[0, :] = 1
    mask[:, 0] = 1
    return Example(window, mask)


EXAMPLE_BUILDERS: dict[str, Callable[[LazyGrid, Frames, DataConfig, random.Random], Example | None]] = {
    "base": _base_example, "upsampler": _upsampler_example, "4d": _grid_example,
}


class TrainLoader:
    """Batches of one stage's examples from weighted sources, with a resumable ``state()``."""

    def __init__(self, stage: str, cfg: DataConfig, batch_size: int, rank: int = 0, world: int = 1,
                 state: dict[str, Any] | None = None) -> None:
        self.stage, self.cfg, self.batch_size, self.rank = stage, cfg, batch_size, rank
        sources = [resolve_shards(s) for s in cfg.grids]
        weights = list(cfg.weights) or [1.0] * len(sources)
        if stage == "base":
            sources += [resolve_shards(s) for s in cfg.clips]
            weights += [1.0] * len(cfg.clips)
        if not sources:
            raise UserError("no training data: set data.grids (and for the base stage optionally data.clips)")
        state = state or {}
        positions = state.get("streams", [None] * len(sources))
        self.streams = [ShardStream(s, rank, world, cfg.seed + 101 * i, cfg.shuffle_buffer, positions[i])
                        for i, s in enumerate(sources)]
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.draws = int(state.get("draws", 0))
        self.iters = [iter(s) for s in self.streams]
        self.builder = EXAMPLE_BUILDERS[stage]

    def state(self) -> dict[str, Any]:
        return {"draws": self.draws, "streams": [dict(s.position) for s in self.streams]}

    def _next_example(self) -> Example:
        for _ in range(1000):
            rng = random.Random(hash((self.cfg.seed, self.rank, self.draws)))
            self.draws += 1
            src = int(rng.choices(range(len(self.streams)), weights=self.weights)[0]) if len(self.streams) > 1 else 0
            key, files = next(self.iters[src])
            bg = random.Random(rng.random())  # the background draw must not shift the builder's draws

            def frames(vs, ts, grid=None):
                return to_tensor(grid.cells(vs, ts), self.cfg.height, self.cfg.width, self.cfg.background, bg)
            try:
                grid = LazyGrid(files)
                ex = self.builder(grid, lambda vs, ts: frames(vs, ts, grid), self.cfg, rng)
            except Exception as exc:  # one unreadable sample is skipped, not fatal
                print(f"[data] skipping unreadable sample {key}: {type(exc).__name__}: {exc}", flush=True)
                continue
            if ex is not None:
                return ex
        raise UserError(f"no sample fits the {self.stage} stage's window (views={self.cfg.views}, "
                        f"frames={self.cfg.frames}); render more views/frames or lower data.views/data.frames")

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        while True:
            exs = [self._next_example() for _ in range(self.batch_size)]
            batch = {"x": torch.stack([e.x for e in exs]), "mask": torch.stack([e.mask for e in exs]),
                     "context": torch.tensor([e.context for e in exs], dtype=torch.long)}
            if exs[0].lowres is not None:
                batch["lowres"] = torch.stack([e.lowres for e in exs])  # type: ignore[misc]
            yield batch, self.state()


def prefetch(iterable: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``iterable`` in a daemon thread, ``depth`` items ahead (PNG decoding releases the GIL)."""
    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()

    def work() -> None:
        try:
            for item in iterable:
                q.put(item)
        except BaseException as exc:  # surface loader errors in the training thread
            q.put(exc)
        q.put(sentinel)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
