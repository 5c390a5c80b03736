"""The Objaverse source against a loopback mirror of the hub layout: listing, retries, verification, cache."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.common.config import ConfigError
from pipelines.common.shards import iter_tar_samples
from pipelines.objaverse_source import (ANIMATED_LIST, TEST_LIST, AssetError, ensure_asset, list_assets,
                                        normalize_license, read_uid_list, split_uids, verify_glb, write_uid_lists)
from pipelines.render_objaverse import main

ROOT = Path(__file__).resolve().parents[1]

TEST_UID = read_uid_list(TEST_LIST)[0]

# uid -> (group, animationCount, what the mirror serves)
MIRROR = {
    "a0000000000000000000000000000001": ("000-000", 2, "good"),
    "a0000000000000000000000000000002": ("000-000", 1, "good_sha"),
    "a0000000000000000000000000000003": ("000-001", 3, "flaky"),     # 503 once, then fine
    "a0000000000000000000000000000004": ("000-001", 1, "corrupt"),   # not a GLB at all
    "a0000000000000000000000000000005": ("000-001", 1, "missing"),   # 404
    "a0000000000000000000000000000006": ("000-000", 1, "bad_sha"),   # annotation sha256 does not match
    "s0000000000000000000000000000007": ("000-000", 0, "good"),      # static: filtered out by the listing
    "s0000000000000000000000000000008": ("000-001", 0, "good"),
    "n0000000000000000000000000000009": ("000-000", 1, "good"),      # CC-BY-NC: left out by default
    TEST_UID: ("000-001", 1, "good"),                                # an SV4D test asset: left out of training
}
LICENSE = {"n0000000000000000000000000000009": "by-nc", "a0000000000000000000000000000002": "CC-BY 4.0"}
"""Licence annotations other than the default 'by' (as Objaverse writes them, and once as a label)."""


class Mirror:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.arrivals: list[tuple[float, str]] = []  # (time, path) of every request
        self.latency = 0.0  # seconds each GLB takes to start arriving (a far-away hub)
        self.flaky_left = {"a0000000000000000000000000000003"}
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802
                mirror.requests.append(self.path)
                mirror.arrivals.append((time.time(), self.path))
                if self.path.startswith("/glbs/") and mirror.latency:
                    time.sleep(mirror.latency)
                uid = Path(self.path).stem
                if uid in mirror.flaky_left:
                    mirror.flaky_left.discard(uid)
                    self.send_error(503, "try again")
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def glb_requests(self) -> list[str]:
        return [r for r in self.requests if r.startswith("/glbs/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def glbs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glbs")
    subprocess.run([sys.executable, "-m", "rendering.procedural", "--out", str(out), "--count", "3", "--actions", "2"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.fixture()
def mirror(tmp_path, glbs):
    root = tmp_path / "hub"
    paths, groups = {}, {}
    for i, (uid, (group, anims, mode)) in enumerate(sorted(MIRROR.items())):
        rel = f"glbs/{group}/{uid}.glb"
        paths[uid] = rel
        ann = {"uid": uid, "name": f"asset {i}", "animationCount": anims, "viewCount": 1,
               "license": LICENSE.get(uid, "by")}
        src = (glbs / f"proc-{i % 3:06d}.glb").read_bytes()
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mode == "corrupt":
            dest.write_bytes(b"<html>not a model</html>" * 10)
        elif mode != "missing":
            dest.write_bytes(src)
        if mode == "good_sha":
            ann["sha256"] = hashlib.sha256(src).hexdigest()
        if mode == "bad_sha":
            ann["sha256"] = "0" * 64
        groups.setdefault(group, {})[uid] = ann
    (root / "metadata").mkdir(parents=True)
    with gzip.open(root / "object-paths.json.gz", "wt") as fh:
        json.dump(paths, fh)
    for group, anns in groups.items():
        with gzip.open(root / "metadata" / f"{group}.json.gz", "wt") as fh:
            json.dump(anns, fh)
    m = Mirror(root)
    yield m
    m.close()


def test_listing_keeps_animated_objects_or_given_uids(mirror, tmp_path):
    items = list_assets(mirror.url, tmp_path / "cache")
    assert sorted(i["uid"] for i in items) == sorted(u for u, (_, n, _m) in MIRROR.items() if n > 0)
    assert all(i["rel_path"] == f"glbs/{MIRROR[i['uid']][0]}/{i['uid']}.glb" for i in items)
    n_index_requests = len(mirror.requests)
    assert n_index_requests == 3  # object-paths + two metadata groups
    # An explicit uid list wins over the animation filter; the cached index files are not fetched again.
    picked = list_assets(mirror.url, tmp_path / "cache", uids=["s0000000000000000000000000000007"])
    assert [i["uid"] for i in picked] == ["s0000000000000000000000000000007"]
    assert len(mirror.requests) == n_index_requests
    # uids of the list that the index does not hold are counted, not silently left out
    stats: dict = {}
    picked = list_assets(mirror.url, tmp_path / "cache", uids=["s0000000000000000000000000000007", "f" * 32],
                         stats=stats)
    assert [i["uid"] for i in picked] == ["s0000000000000000000000000000007"]
    assert stats["dropped_not_in_index"] == 1


def test_download_verify_retry_and_cache(mirror, tmp_path):
    items = {i["uid"]: i for i in list_assets(mirror.url, tmp_path / "cache")}
    flaky = ensure_asset(items["a0000000000000000000000000000003"], mirror.url, tmp_path / "cache", retries=2)
    verify_glb(flaky)
    assert mirror.glb_requests().count("/glbs/000-001/a0000000000000000000000000000003.glb") == 2
    with pytest.raises(AssetError) as err:
        ensure_asset(items["a0000000000000000000000000000005"], mirror.url, tmp_path / "cache", retries=1)
    assert err.value.stage == "download" and "404" in str(err.value)
    with pytest.raises(AssetError) as err:
        ensure_asset(items["a0000000000000000000000000000004"], mirror.url, tmp_path / "cache", retries=0)
    assert err.value.stage == "verify" and "magic" in str(err.value)
    assert not (tmp_path / "cache" / items["a0000000000000000000000000000004"]["rel_path"]).exists()
    # A truncated file in the cache is detected and fetched again.
    flaky.write_bytes(flaky.read_bytes()[:100])
    ensure_asset(items["a0000000000000000000000000000003"], mirror.url, tmp_path / "cache")
    verify_glb(flaky)


def test_render_job_from_mirror_then_cache_reuse(ray_local, mirror, tmp_path):
    cache = tmp_path / "cache"
    args = ["--preset", "tiny", "--source", "objaverse", "--base-url", mirror.url, "--cache-dir", str(cache),
            "--download-retries", "2", "--items-per-part", "3", "--input", "annotations"]
    main(args + ["--output", str(tmp_path / "run1")])
    index = pq.read_table(tmp_path / "run1" / "index.parquet").to_pylist()
    failures = {r["item_id"]: r for r in pq.read_table(tmp_path / "run1" / "failures.parquet").to_pylist()}
    ok = {"a0000000000000000000000000000001", "a0000000000000000000000000000002", "a0000000000000000000000000000003"}
    assert {r["item_id"] for r in index} == ok
    assert len(index) == 6  # two actions each
    assert {k: v["stage"] for k, v in failures.items()} == {
        "a0000000000000000000000000000004": "verify", "a0000000000000000000000000000005": "download",
        "a0000000000000000000000000000006": "verify"}
    assert "sha256" in failures["a0000000000000000000000000000006"]["error"]
    # Static objects were never even downloaded.
    assert not any(r.startswith("/glbs/") and "/s0" in r for r in mirror.requests)
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert summary["dropped_license"] == 1 and summary["dropped_test_split"] == 1  # the NC one, the SV4D one
    meta = json.loads(next(iter_tar_samples(tmp_path / "run1" / index[0]["shard"]))[1]["meta.json"])
    assert meta["source"] == "objaverse" and meta["uid"] in ok

    # A second job into a fresh output renders everything again but downloads nothing it already verified.
    before = list(mirror.glb_requests())
    main(args + ["--output", str(tmp_path / "run2")])
    new = mirror.glb_requests()[len(before):]
    assert all(Path(r).stem not in ok for r in new), new
    assert {r["item_id"] for r in pq.read_table(tmp_path / "run2" / "index.parquet").to_pylist()} == ok


def test_uid_list_input(ray_local, mirror, tmp_path):
    uids = tmp_path / "uids.txt"
    uids.write_text("# hand-picked\ns0000000000000000000000000000008\n")
    out = tmp_path / "out"
    main(["--preset", "tiny", "--source", "objaverse", "--base-url", mirror.url, "--cache-dir", str(tmp_path / "c"),
          "--input", str(uids), "--output", str(out), "--max-actions", "1"])
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["item_id"] for r in index] == ["s0000000000000000000000000000008"]


def test_unreachable_hub_fails_before_work(tmp_path):
    from pipelines.common.errors import UserError
    with pytest.raises(UserError, match="object-paths"):
        main(["--preset", "tiny", "--source", "objaverse", "--base-url", "http://127.0.0.1:9",
              "--download-retries", "0", "--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_the_shipped_lists_are_the_papers_15k_and_sv4d_test_split(tmp_path):
    train, test = read_uid_list(ANIMATED_LIST), read_uid_list(TEST_LIST)
    assert len(train) == len(set(train)) == 15_081 and len(test) == len(set(test)) == 20
    import re
    assert all(re.fullmatch(r"[0-9A-Za-z]{27,32}", u) for u in train + test)
    assert sum(not re.fullmatch(r"[0-9a-f]{32}", u) for u in train) == 5  # as published (README there)
    assert len(set(train) & set(test)) == 14
    kept, dropped = split_uids("train", train)
    assert len(kept) == 15_067 and dropped == 14 and not set(kept) & set(test)
    assert split_uids("test", None) == (test, 0) and split_uids("all", train) == (train, 0)
    assert split_uids("test", train) == ([u for u in test if u in set(train)], 0)  # an explicit list: its own
    # the lists are derived from the merged table of public lists, reproducibly
    table = tmp_path / "t.csv"
    table.write_text("uid,diffusion4d_all_animated,diffusion4d_curated,puppetmaster_animation,puppetmaster_hq,sv4d_test\n"
                     "b,1,1,0,0,0\na,1,0,1,1,1\nc,1,0,1,0,0\nd,0,0,0,0,1\n")
    assert write_uid_lists(table, tmp_path / "lists") == {"train": 2, "test": 2}
    assert read_uid_list(tmp_path / "lists" / ANIMATED_LIST.name) == ["a", "b"]
    assert read_uid_list(tmp_path / "lists" / TEST_LIST.name) == ["a", "d"]


def test_licences_are_read_from_the_annotations_and_normalised():
    for text, slug in [("by", "by"), ("CC-BY 4.0", "by"), ("by-nc-sa", "by-nc-sa"), ("CC0 1.0", "cc0"),
                       ("Attribution-NonCommercial", "by-nc"), ("Creative Commons BY-SA 3.0", "by-sa"), ("", ""),
                       (None, ""), ("cc0", "cc0"), ("CC0", "cc0"), ("cc0-1.0", "cc0"), ("Public Domain", "cc0"),
                       ("cc-by-4.0", "by"), ("CC BY-NC 4.0", "by-nc"), ("Attribution Non-Commercial", "by-nc"),
                       ("CC-BY-SA 4.0 International", "by-sa"), ("CC-BY-NC-SA-3.0-US", "by-nc-sa"),
                       ("by-nc-nd", "by-nc-nd")]:
        assert normalize_license(text) == slug, text


def test_split_and_licences_pick_the_assets(ray_local, mirror, tmp_path):
    from pipelines.common.errors import UserError
    from pipelines.render_objaverse import RenderJobConfig, list_items
    cfg = RenderJobConfig(source="objaverse", base_url=mirror.url, cache_dir=str(tmp_path / "c"), input="annotations")
    stats: dict = {}
    uids = {i["uid"] for i in list_items(cfg, stats)}
    assert TEST_UID not in uids and "n0000000000000000000000000000009" not in uids
    assert "a0000000000000000000000000000002" in uids  # 'CC-BY 4.0' reads as 'by'
    assert stats == {"dropped_test_split": 1, "dropped_license": 1}
    import dataclasses
    every = {i["uid"] for i in list_items(dataclasses.replace(cfg, split="all", licenses=["any"]))}
    assert every == uids | {TEST_UID, "n0000000000000000000000000000009"}
    nc = {i["uid"] for i in list_items(dataclasses.replace(cfg, licenses=["by", "by-nc"]))}
    assert nc == uids | {"n0000000000000000000000000000009"}
    # the test split renders exactly the SV4D uids the mirror holds, licence permitting
    out = tmp_path / "test_split"
    main(["--preset", "tiny", "--source", "objaverse", "--base-url", mirror.url, "--cache-dir", str(tmp_path / "c"),
          "--split", "test", "--output", str(out), "--max-actions", "1"])
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["item_id"] for r in index] == [TEST_UID]
    meta = json.loads(next(iter_tar_samples(out / index[0]["shard"]))[1]["meta.json"])
    assert meta["license"] == "by"  # the annotation's licence travels with the sample (attribution)
    # a train render into the test output is refused (the two must not mix)
    with pytest.raises(UserError, match="split: 'test' -> 'train'"):
        main(["--preset", "tiny", "--source", "objaverse", "--base-url", mirror.url, "--cache-dir",
              str(tmp_path / "c"), "--input", "annotations", "--output", str(out)])
    # the default list is the shipped one: none of its 15,067 training uids are on this mirror
    with pytest.raises(UserError, match="none of the 15067 requested uids"):
        main(["--preset", "tiny", "--source", "objaverse", "--base-url", mirror.url, "--cache-dir",
              str(tmp_path / "c"), "--output", str(tmp_path / "default")])
    assert not (tmp_path / "default").exists()


def test_downloads_run_ahead_of_the_renders(mirror, tmp_path):
    """--prefetch: while Blender renders one asset, the next ones download (bounded), with the same
    verification and cache; without it every download waits for the render before it."""
    import dataclasses
    from pipelines.render_objaverse import RenderJobConfig, RenderProcessor
    mirror.latency = 0.5
    items = [i for i in list_assets(mirror.url, tmp_path / "c") if MIRROR[i["uid"]][2] == "good"][:3]
    assert len(items) == 3
    renders: list[tuple[str, float, float]] = []

    class Blender:  # stands in for the Blender child: 1 s a render
        def call(self, request, timeout):
            t0 = time.time()
            time.sleep(1.0)
            renders.append((Path(request["path"]).stem, t0, time.time()))
            meta = {"views": 1, "frames": 1, "height": 8, "width": 8}
            return {"samples": [{"meta": meta, "cameras": {}, "files": {"x.png": b""}, "action": "a"}],
                    "actions_total": 1, "seconds": 1.0}

        def close(self):
            pass

    def part(prefetch: int, cache: Path) -> float:
        cfg = RenderJobConfig(source="objaverse", base_url=mirror.url, cache_dir=str(cache), prefetch=prefetch)
        proc = RenderProcessor(dataclasses.asdict(cfg))
        proc.worker = Blender()
        renders.clear()
        mirror.arrivals.clear()
        t0 = time.time()
        proc.prefetch(items)
        for item in items:
            assert proc(item)
        return time.time() - t0

    def asked(uid: str) -> float:
        return min(t for t, p in mirror.arrivals if p.endswith(f"/{uid}.glb"))

    ahead = part(2, tmp_path / "ahead")
    first_render_end = renders[0][2]
    assert asked(items[1]["uid"]) < first_render_end and asked(items[2]["uid"]) < first_render_end
    assert all(verify_glb(tmp_path / "ahead" / "objaverse" / i["rel_path"]) is None for i in items)
    serial = part(0, tmp_path / "serial")
    assert asked(items[1]["uid"]) > renders[0][2]  # waited for the first render
    assert ahead < serial, (ahead, serial)  # ideally 3.5 s against 4.5 s: the downloads hid behind renders
    # a failing download still fails its own item only, through the prefetch
    bad = [i for i in list_assets(mirror.url, tmp_path / "c") if MIRROR[i["uid"]][2] == "corrupt"]
    cfg = RenderJobConfig(source="objaverse", base_url=mirror.url, cache_dir=str(tmp_path / "bad"), prefetch=2,
                          download_retries=0)
    proc = RenderProcessor(dataclasses.asdict(cfg))
    proc.worker = Blender()
    proc.prefetch(bad + items[:1])
    from pipelines.common.errors import ItemError
    with pytest.raises(ItemError, match="magic"):
        proc(bad[0])
    assert proc(items[0])


def test_a_source_is_one_registered_entry(tmp_path, monkeypatch):
    """docs/extending.md: a new --source is a SOURCES entry (its listing and its fetch); validation, the
    listing's drop counts and prefetching follow from the entry."""
    import dataclasses
    from pipelines.render_objaverse import SOURCES, AssetSource, RenderJobConfig, RenderProcessor, list_items
    fetched: list[str] = []

    def listing(cfg, stats):
        stats["dropped_too_big"] = 1
        return [{"item_id": f"bucket-{i}", "uid": f"bucket-{i}"} for i in range(2)]

    def fetch(proc, item):
        fetched.append(item["item_id"])
        path = tmp_path / f"{item['uid']}.glb"
        path.write_bytes(b"glTF")
        return str(path)

    monkeypatch.setitem(SOURCES, "bucket", AssetSource(listing, fetch, remote=True))
    cfg = RenderJobConfig(source="bucket", prefetch=2)
    cfg.validate()
    stats: dict[str, int] = {}
    items = list_items(cfg, stats)
    assert [i["item_id"] for i in items] == ["bucket-0", "bucket-1"] and stats == {"dropped_too_big": 1}

    class Blender:
        def call(self, request, timeout):
            assert Path(request["path"]).read_bytes() == b"glTF" and request["source"] == "bucket"
            meta = {"views": 1, "frames": 1, "height": 8, "width": 8}
            return {"samples": [{"meta": meta, "cameras": {}, "files": {"x.png": b""}, "action": "a"}],
                    "actions_total": 1, "seconds": 0.0}

        def close(self):
            pass
    proc = RenderProcessor(dataclasses.asdict(cfg))
    proc.worker = Blender()
    proc.prefetch(items)  # remote: both fetches start ahead of the first render
    assert [s.key for it in items for s in proc(it)] == ["bucket-0__a", "bucket-1__a"]
    assert sorted(fetched) == ["bucket-0", "bucket-1"]
    with pytest.raises(ConfigError, match="--source must be one of procedural, local, objaverse, bucket"):
        RenderJobConfig(source="nope").validate()
