"""A warm Blender in a child process, driven over a pipe, killed on timeout and restarted after a crash.

``bpy`` is a module with one Blender per process, and a bad asset can hang it or
take it down (segfault, abort, runaway memory). The Ray actor therefore never
imports bpy itself: it owns a ``BlenderWorker`` whose child process serves
requests; a timeout kills the child, a crash is read as EOF, and either way only
the current asset is lost and the next request starts a fresh child.

Protocol: length-prefixed pickles on the child's stdin/stdout. The child moves
Blender's own chatter off stdout (fd 1) to a log file, so the channel stays clean.
"""

from __future__ import annotations

import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from rendering.errors import StageError

_HEADER = struct.Struct("<Q")


class WorkerFailure(StageError):
    """A request to the Blender child failed (its SceneError, or a timeout or crash of the child)."""


def _send(fh: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)) + data)
    fh.flush()


def _recv_blocking(fh: BinaryIO) -> Any:
    head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(head)
    return pickle.loads(fh.read(n))


def _scratch_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to clean
    return True


def sweep_stale(log_dir: str | Path, scratch_root: str | None) -> list[str]:
    """Remove the scratch folders and logs of workers whose parent process is gone.

    A parent killed with SIGKILL (an actor lost with its node, a driver killed hard) cannot clean up, and
    its frames in /dev/shm hold RAM until reboot. Names carry the parent's pid (``blender-scratch-<pid>-*``,
    ``blender-worker-<pid>-*.log``), so a new worker removes exactly the leftovers of dead parents and never
    those of workers still running beside it. Returns the removed paths.
    """
    removed = []
    for folder, prefix in ((Path(log_dir), "blender-worker-"),
                           (Path(scratch_root or tempfile.gettempdir()), "blender-scratch-")):
        if not folder.is_dir():
            continue
        for path in folder.glob(prefix + "*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


class BlenderWorker:
    """Parent side: one child process at a time, started lazily."""

    def __init__(self, threads: int = 0, log_dir: str | None = None) -> None:
        self.threads = threads
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        sweep_stale(self.log_dir, _scratch_root())
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.scratch: Path | None = None
        self.restarts = 0

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"blender-worker-{os.getpid()}-", suffix=".log", dir=self.log_dir)
        os.close(fd)
        self.log_path = Path(name)
        # Frames are staged in RAM (/dev/shm) by the child; the parent owns the folder so that
        # frames of a child killed mid-render are removed with it.
        self.scratch = Path(tempfile.mkdtemp(prefix=f"blender-scratch-{os.getpid()}-", dir=_scratch_root()))
        env = dict(os.environ)
        env["RENDER_SCRATCH"] = str(self.scratch)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-u", "-m", "rendering.worker", "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                         cwd=root, start_new_session=True)

    def _log_tail(self, n: int = 3) -> str:
        try:
            lines = [l for l in self.log_path.read_text(errors="replace").splitlines() if l.strip()]  # type: ignore[union-attr]
        except OSError:
            return ""
        return " | ".join(l.strip()[:200] for l in lines[-n:])

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for fh in (self.proc.stdin, self.proc.stdout):
                try:
                    fh.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            self.proc = None
            self.restarts += 1
            if self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)
                self.scratch = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                _send(self.proc.stdin, {"op": "exit"})  # type: ignore[arg-type]
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        chunks: list[bytes] = []
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def call(self, request: dict[str, Any], timeout: float) -> Any:
        """Run one request in the child; raise WorkerFailure on error, timeout or crash."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.kill()
            self._start()
        request = dict(request, threads=self.threads)
        if self.log_path is not None:
            open(self.log_path, "wb").close()  # the log only needs to explain the current asset
        deadline = time.monotonic() + timeout
        try:
            _send(self.proc.stdin, request)  # type: ignore[arg-type]
            (n,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline))
            reply = pickle.loads(self._read_exact(n, deadline))
        except TimeoutError:
            self.kill()
            raise WorkerFailure("timeout", f"no result within {timeout:.0f}s; Blender was killed "
                                           f"(raise --timeout-s if assets this large are expected)") from None
        except (EOFError, BrokenPipeError, OSError):
            code = self.proc.wait() if self.proc is not None else None  # type: ignore[union-attr]
            tail = self._log_tail()
            self.kill()
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerFailure("crash", f"Blender process died ({how})" + (f"; last log: {tail}" if tail else "")) from None
        if not reply.get("ok"):
            raise WorkerFailure(reply.get("stage", "render"), reply.get("error", "unknown error"))
        return reply["result"]


def _handle(req: dict[str, Any]) -> Any:
    import bpy  # noqa: F401  (loaded once per child, warm for every later request)
    op = req["op"]
    fault = req.get("fault")
    if fault == "hang":  # test hook: a request that never finishes
        while True:
            time.sleep(3600)
    if fault == "crash":  # test hook: Blender dying mid-asset
        os.abort()
    if op == "ping":
        return {"blender": bpy.app.version_string, "pid": os.getpid()}
    if op == "render":
        from rendering.render_asset import render_asset
        from rendering.settings import RenderSettings
        settings = RenderSettings(**req["settings"])
        if req.get("threads"):
            from dataclasses import replace
            settings = replace(settings, threads=int(req["threads"]))
        return render_asset(req["path"], req["uid"], req["source"], settings)
    if op == "procedural":
        from rendering.procedural import export_glb
        return str(export_glb(req["kind"], req["seed"], req["path"], req.get("actions", 2), req.get("frames", 24)))
    raise ValueError(f"unknown op {op!r}")


def serve() -> None:
    """Child side: answer requests until stdin closes."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # Blender's prints go to the log, never into the protocol stream
    sys.stdout = sys.stderr
    requests = os.fdopen(0, "rb")
    from rendering.scene import SceneError
    while True:
        try:
            req = _recv_blocking(requests)
        except EOFError:
            return
        if req.get("op") == "exit":
            return
        try:
            reply = {"ok": True, "result": _handle(req)}
        except SceneError as exc:
            reply = {"ok": False, "stage": exc.stage, "error": str(exc)}
        except MemoryError:
            reply = {"ok": False, "stage": "render", "error": "out of memory"}
        except Exception as exc:  # noqa: BLE001 - report any asset-level error back, keep serving
            reply = {"ok": False, "stage": "render", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"}
        _send(channel, reply)


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve()
