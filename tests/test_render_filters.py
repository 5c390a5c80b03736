"""The render filters (issue 14, item 4): each measure on synthetic frames, then the real job (Ray, Blender) on
procedural assets built to trip one filter each, the summary's funnel, and the training loader that skips what
was marked."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.common.config import ConfigError
from pipelines.common.errors import UserError
from pipelines.common.shards import (INDEX_SCHEMA, Sample, commit_part, consolidate, describe_source, iter_tar_samples,
                                     json_bytes)
from pipelines.render_filters import (FILTERS, RenderFilter, border_alpha, coverage, funnel, judge, mark,
                                      similarity, static_similarity, step_similarity)
from pipelines.render_objaverse import RenderJobConfig, list_items, main
from training.config import DataConfig
from training.data import TrainLoader, check_sources

H, W = 36, 64


def _disc(cy: float, cx: float, r: float, shade: int = 0) -> np.ndarray:
    """An RGBA frame: a shaded disc (colour varies across it, so SSIM sees structure) on transparent pixels."""
    ys, xs = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W, 4), np.uint8)
    inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    img[..., 0] = np.clip(60 + 6 * (xs - cx) + shade, 0, 255)
    img[..., 1] = np.clip(120 + 6 * (ys - cy), 0, 255)
    img[..., 2] = 90
    img[..., 3] = np.where(inside, 255, 0)
    return img


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """uint8 [V, T, H, W, 4] from rows of frames (row v = view v over time)."""
    return np.stack([np.stack(r) for r in rows])


def _moving(views: int = 2, frames: int = 6, step: float = 2.0) -> np.ndarray:
    """A disc gliding right: ordinary motion."""
    return _grid([[_disc(18, 20 + step * t + 3 * v, 8) for t in range(frames)] for v in range(views)])


def _torn(frames: int = 6, seed: int = 0) -> np.ndarray:
    """A small disc on even frames, scattered fragments over a wide area on odd ones: a mesh torn apart."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(frames):
        if t % 2 == 0:
            out.append(_disc(18, 32, 4))
        else:
            img = np.zeros((H, W, 4), np.uint8)
            img[2:34, 8:56, :3] = rng.integers(0, 255, (32, 48, 3))
            img[2:34, 8:56, 3] = np.where(rng.random((32, 48)) < 0.5, 255, 0)
            out.append(img)
    return _grid([out])


OPTS = RenderJobConfig()  # the shipped defaults are what is tested


def test_empty_and_leaves_frame_measures() -> None:
    normal = _moving()
    assert coverage(normal) == pytest.approx(np.pi * 64 / (H * W), rel=0.1)
    assert not FILTERS["empty"].trips(coverage(normal), OPTS)
    speck = normal.copy()
    speck[1, 3] = _disc(18, 30, 0.5)  # one frame of one view (not the front one) shows a single pixel
    assert coverage(speck) == pytest.approx(1 / (H * W)) and FILTERS["empty"].trips(coverage(speck), OPTS)

    assert border_alpha(normal, 1) == 0.0 and not FILTERS["leaves_frame"].trips(0.0, OPTS)
    cut = normal.copy()
    cut[1, 4] = _disc(18, 2, 8)  # one frame of view 1 reaches past the left edge
    assert border_alpha(cut, 1) == 1.0 and FILTERS["leaves_frame"].trips(1.0, OPTS)
    near = normal.copy()
    near[0, 0] = _disc(18, 10, 8)  # 2 px from the edge: inside a 3-px band, not a 1-px one
    assert border_alpha(near, 1) == 0.0 and border_alpha(near, 3) == 1.0
    faint = normal.copy()
    faint[0, 0, :, 0, 3] = 20  # a haze of alpha 0.08 along the edge: below the level that shows the object
    assert not FILTERS["leaves_frame"].trips(border_alpha(faint, 1), OPTS)


def test_static_and_distorted_measures() -> None:
    still = _grid([[_disc(18, 30, 8)] * 6, [_disc(18, 30 + t, 8) for t in range(6)]])  # only view 1 moves
    assert static_similarity(still, 8, 0.1) == pytest.approx(1.0)  # the front view is what counts
    assert FILTERS["static"].trips(static_similarity(still, 8, 0.1), OPTS)

    normal = _moving()
    s_static, s_step = static_similarity(normal, 8, 0.1), step_similarity(normal, 8, 0.1)
    assert s_static < OPTS.filter_static_similarity and s_step > OPTS.filter_distorted_similarity
    assert not FILTERS["static"].trips(s_static, OPTS) and not FILTERS["distorted"].trips(s_step, OPTS)
    # only the first filter_frames frames count: a still start that moves later is static over 3 frames
    late = _grid([[_disc(18, 20, 8)] * 3 + [_disc(18, 20 + 6 * t, 8) for t in range(1, 4)]])
    assert static_similarity(late, 3, 0.1) == pytest.approx(1.0) and static_similarity(late, 6, 0.1) < 0.9

    torn = _torn()
    assert step_similarity(torn, 8, 0.1) < OPTS.filter_distorted_similarity
    assert FILTERS["distorted"].trips(step_similarity(torn, 8, 0.1), OPTS)
    assert static_similarity(_grid([[_disc(18, 30, 8)]]), 8, 0.1) is None  # one frame: nothing to compare


def test_similarity_ignores_what_lies_under_transparent_pixels_and_the_frame_size() -> None:
    a, b = _disc(18, 20, 8), _disc(18, 24, 8)
    junk_a, junk_b = a.copy(), b.copy()
    rng = np.random.default_rng(1)
    for img in (junk_a, junk_b):
        img[..., :3] = np.where(img[..., 3:] == 0, rng.integers(0, 255, img[..., :3].shape), img[..., :3])
    assert similarity(junk_a, junk_b, 0.1) == pytest.approx(similarity(a, b, 0.1))

    def up(img: np.ndarray) -> np.ndarray:  # the same frame rendered at twice the size
        return np.asarray(Image.fromarray(img).resize((2 * W, 2 * H), Image.BILINEAR))
    assert similarity(up(a), up(b), 0.1) == pytest.approx(similarity(a, b, 0.1), abs=0.05)
    empty = np.zeros((H, W, 4), np.uint8)
    assert similarity(empty, empty, 0.1) == 1.0


def test_the_first_filter_that_trips_is_the_reason_and_only_enabled_filters_run() -> None:
    speck = _grid([[_disc(18, 30, 0.5)] * 4])  # a pixel, motionless: empty and static
    record = judge(speck, OPTS)
    assert record["filtered"] == "empty" and record["static_similarity"] == pytest.approx(1.0)
    assert set(record) == {"filtered"} | {f.value for f in FILTERS.values()}  # every measure is recorded
    assert judge(speck, dataclasses.replace(OPTS, filters=["static", "distorted"]))["filtered"] == "static"
    off = dataclasses.replace(OPTS, filters=[])
    meta: dict = {}
    files = {f"v00t{t:02d}.png": _png(speck[0, t]) for t in range(4)}
    assert mark(meta, files, off) == "" and meta == {}  # filtering switched off: no record at all
    assert mark(meta, files, OPTS) == "empty" and meta["filter"]["filtered"] == "empty"


def test_funnel_counts_each_step_over_what_reaches_it() -> None:
    reasons = ["", "empty", "static", "static", "", "distorted", "old_reason"]
    f = funnel(reasons, ["empty", "leaves_frame", "static", "distorted"])
    assert f["steps"] == {"empty": {"entering": 7, "dropped": 1, "share": round(1 / 7, 4)},
                          "leaves_frame": {"entering": 6, "dropped": 0, "share": 0.0},
                          "static": {"entering": 6, "dropped": 2, "share": round(2 / 6, 4)},
                          "distorted": {"entering": 4, "dropped": 1, "share": 0.25},
                          "old_reason": {"entering": 3, "dropped": 1, "share": round(1 / 3, 4)}}
    assert f["kept"] == 2 and f["kept_share"] == round(2 / 7, 4)
    assert funnel([], ["empty"]) == {"steps": {"empty": {"entering": 0, "dropped": 0, "share": 0.0}}, "kept": 0,
                                     "kept_share": 0.0}


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: str, reason: str | None, views: int = 2, frames: int = 4) -> Sample:
    """A tiny grid sample with (or, for None, without) a filter record in its meta."""
    files = {f"v{v:02d}t{t:02d}.png": _png(_disc(18, 20 + 2 * t + v, 8)) for v in range(views) for t in range(frames)}
    meta = {"kind": "render", "views": views, "frames": frames, "item_id": key}
    if reason is not None:
        meta["filter"] = {"filtered": reason}
    files["meta.json"] = json_bytes(meta)
    return Sample(key=key, item_id=key, files=files, kind="render", views=views, frames=frames, height=H, width=W,
                  filtered=reason or "")


def test_index_parts_written_before_the_column_read_as_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    commit_part(out, 0, [_sample("old", None)], [])
    part = out / "_parts" / "part-000000.index.parquet"
    old_schema = pa.schema([f for f in INDEX_SCHEMA if f.name != "filtered"])
    pq.write_table(pq.read_table(part).select(old_schema.names).cast(old_schema), part)  # as an older job wrote it
    assert "filtered" not in pq.read_schema(part).names
    commit_part(out, 1, [_sample("new", "static")], [])
    index, _ = consolidate(out)
    assert dict(zip(index.column("key").to_pylist(), index.column("filtered").to_pylist())) == \
        {"old": "", "new": "static"}
    d = describe_source(str(out), keep=frozenset())
    assert d["samples"] == 1 and d["items"] == ["old"] and d["filtered"] == {"static": 1}
    assert describe_source(str(out))["samples"] == 2  # None keeps every sample
    pq.write_table(index.drop_columns(["filtered"]), out / "index.parquet")  # an older job's consolidated index
    assert describe_source(str(out), keep=frozenset())["samples"] == 2


@pytest.mark.parametrize("argv,needle", [
    (["--filters", "static,empty"], "--filters must name filters of empty, leaves_frame, static, distorted"),
    (["--filters", "empty,empty"], "each once and in that order"),
    (["--filters", "blurry"], "got blurry"),
    (["--filter-frames", "1"], "--filter-frames must be >= 2"),
    (["--filter-min-coverage", "2"], "--filter-min-coverage must be in [0, 1]"),
    (["--filter-alpha", "1"], "--filter-alpha must be below 1"),
    (["--input", "rigid:0,rigid:0"], "more than once"),
    (["--filter-static-similarity", "0.2"], "must be below --filter-static-similarity"),
    (["--input", "rigid,spiky"], "KIND[:SEED]"),
    (["--input", "idle:x"], "'idle:x'"),
])
def test_bad_filter_options_fail_before_any_work(tmp_path: Path, argv: list[str], needle: str) -> None:
    out = tmp_path / "out"
    with pytest.raises((ConfigError, UserError)) as err:
        main(["--preset", "tiny", "--output", str(out)] + argv)
    assert needle in str(err.value)
    assert not out.exists()


def test_bad_keep_filtered_is_one_clear_error() -> None:
    from pipelines.common.config import apply_overrides
    from training.config import presets_for
    cfg = presets_for("4d")["tiny"]()
    with pytest.raises(ConfigError, match="option 'data.keep_filtered' must be one of empty, leaves_frame, static, "
                                          "distorted, all; got 'blurry'"):
        apply_overrides(cfg, {"data.keep_filtered": "static,blurry"})
    assert apply_overrides(cfg, {"data.keep_filtered": "static,all"}).data.kept_reasons() is None


def test_procedural_kinds_are_asked_for_by_name() -> None:
    items = list_items(RenderJobConfig(source="procedural", input="rigid:0, flicker:7,pole", seed=3))
    assert [(i["item_id"], i["kind"], i["seed"]) for i in items] == [
        ("proc-000000", "rigid", 0),  # the kind seed 0 gives anyway: the plain id of that asset
        ("proc-flicker-000007", "flicker", 7), ("proc-pole-000005", "pole", 5)]  # the seed: --seed + position
    from rendering.procedural import FLAWED_KINDS, KINDS, kind_for
    assert {kind_for(s) for s in range(30)} == set(KINDS) and not set(FLAWED_KINDS) & set(KINDS)


def test_a_filter_is_one_registered_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extending.md: a FILTERS entry is validated, measured, recorded, counted in the funnel and skipped by
    the loader (with its skips counted) with nothing else naming it."""
    dim = RenderFilter("brightness", lambda f, o: float(f[..., :3].mean() / 255), lambda x, o: x < 0.9, "too dark")
    monkeypatch.setitem(FILTERS, "dim", dim)
    cfg = dataclasses.replace(RenderJobConfig(), filters=[*FILTERS])
    cfg.validate()
    record = judge(_moving(), cfg)
    assert record["filtered"] == "dim" and 0 < record["brightness"] < 0.9
    assert funnel(["dim", ""], cfg.filters)["steps"]["dim"] == {"entering": 2, "dropped": 1, "share": 0.5}
    out = tmp_path / "grids"
    commit_part(out, 0, [_sample("a", ""), _sample("b", "dim")], [])
    consolidate(out)
    loader = TrainLoader("4d", DataConfig(grids=[str(out)], views=2, frames=4, height=8, width=8, prefetch=0), 2)
    _, state = next(iter(loader))
    assert state["counts"]["source0"] == 2 and state["counts"]["filtered_dim"] >= 1


# ---------------------------------------------------------------------------------------------- the real job

# One asset per filter plus a normal one. The pole reaches the frame's edge only at the closest camera distance
# the job accepts (rendering/procedural.py), so this job renders at it: 1 / sin(20 degrees), the default 40-degree
# vertical view of a landscape frame; the normal asset stays clear of the edge there too.
ASSETS = {"proc-000000__hop": "", "proc-idle-000001__idle": "static", "proc-flicker-000002__flicker": "distorted",
          "proc-vanish-000003__vanish": "empty", "proc-pole-000004__bob": "leaves_frame"}


@pytest.fixture(scope="module")
def marked(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("filters") / "out"
    args = ["--preset", "tiny", "--views", "2", "--frames", "4", "--max-actions", "1", "--distance", "2.924",
            "--input", "rigid:0,idle:1,flicker:2,vanish:3,pole:4", "--items-per-part", "1", "--output", str(out),
            "--cache-dir", str(out.parent / "cache")]
    assert main(args) == 0
    (out / "first_summary.json").write_text((out / "summary.json").read_text())
    assert main(args) == 0  # again, into the same output: nothing left to render
    return out


def test_each_bad_render_is_marked_with_its_reason(marked: Path) -> None:
    metas = {key: json.loads(files["meta.json"]) for shard in sorted((marked / "shards").glob("*.tar"))
             for key, files in iter_tar_samples(shard)}
    assert {k: m["filter"]["filtered"] for k, m in metas.items()} == ASSETS  # every sample is written, marked
    index = pq.read_table(marked / "index.parquet").to_pylist()
    assert {r["key"]: r["filtered"] for r in index} == ASSETS
    o = RenderJobConfig()
    values = {k: m["filter"] for k, m in metas.items()}
    normal = values["proc-000000__hop"]  # clear of every threshold
    assert normal["coverage"] > o.filter_min_coverage and normal["border_alpha"] <= o.filter_alpha
    assert normal["static_similarity"] < o.filter_static_similarity
    assert normal["step_similarity"] > o.filter_distorted_similarity
    assert values["proc-vanish-000003__vanish"]["coverage"] < o.filter_min_coverage
    assert values["proc-pole-000004__bob"]["border_alpha"] > o.filter_alpha
    assert values["proc-idle-000001__idle"]["static_similarity"] > o.filter_static_similarity
    assert values["proc-flicker-000002__flicker"]["step_similarity"] < o.filter_distorted_similarity


def test_the_summary_reports_what_each_step_dropped_across_runs(marked: Path) -> None:
    first = json.loads((marked / "first_summary.json").read_text())
    again = json.loads((marked / "summary.json").read_text())
    assert first["samples_this_run"] == 5 and again["samples_this_run"] == 0  # the second run rendered nothing
    expected = {"steps": {"empty": {"entering": 5, "dropped": 1, "share": 0.2},
                          "leaves_frame": {"entering": 4, "dropped": 1, "share": 0.25},
                          "static": {"entering": 3, "dropped": 1, "share": 0.3333},
                          "distorted": {"entering": 2, "dropped": 1, "share": 0.5}},
                "kept": 1, "kept_share": 0.2}
    assert first["filters"] == expected and again["filters"] == expected  # from the index: whole output


def _keys(loader: TrainLoader, n: int) -> list[str]:
    it = iter(loader.streams[0])
    return [next(it)[0] for _ in range(n)]


def test_the_training_loader_skips_marked_samples_unless_kept(marked: Path) -> None:
    def cfg(**kw) -> DataConfig:
        return DataConfig(grids=[str(marked)], views=2, frames=4, height=8, width=8, shuffle_buffer=2, prefetch=0,
                          **kw)
    loader = TrainLoader("4d", cfg(), 2)
    assert set(_keys(loader, 6)) == {"proc-000000__hop"}
    skipped = {k: v for k, v in loader.counts.items() if k.startswith("filtered_")}
    assert set(skipped) == {f"filtered_{r}" for r in ASSETS.values() if r}
    assert all(5 <= n <= 6 for n in skipped.values())  # 6 epochs begun: each marked one passed over 5 or 6 times
    _, state = next(iter(TrainLoader("4d", cfg(), 2)))  # the counts travel in the state the training loop logs
    assert state["counts"]["source0"] == 2 and all(state["counts"][f"filtered_{r}"] >= 1 for r in ASSETS.values() if r)
    assert set(_keys(TrainLoader("4d", cfg(keep_filtered=["all"]), 2), 10)) == set(ASSETS)
    assert set(_keys(TrainLoader("4d", cfg(keep_filtered=["static"]), 2), 10)) == \
        {"proc-000000__hop", "proc-idle-000001__idle"}
    (desc,) = check_sources("4d", cfg())
    assert desc["samples"] == 1 and desc["filtered"] == {r: 1 for r in ASSETS.values() if r}


def test_a_source_with_only_marked_samples_is_one_clear_error_not_a_hang(marked: Path) -> None:
    shard = next(r["shard"] for r in pq.read_table(marked / "index.parquet").to_pylist()
                 if r["key"] == "proc-idle-000001__idle")  # one asset per part: this shard holds only it
    only = DataConfig(grids=[str(marked / shard)], views=2, frames=4, height=8, width=8, prefetch=0)
    with pytest.raises(UserError, match=r"holds only samples the render job filtered out \(1 static\); keep them"):
        check_sources("4d", only)
    with pytest.raises(UserError, match="only samples the render job filtered out"):
        next(iter(TrainLoader("4d", only, 1)))  # the loader itself stops too, after ShardStream.EMPTY_EPOCHS
    check_sources("4d", dataclasses.replace(only, keep_filtered=["static"]))


def test_a_worker_whose_shards_of_one_epoch_are_all_marked_moves_on(tmp_path: Path) -> None:
    """Shards are dealt to workers anew each epoch: a worker may draw only marked shards for an epoch of a
    source that holds kept samples. It reads on into the next epochs instead of stopping."""
    from training.data import ShardStream
    out = tmp_path / "out"
    for part in range(4):  # one kept sample, in the last of four shards
        commit_part(out, part, [_sample(f"s{part}", "" if part == 3 else "static")], [])
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    for seed in range(6):
        for rank in range(2):
            stream = iter(ShardStream(shards, rank, 2, seed, 1, keep=frozenset()))
            assert [next(stream)[0] for _ in range(3)] == ["s3"] * 3


def test_an_output_made_before_the_filters_is_not_judged_by_a_rerun(tmp_path: Path) -> None:
    """Its samples were never measured: adding filtered ones beside them would mix judged and unjudged rows
    (and count the old ones as kept), so a re-run with filters is refused; with --filters '' it may go on."""
    import yaml

    from pipelines.common.config import check_same_content, to_dict
    from pipelines.render_objaverse import FILTER_OPTIONS
    out = tmp_path / "out"
    out.mkdir()
    cfg = RenderJobConfig(source="procedural", output=str(out))
    recorded = {k: v for k, v in to_dict(cfg).items() if k not in FILTER_OPTIONS}  # as written before them
    (out / "config.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(UserError, match=r"filters: \[\] -> \['empty'"):
        main(["--source", "procedural", "--output", str(out)])
    check_same_content(dataclasses.replace(cfg, filters=[]), out, FILTER_OPTIONS, absent={"filters": []})
