"""The render job end to end on a real local Ray with a real Blender, at tiny sizes."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.common.config import ConfigError, parse_config
from pipelines.common.errors import UserError
from pipelines.common.shards import iter_tar_samples
from pipelines.render_objaverse import PRESETS, RenderJobConfig, list_items, main
from rendering.cameras import project
from rendering.procedural import KINDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def procedural_glbs(tmp_path_factory) -> Path:
    """Four procedural GLBs (rigid, skinned, shape-key, rigid), two actions each, exported by Blender."""
    out = tmp_path_factory.mktemp("glbs")
    subprocess.run([sys.executable, "-m", "rendering.procedural", "--out", str(out), "--count", "4", "--actions", "2"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def _samples(output: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((output / "shards").glob("*.tar")):
        for key, files in iter_tar_samples(shard):
            assert key not in out, f"sample {key} appears twice"
            out[key] = files
    return out


def _rgba(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.mode == "RGBA"
    return np.asarray(im)


def test_procedural_job_multi_action_skinned_shapekey(ray_local, tmp_path):
    out = tmp_path / "out"
    main(["--preset", "tiny", "--output", str(out), "--count", "3", "--resolution", "40", "--views", "3",
          "--cache-dir", str(tmp_path / "cache")])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_ok_this_run"] == 3 and summary["items_failed_this_run"] == 0
    samples = _samples(out)
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(samples)
    by_item: dict[str, list[str]] = {}
    for key, files in samples.items():
        meta = json.loads(files["meta.json"])
        cams = json.loads(files["cameras.json"])
        by_item.setdefault(meta["uid"], []).append(meta["action"])
        assert meta["kind"] == "render" and meta["views"] == 3 and meta["frames"] == 2
        assert len(meta["frame_indices"]) == 2 and meta["frame_indices"][1] > meta["frame_indices"][0]
        assert set(meta["normalization"]) == {"center", "scale"}
        assert np.array(cams["K"]).shape == (3, 3, 3) and np.array(cams["w2c"]).shape == (3, 4, 4)
        pngs = sorted(k for k in files if k.endswith(".png"))
        assert pngs == [f"v{v:02d}t{t:02d}.png" for v in range(3) for t in range(2)]
        for name in pngs:
            img = _rgba(files[name])
            assert img.shape == (40, 40, 4)
            alpha = img[..., 3]
            assert alpha.max() > 0, f"{key}/{name} is empty"
            # Transparent background, and the object (normalized over all frames) never touches the border.
            border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
            assert border.max() == 0, f"{key}/{name} touches the image border"
        # The animation is really there: the two sampled times of view 0 differ.
        assert not np.array_equal(_rgba(files["v00t00.png"]), _rgba(files["v00t01.png"])), key
        # Different cameras see different images.
        assert not np.array_equal(_rgba(files["v00t00.png"]), _rgba(files["v01t00.png"])), key
    # Multi-action: every asset gave one sample per action (2 each), named after its glTF animation.
    assert {k: len(v) for k, v in by_item.items()} == {"proc-000000": 2, "proc-000001": 2, "proc-000002": 2}
    assert sorted(by_item["proc-000001"]) == ["bend", "wave"]  # the skinned asset (armature actions)
    # One glTF animation over two nodes drives both (one action, a slot per object).
    assert json.loads(samples["proc-000000__hop"]["meta.json"])["animated"] == ["body", "head"]
    assert json.loads(samples["proc-000001__wave"]["meta.json"])["animated"] == ["rig"]
    assert sorted(by_item["proc-000002"]) == ["morph_squash", "morph_stretch"]  # shape-key actions

    # Cameras agree with the pixels: a symmetric squash of a sphere (centred by normalization) lands
    # where K and w2c project the origin, in every view.
    files = samples["proc-000002__morph_squash"]
    cams = json.loads(files["cameras.json"])
    for v in range(3):
        expected = project(np.array(cams["K"][v]), np.array(cams["w2c"][v]), np.zeros((1, 3)))[0]
        alpha = _rgba(files[f"v{v:02d}t01.png"])[..., 3].astype(float)
        ys, xs = np.mgrid[0:40, 0:40]
        centroid = np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum() + 0.5
        np.testing.assert_allclose(centroid, expected, atol=1.0)


def test_non_square_render_matches_its_cameras(ray_local, tmp_path):
    """A 9:16 frame: PNGs, meta, cameras.json and the index agree on 36x64, and K/w2c put the object where it is."""
    out = tmp_path / "out"
    main(["--preset", "tiny", "--output", str(out), "--seed", "2", "--count", "1", "--max-actions", "1",
          "--views", "3", "--height", "36", "--width", "64", "--cache-dir", str(tmp_path / "cache")])
    (key, files), = _samples(out).items()
    assert key == "proc-000002__morph_squash"  # seed 2 is the shape-key blob: symmetric, centred by normalization
    meta, cams = json.loads(files["meta.json"]), json.loads(files["cameras.json"])
    assert (meta["height"], meta["width"]) == (cams["height"], cams["width"]) == (36, 64)
    (row,) = pq.read_table(out / "index.parquet").to_pylist()
    assert (row["height"], row["width"]) == (36, 64)
    assert len(set(cams["azimuth_deg"])) == 3 and cams["azimuth_deg"][-1] - cams["azimuth_deg"][0] == \
        pytest.approx(meta["render"]["arc_deg"])
    ys, xs = np.mgrid[0:36, 0:64]
    for v in range(3):
        for t in range(2):
            img = _rgba(files[f"v{v:02d}t{t:02d}.png"])
            assert img.shape == (36, 64, 4)
            alpha = img[..., 3].astype(float)
            border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
            assert alpha.max() > 0 and border.max() == 0, f"v{v}t{t} is empty or cut by the frame"
        # The origin projects onto the blob's centroid: K is the non-square frame's, fx == fy.
        expected = project(np.array(cams["K"][v]), np.array(cams["w2c"][v]), np.zeros((1, 3)))[0]
        alpha = _rgba(files[f"v{v:02d}t01.png"])[..., 3].astype(float)
        centroid = np.array([(xs * alpha).sum(), (ys * alpha).sum()]) / alpha.sum() + 0.5
        np.testing.assert_allclose(centroid, expected, atol=1.0)


def test_size_options_and_resolution_shortcut():
    assert (RenderJobConfig().height, RenderJobConfig().width) == (144, 256)
    assert (PRESETS["paper"]().height, PRESETS["paper"]().width) == (144, 256)
    cfg, _ = parse_config(RenderJobConfig, PRESETS, ["--preset", "tiny", "--resolution", "40"])
    assert (cfg.height, cfg.width, cfg.resolution) == (40, 40, 0)
    settings = cfg.render_settings()
    assert (settings.height, settings.width) == (40, 40)
    cfg, _ = parse_config(RenderJobConfig, PRESETS, ["--preset", "tiny", "--height", "90", "--width", "160"])
    assert (cfg.height, cfg.width) == (90, 160)


def test_procedural_ids_name_one_asset_across_seeds():
    first = {i["item_id"]: i for i in list_items(RenderJobConfig(source="procedural", count=6, seed=0))}
    later = {i["item_id"]: i for i in list_items(RenderJobConfig(source="procedural", count=6, seed=4))}
    shared = sorted(first.keys() & later.keys())
    assert shared == ["proc-000004", "proc-000005"]
    for item_id in shared:
        assert first[item_id] == later[item_id]  # same seed, same kind: the same asset
    # Any run of 3 consecutive seeds still covers every kind.
    assert {i["kind"] for i in list(later.values())[:3]} == set(KINDS)


def test_shards_read_with_webdataset_and_ray(ray_local, tmp_path):
    import webdataset as wds
    out = tmp_path / "out"
    main(["--preset", "tiny", "--output", str(out), "--count", "2", "--items-per-part", "1",
          "--cache-dir", str(tmp_path / "cache")])
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(shards) == 2
    rows = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(rows) == 4
    for row in rows:
        assert {"v00t00.png", "v01t01.png", "cameras.json", "meta.json"} <= set(row)
        assert json.loads(row["meta.json"])["kind"] == "render"
    ds = ray_local.data.read_webdataset(str(out / "shards"), decoder=None)
    ray_rows = ds.take_all()
    assert sorted(r["__key__"] for r in ray_rows) == sorted(r["__key__"] for r in rows)
    assert all(len(json.loads(r["cameras.json"])["K"]) == 2 for r in ray_rows)


def _name(item_id: str) -> str:
    """A local asset's name: its item id without the file fingerprint."""
    name, fingerprint = item_id.rsplit("-", 1)
    assert len(fingerprint) == 10
    return name


def test_a_local_asset_is_its_file_not_its_name(ray_local, tmp_path, procedural_glbs):
    """Another file under a done asset's name (a second scene.glb elsewhere), or the same file changed, is
    rendered, not skipped as done; an unchanged one is skipped; every key stays unique."""
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--source", "local", "--output", str(out), "--max-actions", "1"]

    def run(folder: Path, asset: str) -> dict:
        folder.mkdir(exist_ok=True)
        shutil.copyfile(procedural_glbs / f"{asset}.glb", folder / "scene.glb")
        main(args + ["--input", str(folder)])
        return json.loads((out / "summary.json").read_text())
    assert run(tmp_path / "a", "proc-000000")["items_ok_this_run"] == 1
    second = run(tmp_path / "b", "proc-000001")  # same name, another file: rendered, and said so
    assert second["items_ok_this_run"] == 1 and second["items_replacing_earlier"] == 1
    main(args + ["--input", str(tmp_path / "b")])
    again = json.loads((out / "summary.json").read_text())
    assert again["items_skipped"] == 1 and again["items_ok_this_run"] == 0  # unchanged: done
    time.sleep(0.01)  # a new modification time even on coarse clocks
    assert run(tmp_path / "b", "proc-000002")["items_ok_this_run"] == 1  # changed in place: re-done
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len({r["item_id"] for r in index}) == 3 and {_name(r["item_id"]) for r in index} == {"scene"}
    assert len({r["key"] for r in index}) == len(index) == len(_samples(out))
    metas = [json.loads(files["meta.json"]) for files in _samples(out).values()]
    assert sorted(m["item_id"] for m in metas) == sorted(r["item_id"] for r in index)


def test_failure_isolation_then_retry(ray_local, tmp_path, procedural_glbs):
    assets = tmp_path / "assets"
    shutil.copytree(procedural_glbs, assets)
    (assets / "corrupt.glb").write_bytes(b"glTF" + bytes(range(256)) * 8)
    good = (procedural_glbs / "proc-000001.glb").read_bytes()
    (assets / "truncated.glb").write_bytes(good[: len(good) // 2])
    # A valid model without animation: imported fine, then refused as static.
    (assets / "static.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--source", "local", "--input", str(assets), "--output", str(out),
            "--timeout-s", "12", "--items-per-part", "3"]
    faults = ["--set", "inject_faults={proc-000002: hang, proc-000003: crash}"]
    main(args + faults)
    failures = {_name(r["item_id"]): r for r in pq.read_table(out / "failures.parquet").to_pylist()}
    assert {k: v["stage"] for k, v in failures.items()} == {
        "corrupt": "import", "truncated": "import", "static": "static", "proc-000002": "timeout",
        "proc-000003": "crash"}
    assert "Bad glTF" in failures["corrupt"]["error"] or "glb" in failures["corrupt"]["error"].lower()
    assert "killed" in failures["proc-000002"]["error"] and failures["proc-000002"]["seconds"] >= 12
    assert "died" in failures["proc-000003"]["error"]
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted({_name(r["item_id"]) for r in index}) == ["proc-000000", "proc-000001"]  # the good ones all made it

    # Re-running skips everything: finished and failed assets alike.
    main(args + faults)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_skipped"] == 7 and summary["samples_this_run"] == 0
    # Retrying the failures (faults gone) recovers the hang and crash victims, not the broken files.
    main(args + ["--retry-failed", "true"])
    failures = {_name(r["item_id"]): r["stage"] for r in pq.read_table(out / "failures.parquet").to_pylist()}
    assert failures == {"corrupt": "import", "truncated": "import", "static": "static"}
    index = pq.read_table(out / "index.parquet").to_pylist()
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys)) == 8
    assert sorted(keys) == sorted(_samples(out))


def test_resume_after_interrupted_part(ray_local, tmp_path):
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--output", str(out), "--count", "3", "--items-per-part", "1",
            "--cache-dir", str(tmp_path / "cache")]
    main(args)
    before = _samples(out)
    assert len(before) == 6
    # Simulate a crash of part 1 after its shard landed but before its commit record, plus a half-written shard.
    (out / "_parts" / "part-000001.index.parquet").unlink()
    (out / "shards" / "shard-000007.tar.tmp").write_bytes(b"partial")
    main(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_skipped"] == 2 and summary["items_ok_this_run"] == 1
    after = _samples(out)
    assert sorted(after) == sorted(before)  # nothing lost, nothing duplicated
    assert not (out / "shards" / "shard-000001.tar").exists()
    assert not list((out / "shards").glob("*.tmp"))
    index = pq.read_table(out / "index.parquet")
    assert index.num_rows == 6 and len(set(index.column("key").to_pylist())) == 6


@pytest.mark.parametrize("argv,needle", [
    (["--views", "0"], "--views"),
    (["--engine", "blender-internal"], "option 'engine' must be one of cycles, cycles-gpu, eevee"),
    (["--source", "local"], "--input"),
    (["--source", "local", "--input", "/nonexistent/dir"], "no .glb"),
    (["--source", "objaverse", "--input", "/nonexistent/uids.txt"], "does not exist"),
    (["--distance", "0.5"], "too close"),
    # Far enough for the 40-degree vertical view, not for the narrower horizontal one of a portrait frame.
    (["--height", "32", "--width", "18", "--distance", "3.5"], "too close"),
    (["--height", "4"], "--height"),
    (["--denoise-quality", "ULTRA"], "option 'denoise_quality' must be one of FAST, BALANCED, HIGH"),
    (["--png-compression", "101"], "--png-compression must be 0..100"),
    (["--set", "inject_faults={a: explode}"], "hang or crash"),
])
def test_bad_options_fail_before_any_work(tmp_path, argv, needle):
    out = tmp_path / "out"
    with pytest.raises((ConfigError, UserError)) as err:
        main(["--preset", "tiny", "--output", str(out)] + argv)
    assert needle in str(err.value)
    assert not out.exists()


def test_bad_option_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "pipelines/render_objaverse.py", "--preset", "tiny", "--frames", "-1",
                           "--output", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--frames" in lines[0]


def test_dry_run_lists_shards_and_resumes_at_2k(ray_local, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    n = 2000
    pq.write_table(pa.table({"path": [f"assets/{i:05d}.glb" for i in range(n)],
                             "uid": [f"uid{i:05d}" for i in range(n)]}), manifest)
    out = tmp_path / "out"
    args = ["--source", "local", "--input", str(manifest), "--output", str(out), "--dry-run", "true",
            "--items-per-part", "64", "--views", "4", "--frames", "4"]
    main(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_ok_this_run"] == n and summary["samples_total"] == n
    assert summary["frames_this_run"] == n * 16
    assert len(list((out / "shards").glob("*.tar"))) == (n + 63) // 64
    main(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items_skipped"] == n and summary["samples_total"] == n


def test_depth_and_normal_passes(ray_local, tmp_path):
    out = tmp_path / "out"
    main(["--preset", "tiny", "--output", str(out), "--count", "3", "--limit", "1", "--max-actions", "1",
          "--resolution", "48", "--depth", "true", "--normals", "true", "--cache-dir", str(tmp_path / "cache")])
    (key, files), = _samples(out).items()
    meta = json.loads(files["meta.json"])
    cams = json.loads(files["cameras.json"])
    assert sorted(k for k in files if k.startswith("v00t00")) == ["v00t00.depth.png", "v00t00.normal.png",
                                                                  "v00t00.png"]
    for v in range(2):
        depth_img = Image.open(io.BytesIO(files[f"v{v:02d}t00.depth.png"]))
        depth = np.asarray(depth_img).astype(np.float64) * meta["depth_scale"]
        assert depth_img.mode.startswith("I") and depth.shape == (48, 48)
        alpha = _rgba(files[f"v{v:02d}t00.png"])[..., 3]
        # Depth is set exactly where the object is (antialiased edges aside) and 0 on the background.
        assert ((depth > 0) == (alpha > 0)).mean() > 0.97
        # Everything lies inside the unit sphere around the origin, so depths fall in distance -/+ 1.
        d = cams["distance"]
        assert d - 1.0 - 1e-3 <= depth[depth > 0].min() and depth.max() <= d + 1.0
        normal = np.asarray(Image.open(io.BytesIO(files[f"v{v:02d}t00.normal.png"]))).astype(np.float64)
        n = normal[alpha == 255] / 255.0 * 2.0 - 1.0
        np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=0.08)
        # Visible surfaces face the camera: normals point towards it on average.
        w2c = np.array(cams["w2c"][v])
        center = -w2c[:3, :3].T @ w2c[:3, 3]
        assert (n.mean(0) @ (center / np.linalg.norm(center))) > 0.5


def test_worker_survives_hang_and_crash_and_cleans_up():
    from rendering.worker import BlenderWorker, WorkerFailure
    worker = BlenderWorker(threads=1)
    try:
        first = worker.call({"op": "ping"}, timeout=60)
        scratch = worker.scratch
        assert scratch is not None and scratch.is_dir()
        with pytest.raises(WorkerFailure) as err:
            worker.call({"op": "ping", "fault": "hang"}, timeout=2)
        assert err.value.stage == "timeout"
        assert not scratch.exists()  # frames a killed Blender staged go with it
        with pytest.raises(WorkerFailure) as err:
            worker.call({"op": "ping", "fault": "crash"}, timeout=60)
        assert err.value.stage == "crash" and "signal 6" in str(err.value)
        again = worker.call({"op": "ping"}, timeout=60)  # a fresh Blender answers the next request
        assert again["pid"] != first["pid"] and worker.restarts == 2
    finally:
        worker.close()
    assert worker.proc is None


def test_a_new_worker_removes_what_killed_parents_left(tmp_path):
    """A parent killed with SIGKILL leaves its Blender scratch folder (RAM, in /dev/shm) and its log behind;
    the next worker on the machine removes those of dead parents and leaves a live parent's alone."""
    from rendering.worker import BlenderWorker, _scratch_root
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: the parent that was killed
    root = Path(_scratch_root() or tmp_path)
    made = {
        "dead_scratch": root / f"blender-scratch-{dead.pid}-abc",
        "live_scratch": root / f"blender-scratch-{os.getpid()}-abc",
        "dead_log": tmp_path / f"blender-worker-{dead.pid}-abc.log",
        "live_log": tmp_path / f"blender-worker-{os.getpid()}-abc.log",
    }
    try:
        for name, path in made.items():
            if "scratch" in name:
                path.mkdir()
                (path / "frame.png").write_bytes(b"x" * 100)
            else:
                path.write_text("log")
        BlenderWorker(threads=1, log_dir=str(tmp_path))  # sweeps on construction, before any Blender starts
        assert not made["dead_scratch"].exists() and not made["dead_log"].exists()
        assert made["live_scratch"].is_dir() and made["live_log"].is_file()
    finally:
        import shutil
        for path in made.values():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def test_rerun_with_other_render_settings_is_refused_before_any_work(tmp_path):
    """A re-run into an existing output with settings that shape the samples (here --views) would add rows of
    the new settings beside the old ones: one line, nothing started; workers and limits may change."""
    import dataclasses

    from pipelines.common.config import check_same_content, write_resolved
    from pipelines.common.errors import UserError
    from pipelines.render_objaverse import CONTENT_OPTIONS, PRESETS
    from rendering.settings import RenderSettings
    out = tmp_path / "out"
    cfg = dataclasses.replace(PRESETS["tiny"](), output=str(out))
    write_resolved(cfg, out)
    check_same_content(dataclasses.replace(cfg, concurrency=5, limit=1, retry_failed=True), out, CONTENT_OPTIONS)
    with pytest.raises(UserError, match=r"views: 2 -> 4.*samples: 1 -> 8"):
        main(["--preset", "tiny", "--output", str(out), "--views", "4", "--samples", "8"])
    assert not (out / "shards").exists() and not (out / "summary.json").exists()
    # Every setting a render receives is guarded, under its option name; threads, persistent data, PNG
    # compression and the render region change speed and file size, not what a frame shows
    # (RenderSettings.SPEED_ONLY).
    from dataclasses import asdict
    base = asdict(cfg.render_settings())
    covered = set()
    assert CONTENT_OPTIONS[:2] == ("source", "split")
    for opt in CONTENT_OPTIONS[2:]:  # source and split are no render settings: they pick the assets
        value = getattr(cfg, opt)
        other = (not value) if isinstance(value, bool) else value + 1 if isinstance(value, (int, float)) \
            else value + "x"
        changed = asdict(dataclasses.replace(cfg, **{opt: other}).render_settings())
        covered |= {k for k in base if base[k] != changed[k]}
    assert covered == {f.name for f in dataclasses.fields(RenderSettings)} - {"threads", "persistent_data",
                                                                              "png_compression", "render_region"}
