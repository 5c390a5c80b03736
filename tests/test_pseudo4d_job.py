"""The pseudo-4D job end to end on a real local Ray: good and bad videos, geometry, readers, resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.make_pseudo4d import main
from pipelines.procedural_video import make_video
from pipelines.common.video import encode_video, encode_video_bytes

pytestmark = pytest.mark.ray

DOT = (52.0, 40.0)   # source-video pixel coordinates of the marked point


def _dot_video(frames: int = 14) -> np.ndarray:
    """Dim moving texture with a bright, fixed Gaussian dot: motion for the static check, a landmark for geometry."""
    base = (make_video(11, 96, 80, frames).astype(np.float64) * 0.35)
    ys, xs = np.mgrid[0:80, 0:96] + 0.5
    dot = 255 * np.exp(-((xs - DOT[0]) ** 2 + (ys - DOT[1]) ** 2) / (2 * 2.5 ** 2))
    return np.clip(np.maximum(base, dot[None, :, :, None]), 0, 255).round().astype(np.uint8)


def _centroid(img: np.ndarray) -> np.ndarray:
    w = np.clip(img.astype(np.float64).mean(-1) - 130.0, 0, None)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(w * (xs + 0.5)).sum() / w.sum(), (w * (ys + 0.5)).sum() / w.sum()])


def _grids(out: Path) -> dict[str, dict[str, bytes]]:
    import webdataset as wds
    shards = sorted(str(p) for p in (out / "shards").glob("shard-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def _args(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--input", str(inp), "--output", str(out), "--items-per-part", "2",
            "--set", "transform.family=all", "--set", "transform.min_strength=1.0", *extra]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    encode_video(d / "good1.mp4", make_video(1, 64, 48, 12), 24.0)
    encode_video(d / "good2.webm", make_video(2, 64, 48, 12), 24.0, codec="libvpx-vp9")
    encode_video(d / "good3.avi", make_video(3, 48, 64, 12), 24.0, codec="mpeg4")
    encode_video(d / "dot.mp4", _dot_video(), 24.0, crf=4)
    encode_video(d / "short.mp4", make_video(4, 64, 48, 4), 24.0)
    encode_video(d / "static.mov", make_video(5, 64, 48, 12, motion=0.0), 24.0)
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return d


def test_job_writes_good_videos_and_records_bad_ones(ray_local, videos, tmp_path):
    out = tmp_path / "out"
    assert main(_args(videos, out)) == 0
    index = pq.read_table(out / "index.parquet").to_pandas()
    failures = pq.read_table(out / "failures.parquet").to_pandas()
    assert dict(zip(failures.item_id, failures.stage)) == {"corrupt.mp4": "decode", "short.mp4": "short",
                                                           "static.mov": "static"}
    good = {"good1.mp4", "good2.webm", "good3.avi", "dot.mp4"}
    grids = index[index.stream == "grids"]
    assert set(grids.item_id) == good and set(grids.kind) == {"pseudo4d"} and len(grids) == 4
    clips = index[index.stream == "clips"]
    assert sorted(clips.context) == ["dynamic"] * 4 + ["freeze-time"] * 4
    assert set(zip(clips.context, clips.frames)) == {("dynamic", 4), ("freeze-time", 3)}
    assert json.loads((out / "summary.json").read_text())["failures_total"] == 3

    # WebDataset reads every grid with all V x T frames, cameras and meta (test_pseudo4d_affine checks borders).
    samples = _grids(out)
    assert len(samples) == 4
    for key, s in samples.items():
        cams, meta = json.loads(s["cameras.json"]), json.loads(s["meta.json"])
        assert cams["type"] == "affine2d" and np.allclose(cams["affine"][0], [[1, 0, 0], [0, 1, 0]])
        assert meta["kind"] == "pseudo4d" and len(meta["frame_indices"]) == 4
        frames = sorted(k for k in s if k.endswith(".png"))
        assert frames == [f"v{v:02d}t{t:02d}.png" for v in range(3) for t in range(4)]
        for v in range(3):
            img = np.asarray(Image.open(io.BytesIO(s[f"v{v:02d}t00.png"])))
            assert img.shape == (32, 32, 3) and img.std() > 5

    # The marked dot lands where source_to_view0 and then A_v say, in every view and every frame.
    (dot_key,) = [k for k, s in samples.items() if json.loads(s["meta.json"])["item_id"] == "dot.mp4"]
    s = samples[dot_key]
    meta, mats = json.loads(s["meta.json"]), np.array(json.loads(s["cameras.json"])["affine"])
    p0 = np.array(meta["source_to_view0"]) @ np.array([DOT[0], DOT[1], 1.0])
    for v in range(3):
        expected = mats[v] @ np.array([p0[0], p0[1], 1.0])
        for t in range(4):
            found = _centroid(np.asarray(Image.open(io.BytesIO(s[f"v{v:02d}t{t:02d}.png"]))))
            assert np.linalg.norm(found - expected) < 1.0, (v, t, found, expected)

    # ray.data reads both streams, one row per sample.
    ds = ray_local.data.read_webdataset(str(out / "shards"), decoder=None)
    assert ds.count() == 4
    rows = ray_local.data.read_webdataset(str(out / "clips"), decoder=None).take_all()
    assert len(rows) == 8 and all("meta.json" in r and "f00.png" in r for r in rows)

    # Resume: a second run does nothing; a part lost before its commit is redone without duplicates.
    assert main(_args(videos, out)) == 0
    again = pq.read_table(out / "index.parquet").to_pandas()
    assert sorted(again.key) == sorted(index.key)
    dot_part = int(grids[grids.item_id == "dot.mp4"].part.iloc[0])
    (out / "_parts" / f"part-{dot_part:06d}.index.parquet").unlink()      # as if it crashed before committing
    assert main(_args(videos, out, "--retry-failed", "true")) == 0
    redone = pq.read_table(out / "index.parquet").to_pandas()
    assert sorted(redone.key) == sorted(index.key) and redone.key.is_unique
    assert len(pq.read_table(out / "failures.parquet")) == 3
    tar_keys = [m.split(".")[0] for t in sorted((out / "shards").glob("*.tar")) for m in tarfile.open(t).getnames()]
    assert len(set(tar_keys)) == 4      # no grid sits in two shards
    assert _grids(out)[dot_key]["v02t03.png"] == s["v02t03.png"]      # the redone grid is bit-identical

    # One exit-code rule for every data job (pipelines.common.job.exit_code): some failures exit 0 (above),
    # a run whose every item failed exits 1, with the failures recorded.
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("corrupt.mp4", "short.mp4"):
        (bad / name).write_bytes((videos / name).read_bytes())
    assert main(_args(bad, tmp_path / "bad_out")) == 1
    assert len(pq.read_table(tmp_path / "bad_out" / "failures.parquet")) == 2


def test_job_reads_a_webdataset_of_videos_and_procedural_source(ray_local, tmp_path):
    tar_path = tmp_path / "videos-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, seed in (("clipA", 1), ("clipB", 2)):
            for name, payload in ((f"{key}.mp4", encode_video_bytes(make_video(seed, 64, 48, 12), 24.0)),
                                  (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "wds"
    assert main(_args(tar_path, out)) == 0
    index = pq.read_table(out / "index.parquet").to_pandas()
    assert set(index[index.stream == "grids"].item_id) == {"videos-000000.tar/clipA.mp4", "videos-000000.tar/clipB.mp4"}

    out = tmp_path / "proc"
    assert main(["--preset", "tiny", "--output", str(out), "--border", "pad"]) == 0
    samples = _grids(out)
    assert len(samples) == 3            # tiny: 3 procedural videos
    s = next(iter(samples.values()))
    masks = [np.asarray(Image.open(io.BytesIO(s[f"v{v:02d}mask.png"]))) for v in range(3)]
    assert masks[0].min() == 255 and masks[2].min() == 0   # pad mode: the moved views have an empty margin
    # and the readers take the grid's frames, not its masks (a mask named like a frame once broke every reader)
    from pipelines.common.shards import decode_grid
    grid, meta = decode_grid(s)
    assert grid.shape[:2] == (3, meta["frames"]) and grid.shape[-1] == 3, grid.shape
    frame = np.asarray(Image.open(io.BytesIO(s["v02t00.png"])))
    assert np.array_equal(grid[2, 0], frame)
