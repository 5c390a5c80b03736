"""The Objaverse source against a loopback mirror of the hub layout: listing, retries, verification, cache."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.common.shards import iter_tar_samples
from pipelines.objaverse_source import AssetError, ensure_asset, list_assets, verify_glb
from pipelines.render_objaverse import main

ROOT = Path(__file__).resolve().parents[1]

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
}


class Mirror:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.flaky_left = {"a0000000000000000000000000000003"}
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802
                mirror.requests.append(self.path)
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
        ann = {"uid": uid, "name": f"asset {i}", "animationCount": anims, "viewCount": 1}
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
            "--download-retries", "2", "--items-per-part", "3"]
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
