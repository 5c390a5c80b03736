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
