"""Streaming training data from the data jobs' WebDataset shards (docs/data_format.md).

Each Ray Train worker reads its own slice of the shards, in an order fixed by
(seed, epoch), through a seeded shuffle buffer. Its position is two numbers per
source (epoch, samples consumed), so a resumed run skips exactly the samples it
already trained on (without decoding them) and continues bit-identically.
Sources are mixed by weight with a counter-seeded draw, which resumes the same way.
"""

from __future__ import annotations

import json
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.common.errors import UserError
from pipelines.common.shards import (LazyGrid, describe_source, filtered_reason, is_kept, iter_tar_samples,
                                     resolve_shards, to_tensor)
from training.config import DataConfig

from model.dit import CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME
from model.fourd import grid_condition_mask

CONTEXT_NAMES = {CONTEXT_DYNAMIC: "dynamic", CONTEXT_FREEZE_TIME: "freeze-time"}


def base_contexts(desc: dict[str, Any], frames: int) -> set[int]:
    """The contexts a source can give base clips of ``frames`` frames: rows need T >= frames, columns V >= frames."""
    out: set[int] = set()
    for kind, views, times, context in desc["shapes"]:
        if kind == "clip":
            if times >= frames:
                out.add(CONTEXT_FREEZE_TIME if context == "freeze-time" else CONTEXT_DYNAMIC)
        else:
            if times >= frames:
                out.add(CONTEXT_DYNAMIC)
            if views >= frames:
                out.add(CONTEXT_FREEZE_TIME)
    return out


def check_sources(stage: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """Fail at start, with one line naming the source, when a stage would skip a source or miss a context
    (the stage's ``TrainSpec.check_data``).

    Returns the source descriptions (the driver records their item ids in the checkpoint).
    """
    from training.specs import TRAIN_SPECS  # the registry imports this module's example builders
    spec = TRAIN_SPECS[stage]
    descs = [describe_source(s, cfg.kept_reasons()) for s in list(cfg.grids) + (list(cfg.clips) if spec.clips else [])]
    for d in descs:
        if not d["samples"] and d["filtered"]:  # the loader would read the source forever and take nothing
            why = ", ".join(f"{n} {reason}" for reason, n in d["filtered"].items())
            raise UserError(f"data source '{d['spec']}' holds only samples the render job filtered out ({why}); "
                            "keep them with data.keep_filtered=<reasons or all>, or drop the source")
    spec.check_data(stage, cfg, descs, spec.contexts)
    return descs


def shape_list(desc: dict[str, Any]) -> str:
    parts = [f"{n} {'clips' if k == 'clip' else 'grids'} {v}x{t}{' ' + c if c else ''}"
             for (k, v, t, c), n in sorted(desc["shapes"].items())]
    return ", ".join(parts) or "no samples"


# ---------------------------------------------------------------- streams

class ShardStream:
    """Endless, resumable stream of raw samples from one source, split across workers.

    Samples the render job filtered out (meta.json's ``filter`` record) are passed over unless their reason is
    in ``keep`` (None keeps all); each one passed over adds 1 to ``counts["filtered_<reason>"]``. They are
    passed over after the shuffle and count in the position, so a resumed run skips the same ones, uncounted.
    """

    def __init__(self, shards: list[str], rank: int, world: int, seed: int, shuffle_buffer: int,
                 position: dict[str, int] | None = None, keep: frozenset[str] | None = None,
                 counts: dict[str, int] | None = None) -> None:
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.buffer = seed, max(1, shuffle_buffer)
        self.position = dict(position or {"epoch": 0, "consumed": 0})
        self.keep = keep
        self.counts = counts if counts is not None else {}

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

    EMPTY_EPOCHS = 20
    """Whole epochs in a row in which every sample of this worker's slice was filtered out before the stream
    gives up. Not 1: the slice's shards change every epoch, so one epoch can draw only filtered shards of a
    source that holds kept samples (check_sources refused the sources with none)."""

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        empty = 0
        while True:
            epoch, skip = self.position["epoch"], self.position["consumed"]
            produced = taken = 0
            for i, item in enumerate(self._shuffled(epoch)):
                produced += 1
                if i < skip:
                    continue  # resume: already trained on, never decoded
                self.position = {"epoch": epoch, "consumed": i + 1}
                files = item[1]
                reason = filtered_reason(json.loads(files["meta.json"])) if "meta.json" in files else ""
                if not is_kept(reason, self.keep):
                    self.counts[f"filtered_{reason}"] = self.counts.get(f"filtered_{reason}", 0) + 1
                    continue
                taken += 1
                yield item
            if produced == 0:
                raise UserError(f"worker {self.rank} got no samples from {len(self.shards)} shard(s); "
                                "write more samples or use fewer workers")
            empty = empty + 1 if taken == 0 and skip == 0 else 0  # whole epochs with every sample filtered out
            if empty >= self.EMPTY_EPOCHS:
                raise UserError(f"worker {self.rank} got only samples the render job filtered out for {empty} epochs "
                                f"({produced} a time, from {len(self.shards)} shard(s)); keep them with "
                                "data.keep_filtered, or use fewer workers")
            self.position = {"epoch": epoch + 1, "consumed": 0}


@dataclass
class Example:
    """One training example; tensors are float in [-1, 1]."""

    x: torch.Tensor                  # [F, 3, H, W] clip, or [V, T, 3, H, W] grid
    mask: torch.Tensor               # [F] or [V, T]; 1 = given clean
    context: int = CONTEXT_DYNAMIC
    lowres: torch.Tensor | None = None


Frames = Callable[[range | list[int], range | list[int]], torch.Tensor]
"""(views, times) -> those cells of a grid as a [V, T, C, H, W] tensor at the training size."""


def base_example(grid: LazyGrid, frames: Frames, cfg: DataConfig, rng: random.Random,
                  want: int | None = None) -> Example | None:
    """A row (dynamic) or a column (freeze-time) of a grid, or a whole clip, with a random given-frame mask.

    ``want`` asks for one context (the loader draws it to keep data.freeze_time_fraction); None takes either.
    Returns None when this sample cannot give such a clip.
    """
    V, T = grid.shape
    n = cfg.frames
    if grid.meta.get("kind") == "clip" or V == 1:
        context = CONTEXT_FREEZE_TIME if grid.meta.get("context") == "freeze-time" else CONTEXT_DYNAMIC
        if T < n or (want is not None and want != context):
            return None
        t0 = rng.randrange(T - n + 1)
        clip = frames([0], range(t0, t0 + n))[0]
    else:
        options = (["row"] if T >= n and want != CONTEXT_FREEZE_TIME else []) + \
                  (["col"] if V >= n and want != CONTEXT_DYNAMIC else [])
        if not options:
            return None
        if rng.choice(options) == "row":
            v, t0 = rng.randrange(V), rng.randrange(T - n + 1)
            clip, context = frames([v], range(t0, t0 + n))[0], CONTEXT_DYNAMIC
        else:
            t, v0 = rng.randrange(T), rng.randrange(V - n + 1)
            clip, context = frames(range(v0, v0 + n), [t])[:, 0], CONTEXT_FREEZE_TIME
    mask = torch.zeros(n)
    if rng.random() < cfg.first_frame_only_prob:
        mask[0] = 1  # what every row and column of a 4D grid but the first shows the base: only its first cell
    elif rng.random() < cfg.mask_prob:
        k = rng.randint(1, max(1, int(cfg.max_given * n)))
        mask[rng.sample(range(n), k)] = 1
    return Example(clip, mask, context)


def upsampler_example(grid: LazyGrid, frames: Frames, cfg: DataConfig, rng: random.Random) -> Example | None:
    ex = base_example(grid, frames, cfg, rng)
    if ex is None:
        return None
    lowres = F.avg_pool2d(ex.x, 4)  # the base model's resolution: a box filter is what area-resizing does
    # Clean on purpose: VideoUpsampler.training_loss noise-augments it with the step's seeded generator, so
    # the level is known to the model and the augmentation is reproducible from the training seed.
    return Example(ex.x, torch.zeros(cfg.frames), ex.context, lowres)


def grid_example(grid: LazyGrid, frames: Frames, cfg: DataConfig, rng: random.Random) -> Example | None:
    """A V x T window with the first row (fixed-view video) and first column (freeze-time video) given."""
    V, T = grid.shape
    if V < cfg.views or T < cfg.frames:
        return None
    v0, t0 = rng.randrange(V - cfg.views + 1), rng.randrange(T - cfg.frames + 1)
    window = frames(range(v0, v0 + cfg.views), range(t0, t0 + cfg.frames))
    return Example(window, grid_condition_mask(1, cfg.views, cfg.frames)[0])


ExampleBuilder = Callable[..., "Example | None"]
"""(grid, frames, data config, rng[, want=context]) -> one example of a stage (``TrainSpec.examples``)."""


class TrainLoader:
    """Batches of one stage's examples from weighted sources, with a resumable ``state()``.

    The base stage first draws the context (freeze-time with probability data.freeze_time_fraction),
    then a source that can give it, so the proportion holds whatever the sources' mix; ``state()``
    counts what was actually produced per context and per source (logged by the training loop).
    """

    def __init__(self, stage: str, cfg: DataConfig, batch_size: int, rank: int = 0, world: int = 1,
                 state: dict[str, Any] | None = None) -> None:
        self.stage, self.cfg, self.batch_size, self.rank = stage, cfg, batch_size, rank
        from training.specs import TRAIN_SPECS
        self.spec = spec = TRAIN_SPECS[stage]
        specs = list(cfg.grids)
        weights = list(cfg.weights) or [1.0] * len(specs)
        if spec.clips:
            specs += list(cfg.clips)
            weights += [1.0] * len(cfg.clips)
        if not specs:
            raise UserError("no training data: set data.grids (and for the base stage optionally data.clips)")
        sources = [resolve_shards(s) for s in specs]
        state = state or {}
        positions = state.get("streams", [None] * len(sources))
        self.counts: dict[str, int] = dict(state.get("counts", {}))  # the streams add their filtered skips
        keep = cfg.kept_reasons()
        self.streams = [ShardStream(s, rank, world, cfg.seed + 101 * i, cfg.shuffle_buffer, positions[i], keep,
                                    self.counts) for i, s in enumerate(sources)]
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.draws = int(state.get("draws", 0))
        self.iters = [iter(s) for s in self.streams]
        self.builder = spec.examples
        self.capable: dict[int, list[int]] = {}
        if spec.contexts:
            caps = [base_contexts(describe_source(s, keep), cfg.frames) for s in specs]
            self.capable = {c: [i for i, cap in enumerate(caps) if c in cap]
                            for c in (CONTEXT_DYNAMIC, CONTEXT_FREEZE_TIME)}

    def state(self) -> dict[str, Any]:
        return {"draws": self.draws, "streams": [dict(s.position) for s in self.streams], "counts": dict(self.counts)}

    def shares(self) -> dict[str, float]:
        """Fractions of the examples produced so far: per context (base stage) and per source."""
        total = sum(v for k, v in self.counts.items() if k.startswith("source"))
        return {k: v / total for k, v in sorted(self.counts.items())} if total else {}

    def _pick_source(self, rng: random.Random, want: int | None) -> int:
        candidates = list(range(len(self.streams))) if want is None else self.capable.get(want, [])
        if not candidates:
            raise UserError(f"no data source gives {CONTEXT_NAMES[want]} clips of {self.cfg.frames} frames; "
                            "lower data.frames or set data.freeze_time_fraction to 0 or 1")
        if len(candidates) == 1:
            return candidates[0]
        w = [self.weights[i] for i in candidates]
        return int(rng.choices(candidates, weights=w)[0])

    def _draw(self) -> tuple[int, str, dict[str, bytes], random.Random, int | None, random.Random]:
        """The next raw sample and its own random stream (sequential: it moves the stream positions)."""
        rng = random.Random(hash((self.cfg.seed, self.rank, self.draws)))
        self.draws += 1
        want = None
        if self.spec.contexts:
            want = CONTEXT_FREEZE_TIME if rng.random() < self.cfg.freeze_time_fraction else CONTEXT_DYNAMIC
        src = self._pick_source(rng, want)
        key, files = next(self.iters[src])
        bg = random.Random(rng.random())  # the background draw must not shift the builder's draws
        return src, key, files, rng, want, bg

    def _build(self, draw: tuple[int, str, dict[str, bytes], random.Random, int | None, random.Random]
               ) -> Example | None:
        """Decode one drawn sample into an example (thread-safe: it touches only its own draw)."""
        _, key, files, rng, want, bg = draw
        try:
            grid = LazyGrid(files)

            def frames(vs, ts):
                return to_tensor(grid.cells(vs, ts), self.cfg.height, self.cfg.width, self.cfg.background, bg)
            extra = {"want": want} if want is not None else {}
            return self.builder(grid, frames, self.cfg, rng, **extra)
        except Exception as exc:  # one unreadable sample is skipped, not fatal
            print(f"[data] skipping unreadable sample {key}: {type(exc).__name__}: {exc}", flush=True)
            return None

    def _examples(self, n: int, pool: ThreadPoolExecutor | None) -> list[Example]:
        """n examples: draws are made in order, decoded in parallel, and draws that give no example are
        replaced by new ones in order, so the result does not depend on the number of threads."""
        out: list[Example | None] = [None] * n
        todo = list(range(n))
        for _ in range(1000):
            if not todo:
                return out  # type: ignore[return-value]
            draws = [self._draw() for _ in todo]
            built = list(pool.map(self._build, draws)) if pool else [self._build(d) for d in draws]
            missing = []
            for i, draw, ex in zip(todo, draws, built):
                if ex is None:
                    missing.append(i)
                    continue
                out[i] = ex
                for name in (f"source{draw[0]}", f"context_{CONTEXT_NAMES[ex.context]}" if self.spec.contexts else ""):
                    if name:
                        self.counts[name] = self.counts.get(name, 0) + 1
            todo = missing
        raise UserError(f"no sample fits the {self.stage} stage's window (views={self.cfg.views}, "
                        f"frames={self.cfg.frames}); render more views/frames or lower data.views/data.frames")

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        threads = max(1, self.cfg.decode_threads)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        while True:
            exs = self._examples(self.batch_size, pool)
            batch = {"x": torch.stack([e.x for e in exs]), "mask": torch.stack([e.mask for e in exs]),
                     "context": torch.tensor([e.context for e in exs], dtype=torch.long)}
            if exs[0].lowres is not None:
                batch["lowres"] = torch.stack([e.lowres for e in exs])  # type: ignore[misc]
            yield batch, self.state()


def _produce(stage: str, cfg: DataConfig, batch_size: int, rank: int, world: int, state: dict[str, Any] | None,
             out: Any) -> None:
    """Body of one loader process: batches of its slice of the data, with the state after each, into ``out``."""
    torch.set_num_threads(1)
    try:
        for item in TrainLoader(stage, cfg, batch_size, rank, world, state):
            out.put(item)
    except BaseException as exc:  # shown by the training process, which would otherwise wait forever
        import traceback
        out.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def loader_processes_of(position: dict[str, Any] | None) -> int | None:
    """How many loader processes a saved data position came from: ProcessLoader's holds one entry per process,
    the training process's own TrainLoader's none (0); None when nothing was saved."""
    if position is None:
        return None
    return len(position["sub"]) if "sub" in position else 0


class ProcessLoader:
    """``data.loader_processes`` TrainLoaders in their own processes, batches taken from each in turn.

    Process i of worker ``rank`` reads the slice of virtual rank ``rank * P + i`` of ``world * P``, so the
    processes see disjoint samples and the batch sequence is fixed by the seed and P. The state is every
    process's state after its last batch the trainer took, plus whose turn is next: a resumed run restarts
    each process exactly there (batches decoded ahead and not taken are decoded again).
    """

    def __init__(self, stage: str, cfg: DataConfig, batch_size: int, rank: int = 0, world: int = 1,
                 state: dict[str, Any] | None = None) -> None:
        import torch.multiprocessing as mp
        P = cfg.loader_processes
        subs = (state or {}).get("sub")
        if state is not None and subs is None:  # else every process would start its slice again, silently
            raise UserError(f"the data position was saved by the training process's own loader, this run has {P} "
                            "loader processes; set data.loader_processes=0 to resume it exactly")
        if subs is not None and len(subs) != P:
            raise UserError(f"the data position was saved with {len(subs)} loader processes, this run has {P}; "
                            f"set data.loader_processes={len(subs)} to resume it exactly")
        self.last: list[dict[str, Any] | None] = list(subs or [None] * P)
        self.turn = int((state or {}).get("next", 0))
        ctx = mp.get_context("spawn")  # no fork of a process that holds CUDA and threads
        self.queues = [ctx.Queue(maxsize=max(2, cfg.prefetch)) for _ in range(P)]
        self.procs = [ctx.Process(target=_produce, args=(stage, cfg, batch_size, rank * P + i, world * P,
                                                         self.last[i], q), daemon=True)
                      for i, q in enumerate(self.queues)]
        for p in self.procs:
            p.start()

    def state(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for sub in self.last:
            for k, v in (sub or {}).get("counts", {}).items():
                counts[k] = counts.get(k, 0) + v
        return {"sub": list(self.last), "next": self.turn, "counts": counts}

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        while True:
            i = self.turn
            while True:
                try:
                    item = self.queues[i].get(timeout=10)
                    break
                except queue.Empty:
                    if not self.procs[i].is_alive():
                        raise UserError(f"loader process {i} died (exit code {self.procs[i].exitcode}); see its "
                                        "output above") from None
            if len(item) == 3 and item[0] == "error":
                raise UserError(f"loader process {i} failed: {item[1]}\n{item[2]}")
            batch, sub_state = item
            self.last[i] = sub_state
            self.turn = (i + 1) % len(self.procs)
            yield batch, self.state()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()


def make_loader(stage: str, cfg: DataConfig, batch_size: int, rank: int = 0, world: int = 1,
                state: dict[str, Any] | None = None) -> TrainLoader | ProcessLoader:
    """The training loader: in the training process, or in ``data.loader_processes`` processes."""
    if cfg.loader_processes > 0:
        return ProcessLoader(stage, cfg, batch_size, rank, world, state)
    if state is not None and "sub" in state:
        raise UserError(f"the data position was saved with {len(state['sub'])} loader processes; set "
                        f"data.loader_processes={len(state['sub'])} to resume it exactly")
    return TrainLoader(stage, cfg, batch_size, rank, world, state)


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
