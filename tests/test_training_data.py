"""The training loader: shapes per stage, worker splits, exact resume, RGBA compositing, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.common.errors import UserError
from shardgen import make_grid_shards
from training.config import DataConfig
from pipelines.common.shards import resolve_shards
from training.data import TrainLoader


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_grid_shards(tmp_path_factory.mktemp("grids"), n=8, views=4, frames=6, size=16)


def _cfg(path: Path, **kw) -> DataConfig:
    base = dict(grids=[str(path)], height=8, width=8, frames=4, views=3, shuffle_buffer=4, prefetch=0)
    base.update(kw)
    return DataConfig(**base)


def test_stage_batches_have_the_right_shapes(shards: Path) -> None:
    b, _ = next(iter(TrainLoader("base", _cfg(shards), 3)))
    assert b["x"].shape == (3, 4, 3, 8, 8) and b["mask"].shape == (3, 4) and b["context"].shape == (3,)
    assert b["x"].min() >= -1 and b["x"].max() <= 1
    u, _ = next(iter(TrainLoader("upsampler", _cfg(shards), 2)))
    assert u["x"].shape == (2, 4, 3, 8, 8) and u["lowres"].shape == (2, 4, 3, 2, 2)
    g, _ = next(iter(TrainLoader("4d", _cfg(shards), 2)))
    assert g["x"].shape == (2, 3, 4, 3, 8, 8)
    m = g["mask"][0]
    assert m[0].all() and m[:, 0].all() and m[1:, 1:].sum() == 0  # first row and column given, nothing else


def test_workers_see_disjoint_samples(shards: Path) -> None:
    seen = []
    for rank in range(2):
        stream = TrainLoader("4d", _cfg(shards, shuffle_buffer=1), 1, rank=rank, world=2).streams[0]
        it = iter(stream)
        seen.append({next(it)[0] for _ in range(4)})  # 8 samples / 2 workers = one epoch each
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 8


def test_resume_continues_bit_identically(shards: Path) -> None:
    straight = iter(TrainLoader("base", _cfg(shards), 2, rank=1, world=2))
    reference = [next(straight)[0]["x"] for _ in range(7)]  # crosses an epoch boundary
    first = iter(TrainLoader("base", _cfg(shards), 2, rank=1, world=2))
    for _ in range(3):
        _, state = next(first)
    resumed = iter(TrainLoader("base", _cfg(shards), 2, rank=1, world=2, state=state))
    for ref in reference[3:]:
        assert torch.equal(next(resumed)[0]["x"], ref)


def test_rgba_is_composited_on_the_background(tmp_path: Path) -> None:
    out = make_grid_shards(tmp_path, n=2, views=3, frames=4, size=8, rgba=True)
    white, _ = next(iter(TrainLoader("4d", _cfg(out, height=8, width=8, background="white"), 1)))
    black, _ = next(iter(TrainLoader("4d", _cfg(out, height=8, width=8, background="black"), 1)))
    assert white["x"].max() == 1.0 and black["x"].min() == -1.0
    assert white["x"].median() == 1.0 and black["x"].median() == -1.0  # transparent pixels take the background


def test_mixing_follows_the_weights(tmp_path: Path) -> None:
    a = make_grid_shards(tmp_path / "a", n=4, views=3, frames=4, size=8)
    b = make_grid_shards(tmp_path / "b", n=4, views=3, frames=4, size=8)
    loader = TrainLoader("4d", _cfg(a, grids=[str(a), str(b)], weights=[0.9, 0.1], height=8, width=8), 1)
    it = iter(loader)
    for _ in range(100):
        next(it)
    consumed = [s.position["epoch"] * 4 + s.position["consumed"] for s in loader.streams]
    assert consumed[0] > 3 * consumed[1]


def test_missing_shards_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no shards found"):
        resolve_shards(str(tmp_path / "nothing"))


def _contexts(loader: TrainLoader, n: int) -> tuple[list[int], dict]:
    it = iter(loader)
    ctx, state = [], {}
    for _ in range(n):
        batch, state = next(it)
        ctx += batch["context"].tolist()
    return ctx, state


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_base_stage_draws_contexts_in_the_configured_proportion(tmp_path: Path, fraction: float) -> None:
    renders = make_grid_shards(tmp_path / "r", n=4, views=4, frames=8, size=8)
    pseudo = make_grid_shards(tmp_path / "p", n=4, views=4, frames=4, size=8)
    cfg = _cfg(renders, grids=[str(renders), str(pseudo)], freeze_time_fraction=fraction)
    loader = TrainLoader("base", cfg, 4)
    ctx, state = _contexts(loader, 60)
    share = sum(ctx) / len(ctx)
    assert abs(share - fraction) < 0.08, share
    # what the loader reports is what it produced, per context and per source
    counts = state["counts"]
    assert counts.get("context_freeze-time", 0) == sum(ctx) and counts.get("context_dynamic", 0) == len(ctx) - sum(ctx)
    assert counts.get("source0", 0) + counts.get("source1", 0) == len(ctx)
    assert counts.get("source0", 0) > 0 and counts.get("source1", 0) > 0  # no source skipped


def test_first_frame_only_masks_appear_at_the_configured_rate(shards: Path) -> None:
    loader = TrainLoader("base", _cfg(shards, first_frame_only_prob=0.4), 8)
    it = iter(loader)
    masks = torch.cat([next(it)[0]["mask"] for _ in range(25)])
    only_first = (masks[:, 0] == 1) & (masks[:, 1:].sum(1) == 0)
    assert abs(only_first.float().mean().item() - 0.4) < 0.1


def test_a_source_without_columns_long_enough_stops_the_base_stage_at_start(tmp_path: Path) -> None:
    from training.data import check_sources
    wide = make_grid_shards(tmp_path / "wide", n=2, views=2, frames=8, size=8)  # rows of 8, columns of 2
    with pytest.raises(UserError, match="no data source gives freeze-time clips of 4 frames"):
        check_sources("base", _cfg(wide, grids=[str(wide)], frames=4))
    check_sources("base", _cfg(wide, grids=[str(wide)], frames=4, freeze_time_fraction=0.0))  # asked for: fine
    small = make_grid_shards(tmp_path / "small", n=2, views=2, frames=2, size=8)
    with pytest.raises(UserError, match=f"data source '{small}' gives no 4-frame clip"):
        check_sources("base", _cfg(wide, grids=[str(wide), str(small)], frames=4, freeze_time_fraction=0.0))
    with pytest.raises(UserError, match=f"data source '{small}' has no grid of at least 3 views x 4 frames"):
        check_sources("4d", _cfg(wide, grids=[str(small)], frames=4, views=3))


def test_loader_processes_split_the_data_and_resume_exactly(shards: Path) -> None:
    """data.loader_processes: disjoint slices, a fixed batch order, and a state that resumes it exactly."""
    from training.data import ProcessLoader, make_loader
    cfg = _cfg(shards, loader_processes=2, shuffle_buffer=2)
    straight = make_loader("4d", cfg, 2, rank=0, world=1)
    assert isinstance(straight, ProcessLoader)
    it = iter(straight)
    batches, states = [], []
    for _ in range(6):
        b, st = next(it)
        batches.append(b["x"])
        states.append(st)
    straight.close()
    assert states[-1]["next"] == 0 and len(states[-1]["sub"]) == 2
    assert sum(v for k, v in states[-1]["counts"].items() if k.startswith("source")) == 12
    resumed = make_loader("4d", cfg, 2, rank=0, world=1, state=states[2])
    rit = iter(resumed)
    for ref in batches[3:]:
        assert torch.equal(next(rit)[0]["x"], ref)
    resumed.close()
    with pytest.raises(UserError, match="saved with 2 loader processes"):
        make_loader("4d", _cfg(shards), 2, state=states[2])


def test_a_stage_is_one_registered_entry(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extending.md: the loader, the driver's data check and the model build all follow the stage's
    TRAIN_SPECS entry; nothing else names the stage."""
    import dataclasses
    from training.config import TrainConfig
    from training.data import Example, check_sources
    from training.specs import TRAIN_SPECS, TrainSpec

    def diagonal(grid, frames, cfg, rng):  # the cells (v, v): a camera moving while time runs
        n = min(grid.shape)
        if n < cfg.frames:
            return None
        cells = torch.stack([frames([v], [v])[0, 0] for v in range(cfg.frames)])
        return Example(cells, torch.zeros(cfg.frames))

    def too_short(stage, cfg, descs, contexts):
        if cfg.frames > 4:
            raise UserError(f"the {stage} stage needs diagonals of {cfg.frames} cells")

    built: list[str] = []
    spec = TrainSpec(lambda cfg: built.append(cfg.stage), diagonal, too_short, describe=lambda cfg: "diagonals")
    monkeypatch.setitem(TRAIN_SPECS, "diagonal", spec)
    b, _ = next(iter(TrainLoader("diagonal", _cfg(shards), 2)))
    assert b["x"].shape == (2, 4, 3, 8, 8)
    assert [d["spec"] for d in check_sources("diagonal", _cfg(shards))] == [str(shards)]  # passes the check
    with pytest.raises(UserError, match="the diagonal stage needs diagonals of 5 cells"):
        check_sources("diagonal", _cfg(shards, frames=5))
    cfg = dataclasses.replace(TrainConfig(), stage="diagonal")
    cfg.validate()  # a registered stage is a valid --stage
    TRAIN_SPECS[cfg.stage].build(cfg)
    assert built == ["diagonal"]
    with pytest.raises(Exception, match="unknown stage 'nope'"):
        dataclasses.replace(TrainConfig(), stage="nope").validate()
