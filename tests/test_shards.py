"""The shard writer under interruption and gaps: what readers of an output folder see (issue 13, item 5)."""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.common.shards import Sample, commit_part, consolidate, scan_output, write_tar


def _sample(i: int) -> Sample:
    return Sample(key=f"item{i:03d}", item_id=f"item{i}", files={"v00t00.png": b"x" * 10, "meta.json": b"{}"},
                  kind="pseudo4d", views=1, frames=1, height=1, width=1)


def test_an_interrupted_write_leaves_nothing_in_the_shard_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    commit_part(out, 0, [_sample(0)], [])

    def dying():  # a driver killed while the tar is being written
        yield _sample(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_tar(out / "shards" / "shard-000001.tar", dying())
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.tar"]
    assert [p.name for p in (out / ".tmp").iterdir()] == ["shards--shard-000001.tar"]  # the debris is beside it
    state = scan_output(out)  # the next run's scan removes it
    assert state.removed_orphans == [".tmp/shards--shard-000001.tar"] and not list((out / ".tmp").iterdir())
    assert state.next_part == 1


def test_the_documented_reading_works_when_part_numbers_have_gaps(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "out"
    for part in (0, 2, 5):  # parts 1, 3 and 4 had only failures: no shards for them
        commit_part(out, part, [_sample(part)], [])
    consolidate(out)
    with pytest.raises(Exception):  # a brace range names shards that do not exist
        list(wds.WebDataset(str(out / "shards" / "shard-{000000..000005}.tar"), shardshuffle=False))
    shards = pq.read_table(out / "index.parquet", columns=["shard"]).column("shard").to_pylist()
    from_index = sorted({str(out / s) for s in shards if s.startswith("shards/")})
    assert from_index == sorted(glob.glob(str(out / "shards" / "shard-*.tar")))
    keys = [s["__key__"] for s in wds.WebDataset(from_index, shardshuffle=False)]
    assert keys == ["item000", "item002", "item005"]


def test_long_ids_give_keys_a_tar_can_hold_and_an_overlong_key_fails_its_item(tmp_path: Path) -> None:
    """USTAR holds member names of at most 100 characters: a 32-character Objaverse uid and a long action name
    once made a key that failed the part's commit, and every re-run's (the item was never recorded). Keys are
    bounded (distinct, with a hash) and a Sample whose member names cannot fit is refused where it is made,
    inside the item's own processing."""
    from pipelines.common.shards import KEY_MAX, USTAR_NAME_MAX, bounded_key, decode_grid
    from pipelines.render_objaverse import to_samples
    uid = "0123456789abcdef0123456789abcdef-1a2b3c4d5e"
    actions = ["Armature|mixamo.com|Layer0_walking_forward_cycle_take_001", "Armature|mixamo.com|Layer0_walking_"
               "forward_cycle_take_002", "idle"]
    meta = {"views": 1, "frames": 1, "height": 1, "width": 1}
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((1, 1, 3), 7, np.uint8)).save(buf, format="PNG")
    result = {"samples": [{"action": a, "meta": dict(meta), "cameras": {}, "files": {"v00t00.png": buf.getvalue(),
                                                                                      "v00t00.depth.png": b"d"}}
                          for a in actions]}
    samples = to_samples(uid, result)
    keys = [s.key for s in samples]
    assert len(set(keys)) == 3 and all(len(k) <= KEY_MAX for k in keys), keys
    assert keys[2] == f"{uid}__idle"  # keys that fit are as before (outputs written earlier resume as they were)
    assert keys[0][:40] == keys[1][:40] and keys[0] != keys[1]  # same start, told apart by the hash
    out = tmp_path / "out"
    commit_part(out, 0, samples, [])
    (tar,) = glob.glob(str(out / "shards" / "*.tar"))
    import tarfile
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert len(names) == 3 * 4 and max(map(len, names)) <= USTAR_NAME_MAX
    assert bounded_key("x" * 200) != bounded_key("x" * 199 + "y") and len(bounded_key("x" * 200)) == KEY_MAX
    # the tar's limit is in bytes: a name of non-ASCII letters (3 bytes each here) is bounded in bytes too
    cjk = to_samples("角色" * 20, {"samples": [{"action": "走路" * 10, "meta": dict(meta), "cameras": {},
                                               "files": {"v00t00.png": buf.getvalue()}}]})
    assert len(cjk[0].key.encode()) <= KEY_MAX
    commit_part(tmp_path / "cjk", 0, cjk, [])
    from pipelines.make_pseudo4d import sample_key
    assert len(sample_key("视频" * 40 + ".mp4").encode()) <= 48 + 11
    with pytest.raises(ValueError, match="longer than a tar member name may be"):
        Sample(key="k" * 95, item_id="i", files={"v00t00.png": b""}, kind="render", views=1, frames=1, height=1,
               width=1)
    grid, _ = decode_grid(samples[2].files)  # the frame only, not the depth image beside it
    assert grid.shape == (1, 1, 1, 1, 3) and grid.max() == 7


def test_an_output_that_a_node_cannot_see_is_refused_before_any_work(ray_local, tmp_path: Path, monkeypatch) -> None:
    """On several nodes a node-local output keeps that node's parts where the driver never reads them. A Ray task
    pinned to each node looks for the path (the real one here: a single node, which sees what exists and not what
    does not); check_shared_output names the nodes that miss its marker, and leaves no marker behind."""
    from pipelines.common import job
    from pipelines.common.errors import UserError
    (node,) = job.nodes_missing(tmp_path / "not-there")
    assert node.split(" (")[0] == ray_local.nodes()[0]["NodeManagerAddress"]
    assert job.nodes_missing(tmp_path) == []
    job.check_shared_output(tmp_path / "out", "output")  # one node: nothing to check
    alive = ray_local.nodes()[0]
    monkeypatch.setattr(ray_local, "nodes", lambda: [alive, {**alive, "NodeID": "f" * 56}])
    monkeypatch.setattr(job, "nodes_missing", lambda path: ["10.0.0.7 (ffffffff)"] if Path(path).exists() else ["?"])
    with pytest.raises(UserError, match=r"the output .*/out is not visible on node\(s\) 10.0.0.7 \(ffffffff\) of "
                                        r"this cluster.* absolute path on storage every node mounts"):
        job.check_shared_output(tmp_path / "out", "output")
    assert not list((tmp_path / "out").glob(".shared-check-*"))


def test_a_shard_committed_after_the_index_is_still_described(tmp_path: Path) -> None:
    """index.parquet is rebuilt at a data job's end; a job killed after committing more parts leaves shards it
    does not list. describe_source (training's data_items, evaluation's held-out checks) then reads the samples
    themselves instead of undercounting."""
    import json

    from pipelines.common.shards import describe_source

    def sample(i: int) -> Sample:  # with its meta.json's item_id, as the jobs write it
        s = _sample(i)
        s.files["meta.json"] = json.dumps({"item_id": s.item_id}).encode()
        return s
    out = tmp_path / "out"
    commit_part(out, 0, [sample(0)], [])
    consolidate(out)
    commit_part(out, 1, [sample(1)], [])  # the job was killed before consolidating again
    desc = describe_source(str(out))
    assert desc["samples"] == 2 and desc["items"] == ["item0", "item1"], desc
    consolidate(out)
    assert describe_source(str(out))["items"] == ["item0", "item1"]
