"""Decoding, clip sampling, input listing and per-item failure stages of the pseudo-4D job (no Ray)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.common.config import run_cli
from pipelines.common.errors import UserError
from pipelines.common.errors import ItemError
from pipelines.make_pseudo4d import PRESETS, Pseudo4DProcessor, list_items, main
from pipelines.procedural_video import make_video
from pipelines.common.video import encode_video, encode_video_bytes
from pipelines.video_io import VideoSource, open_input


def _motion(v: np.ndarray) -> float:
    return float(np.abs(np.diff(v.astype(np.int16), axis=0)).mean())


def test_procedural_videos_move_are_seeded_and_can_be_static():
    a, b = make_video(1, 64, 48, 10), make_video(1, 64, 48, 10)
    assert a.shape == (10, 48, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, make_video(2, 64, 48, 10))
    assert _motion(a) > 5.0
    assert _motion(make_video(1, 64, 48, 10, motion=0.0)) == 0.0


@pytest.mark.parametrize("codec,suffix", [("libx264", ".mp4"), ("libvpx-vp9", ".webm"), ("mpeg4", ".avi"),
                                          ("libx264", ".mov")])
def test_decode_strided_resized_cropped_clip(tmp_path, codec, suffix):
    video = make_video(5, 64, 48, 20)
    path = tmp_path / f"v{suffix}"
    encode_video(path, video, 20.0, codec=codec)
    with VideoSource(open_input(path=str(path))) as src:
        assert (src.info.width, src.info.height, src.info.fps) == (64, 48, 20.0)
        assert src.info.frames in (19, 20, 21)  # containers estimate from the duration
        full, idx = src.read(0, 20, 1, (64, 48), (0, 0, 64, 48))
        assert idx == list(range(20))
        assert np.abs(full.astype(int) - video).mean() < 12       # lossy codec, same content, same order
        # A strided clip with a start > 0 goes through a seek: the same frames as decoding from the top.
        clip, idx = src.read(5, 4, 3, (64, 48), (8, 4, 40, 36))
        assert idx == [5, 8, 11, 14] and clip.shape == (4, 32, 32, 3)
        assert np.abs(clip.astype(int) - full[idx, 4:36, 8:40]).max() <= 2


def test_corrupt_and_missing_videos_raise_decode_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ItemError) as e:
        VideoSource(open_input(path=str(bad)))
    assert e.value.stage == "decode"
    proc = Pseudo4DProcessor(PRESETS["tiny"]())
    with pytest.raises(ItemError) as e:
        proc({"item_id": "gone.mp4", "path": str(tmp_path / "gone.mp4")})
    assert e.value.stage == "decode"


def test_short_and_static_videos_raise_their_stage(tmp_path):
    cfg = PRESETS["tiny"]()        # 4 frames at 12 fps from 24 fps: stride 2, needs 7 frames
    proc = Pseudo4DProcessor(cfg)
    encode_video(tmp_path / "short.mp4", make_video(0, 64, 48, 5), 24.0)
    encode_video(tmp_path / "static.mp4", make_video(0, 64, 48, 12, motion=0.0), 24.0)
    with pytest.raises(ItemError) as e:
        proc({"item_id": "short.mp4", "path": str(tmp_path / "short.mp4")})
    assert e.value.stage == "short" and "need 7" in str(e.value)
    with pytest.raises(ItemError) as e:
        proc({"item_id": "static.mp4", "path": str(tmp_path / "static.mp4")})
    assert e.value.stage == "static"


def test_clip_sampling_is_reproducible_per_item_and_seed(tmp_path):
    encode_video(tmp_path / "a.mp4", make_video(3, 96, 64, 40), 24.0)
    item = {"item_id": "a.mp4", "path": str(tmp_path / "a.mp4")}
    cfg = PRESETS["tiny"]()
    first, again = Pseudo4DProcessor(cfg)(item), Pseudo4DProcessor(cfg)(item)
    assert [s.files for s in first] == [s.files for s in again]
    meta = json.loads(first[0].files["meta.json"])
    assert np.diff(meta["frame_indices"]).tolist() == [2, 2, 2]          # 24 fps source, 12 fps target
    cfg.seed = 1
    other = json.loads(Pseudo4DProcessor(cfg)(item)[0].files["meta.json"])
    assert (other["frame_indices"], other["transform"]) != (meta["frame_indices"], meta["transform"])
    # One grid, one dynamic row and one freeze-time column; clips reuse the grid's frame bytes.
    grid, row, col = first
    assert (row.context, col.context, row.stream) == ("dynamic", "freeze-time", "clips")
    v, t = json.loads(row.files["meta.json"])["view"], json.loads(col.files["meta.json"])["time"]
    assert row.files["f01.png"] == grid.files[f"v{v:02d}t01.png"]
    assert col.files["f02.png"] == grid.files[f"v02t{t:02d}.png"]


def test_list_items_from_folder_glob_manifest_and_webdataset(tmp_path):
    vids = tmp_path / "vids"
    (vids / "sub").mkdir(parents=True)
    data = encode_video_bytes(make_video(1, 64, 48, 12), 24.0)
    for name in ("a.mp4", "sub/b.webm", "notes.txt"):
        (vids / name).write_bytes(data)

    def cfg(inp: str):
        c = PRESETS["tiny"]()
        c.input = inp
        return c

    assert [i["item_id"] for i in list_items(cfg(str(vids)))] == ["a.mp4", "sub/b.webm"]
    assert len(list_items(cfg(str(vids / "**" / "*.*")))) == 2
    pq.write_table(pa.table({"path": ["vids/a.mp4"], "item_id": ["clip-a"]}), tmp_path / "m.parquet")
    (item,) = list_items(cfg(str(tmp_path / "m.parquet")))
    assert item["item_id"] == "clip-a" and item["path"] == str(tmp_path / "vids" / "a.mp4")

    with tarfile.open(tmp_path / "videos-000.tar", "w") as tar:
        for name, payload in (("k1.mp4", data), ("k1.json", b"{}"), ("k2.mp4", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    items = list_items(cfg(str(tmp_path / "videos-{000..000}.tar")))
    assert [i["item_id"] for i in items] == ["videos-000.tar/k1.mp4", "videos-000.tar/k2.mp4"]
    samples = Pseudo4DProcessor(PRESETS["tiny"]())(items[1])        # decoded straight out of the tar
    assert samples[0].views == 3 and "v02t03.png" in samples[0].files

    with pytest.raises(UserError, match="no videos found"):
        list_items(cfg(str(tmp_path / "m*.mp4")))
    with pytest.raises(UserError, match="is not 'procedural'"):
        list_items(cfg(str(tmp_path / "missing-folder")))


def test_cli_rejects_bad_input_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--preset", "tiny", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: input")
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--preset", "tiny", "--set", "transform.family=spiral", "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "transform.family must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("image_format,png_mode", [("png", "fast"), ("png", "pillow"), ("jpg", "fast")])
def test_frames_decode_with_standard_readers(tmp_path, image_format, png_mode):
    from PIL import Image
    encode_video(tmp_path / "a.mp4", make_video(3, 96, 64, 20), 24.0)
    cfg = PRESETS["tiny"]()
    cfg.image_format, cfg.png_mode = image_format, png_mode
    grid, row, _ = Pseudo4DProcessor(cfg)({"item_id": "a.mp4", "path": str(tmp_path / "a.mp4")})
    frames = {k: np.asarray(Image.open(io.BytesIO(b))) for k, b in grid.files.items() if k.endswith(image_format)}
    assert len(frames) == 12 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames.values())
    assert f"f00.{image_format}" in row.files
    if image_format == "png":
        # Both PNG writers are lossless: the same pixels whichever wrote them.
        other = PRESETS["tiny"]()
        other.png_mode = "pillow" if png_mode == "fast" else "fast"
        grid2 = Pseudo4DProcessor(other)({"item_id": "a.mp4", "path": str(tmp_path / "a.mp4")})[0]
        for k, f in frames.items():
            assert np.array_equal(f, np.asarray(Image.open(io.BytesIO(grid2.files[k]))))


def test_fast_png_writer_is_lossless_for_grey_rgb_and_rgba():
    from PIL import Image
    from pipelines.frame_codec import encode_png_fast
    rng = np.random.default_rng(0)
    for shape in ((17, 23), (17, 23, 3), (5, 9, 4)):
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png_fast(a)))), a)
    with pytest.raises(ValueError):
        encode_png_fast(np.zeros((4, 4, 3), np.float32))


def test_resume_refuses_other_settings_but_allows_more_input(tmp_path):
    from pipelines.common.config import write_resolved
    from pipelines.make_pseudo4d import check_resume_settings
    out = tmp_path / "out"
    cfg = PRESETS["tiny"]()
    write_resolved(cfg, out)
    more = PRESETS["tiny"]()
    more.procedural.count, more.limit, more.concurrency = 10, 5, 1
    check_resume_settings(more, out)                       # more videos, other workers: fine
    other = PRESETS["tiny"]()
    other.views, other.transform.pan = 4, 0.3
    with pytest.raises(UserError, match=r"views: 3 -> 4.*transform"):
        check_resume_settings(other, out)


def test_several_grids_per_video_and_an_overstated_length(tmp_path, monkeypatch):
    import pipelines.make_pseudo4d as job
    encode_video(tmp_path / "a.mp4", make_video(3, 96, 64, 16), 24.0)
    item = {"item_id": "a.mp4", "path": str(tmp_path / "a.mp4")}
    cfg = PRESETS["tiny"]()
    cfg.grids_per_video = 2
    grids = [s for s in Pseudo4DProcessor(cfg)(item) if s.stream == "grids"]
    assert [g.key.rsplit("__", 1)[1] for g in grids] == ["g0", "g1"]
    assert grids[0].files["meta.json"] != grids[1].files["meta.json"]

    class Overstating(VideoSource):          # a container that claims 100 frames but holds 16
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.info.frames = 100

    monkeypatch.setattr(job, "VideoSource", Overstating)
    cfg.grids_per_video = 1
    meta = json.loads(Pseudo4DProcessor(cfg)(item)[0].files["meta.json"])
    assert meta["frame_indices"] == [9, 11, 13, 15]          # the last 7 frames that exist, stride 2


@pytest.mark.parametrize("codec", ["libx264", "none"])
def test_procedural_items_with_and_without_the_codec_round_trip(codec):
    cfg = PRESETS["tiny"]()
    cfg.procedural.codec = codec
    items = list_items(cfg)
    assert [i["item_id"] for i in items] == ["procedural-000000", "procedural-000001", "procedural-000002"]
    # an id names one video: another job seed gives the same video (seed 1) the same id, and new ones new ids
    cfg.procedural.seed = 1
    assert [i["item_id"] for i in list_items(cfg)] == ["procedural-000001", "procedural-000002", "procedural-000003"]
    cfg.procedural.seed = 0
    grid = Pseudo4DProcessor(cfg)(items[0])[0]
    meta = json.loads(grid.files["meta.json"])
    assert meta["source"] == "procedural:0" and meta["source_size"] == [64, 48] and meta["motion"] > 1.0


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_phone_videos_decode_upright(tmp_path, rotation):
    video = make_video(6, 64, 48, 8)
    encode_video(tmp_path / "phone.mp4", video, 24.0, crf=4, display_rotation=rotation)
    upright = np.stack([np.rot90(f, rotation // 90) for f in video])
    h, w = upright.shape[1:3]
    with VideoSource(open_input(path=str(tmp_path / "phone.mp4"))) as src:
        assert (src.info.width, src.info.height) == (w, h)
        clip, _ = src.read(0, 8, 1, (w, h), (0, 0, w, h))
    upside_down = np.stack([np.rot90(f, 2) for f in upright])
    # Chroma subsampling alone costs ~7 levels on these saturated textures; the wrong turn costs ~60.
    assert np.abs(clip.astype(int) - upright).mean() < 10 < 30 < np.abs(clip.astype(int) - upside_down).mean()


def test_manifest_urls_stream_over_http(tmp_path):
    import functools
    import http.server
    import threading
    (tmp_path / "www").mkdir()
    encode_video(tmp_path / "www" / "a.mp4", make_video(8, 64, 48, 12), 24.0)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        pq.write_table(pa.table({"path": [f"{url}/a.mp4", f"{url}/missing.mp4"]}), tmp_path / "m.parquet")
        cfg = PRESETS["tiny"]()
        cfg.input = str(tmp_path / "m.parquet")
        good, missing = list_items(cfg)
        assert good["path"] == f"{url}/a.mp4"
        proc = Pseudo4DProcessor(cfg)
        assert proc(good)[0].views == 3
        with pytest.raises(ItemError) as e:
            proc(missing)
        assert e.value.stage == "decode" and "404" in str(e.value)
    finally:
        server.shutdown()


def _tar_of(path, names):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return path


def test_one_id_for_two_videos_is_refused_and_a_second_collection_is_not_skipped_as_done(tmp_path) -> None:
    """Two folders' shard-000000.tar once gave their clip.mp4 one id, and the job silently kept one of the two;
    a second collection run into the same output had its videos with the first's relative names skipped as
    done. Ids stay what they were (a tar's name and member: listing more tars later changes no id), one id for
    two videos is refused, and a run from a new --input whose ids are done there is refused with what to do;
    any input the output took before (a resume) goes on."""
    from pipelines.video_inputs import check_input_change, list_videos, record_input, recorded_inputs
    a = _tar_of(tmp_path / "a" / "shard-000000.tar", ["clip.mp4", "other.mp4"])
    _tar_of(tmp_path / "b" / "shard-000000.tar", ["clip.mp4"])
    _tar_of(tmp_path / "b" / "shard-000001.tar", ["more.mp4"])
    ids_a = [it["item_id"] for it in list_videos(str(a))]
    assert ids_a == ["shard-000000.tar/clip.mp4", "shard-000000.tar/other.mp4"]
    both = [it["item_id"] for it in list_videos(str(tmp_path / "{a/shard-000000,b/shard-000001}.tar"))]
    assert both == ids_a + ["shard-000001.tar/more.mp4"]  # more tars listed: the first tar's ids unchanged
    with pytest.raises(UserError, match=r"lists two videos under one id 'shard-000000.tar/clip.mp4'.*item_id"):
        list_videos(str(tmp_path / "{a,b}" / "shard-000000.tar"))
    twice = _tar_of(tmp_path / "e" / "twice.tar", ["clip.mp4", "clip.mp4"])  # a tar may hold one name twice
    with pytest.raises(UserError, match=r"lists two videos under one id 'twice.tar/clip.mp4'"):
        list_videos(str(twice))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "clip.mp4").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "clip.mp4").write_bytes(b"y")
    (tmp_path / "d" / "new.mp4").write_bytes(b"z")
    first, second = list_videos(str(tmp_path / "c")), list_videos(str(tmp_path / "d"))
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    done = {it["item_id"] for it in first}
    with pytest.raises(UserError, match=r"1 of the videos listed from .* have the ids of videos this output already "
                                        r"holds from .* \(e.g. 'clip.mp4'\).* earlier --input"):
        check_input_change([c], d, second, done)
    check_input_change([c], c, first, done)  # a resume
    check_input_change([c + "/"], c, first, done)  # one folder, spelled otherwise
    check_input_change([c], d, second[1:], done)  # only new ids: goes on
    check_input_change([], d, second, done)  # a new output
    check_input_change([d, c], c, first, done)  # the first input again after another: a resume too
    out = tmp_path / "out"
    out.mkdir()
    assert recorded_inputs(out) == []
    (out / "config.yaml").write_text(f"input: {c}\n")  # an output made before inputs.json: its config's input
    assert recorded_inputs(out) == [c]
    record_input(out, d, recorded_inputs(out))
    record_input(out, d, recorded_inputs(out))
    assert recorded_inputs(out) == [c, d]
