"""A JIT build lock left by a killed process no longer hangs every later training job (issue 13)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch.utils.file_baton import FileBaton

from training.loop import STALE_BUILD_LOCK_S, clear_stale_build_locks


def test_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    # what torch's cpp_extension does: with the file there, every process waits for it (forever, if stale)
    assert not FileBaton(str(stale)).try_acquire()
    assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and fresh.exists()  # a build in progress elsewhere is left alone
    baton = FileBaton(str(stale))
    assert baton.try_acquire()  # the next build goes ahead
    baton.release()
    assert clear_stale_build_locks() == []
