"""Run one command as a quiet stage: everything it prints goes to a log file, the terminal gets its status.

`make demo` runs each stage (`ray job submit ...`) through :func:`run_stage`. Ray's INFO lines, runtime-env
warnings, actor output and tracebacks all land in the stage's log file; the terminal shows the stage's own
status lines (``[render] part 1/2 ...``, ``[train base] step 40/150 ...``): one line updated in place on a
TTY, or a line every ``interval`` seconds otherwise, then a closing line with the wall time and the log's
path. On a failure it prints the ``error:`` line and the log's last lines, so a quiet terminal never hides why.
``verbose=True`` streams every line as well (and still writes the log).
"""

from __future__ import annotations

import queue
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

# Colour and style codes (Ray's actor prefixes, its CLI); the log keeps the text without them.
_SGR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _SGR.sub("", text)


def status_pattern(tags: Sequence[str]) -> re.Pattern[str]:
    """Matches a status line ``[tag] ...`` anywhere in a line (after a ``(RayTrainWorker pid=..)`` prefix too)."""
    alternatives = "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True))
    return re.compile(rf"(?:^|\s)(\[(?:{alternatives})\] .*)$")


_ERROR = re.compile(r"(?:^|\s)(error: .*)$")


@dataclass
class StageResult:
    returncode: int
    seconds: float
    log: Path
    status: str | None  # the last status line seen
    error: str | None  # the last `error: ...` line seen
    tail: list[str] = field(default_factory=list)  # the log's last lines, without colour codes

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class _Display:
    """The terminal side: an in-place line on a TTY, throttled progress lines otherwise."""

    def __init__(self, stream: IO[str], tty: bool, interval: float, t0: float) -> None:
        self.stream, self.tty, self.interval, self.t0 = stream, tty, interval, t0
        self.shown: str | None = None  # last status line printed (non-TTY)
        self.last_print = t0
        self.dirty = False  # a TTY line is open (no newline yet)

    def update(self, status: str | None, now: float) -> None:
        if self.tty:
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            text = f"  {now - self.t0:4.0f}s  {status or 'starting ...'}"
            self.stream.write("\r\x1b[K" + text[:width])
            self.stream.flush()
            self.dirty = True
        elif status is not None and status != self.shown and now - self.last_print >= self.interval:
            self._line(status, now)

    def _line(self, status: str, now: float) -> None:
        self.stream.write(f"  {now - self.t0:4.0f}s  {status}\n")
        self.stream.flush()
        self.shown, self.last_print = status, now

    def close(self, status: str | None, now: float) -> None:
        if self.tty:
            if self.dirty:
                self.update(status, now)
                self.stream.write("\n")
                self.dirty = False
        elif status is not None and status != self.shown:
            self._line(status, now)  # the stage's last word is always shown

    def clear(self) -> None:
        if self.tty and self.dirty:
            self.stream.write("\r\x1b[K")
            self.dirty = False


def _pump(pipe: IO[bytes], lines: queue.Queue) -> None:
    for raw in iter(pipe.readline, b""):
        lines.put(raw.decode("utf-8", errors="replace"))
    lines.put(None)


def run_stage(cmd: Sequence[str], *, log: Path, tags: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | str | None = None, stream: IO[str], verbose: bool = False, tty: bool | None = None,
              interval: float = 30.0, tail_lines: int = 20, refresh: float = 1.0,
              skip: str | None = None) -> StageResult:
    """Run ``cmd`` with stdout and stderr into ``log``; show its status lines (tagged ``[tag] ...``) on ``stream``.

    ``skip``: a regex; tagged lines it matches are not status (pointers such as ``[generate] videos: <dir>``,
    which the caller prints itself), so the last line shown stays the stage's last progress or result.

    Returns when the command exits; the caller decides what a non-zero ``returncode`` means (the failure
    report, ``error:`` line and log tail, is already printed on ``stream``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tty = (not verbose) and (stream.isatty() if tty is None else tty)
    status_re = status_pattern(tags)
    skip_re = re.compile(skip) if skip else None
    tail: deque[str] = deque(maxlen=tail_lines)
    status = error = None
    t0 = time.time()
    display = _Display(stream, tty, interval, t0)
    with log.open("w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except OSError as exc:  # the command itself is missing: report it like a failed stage
            f.write(f"error: could not run {cmd[0]}: {exc}\n")
            result = StageResult(127, 0.0, log, None, f"error: could not run {cmd[0]}: {exc}",
                                 [f"error: could not run {cmd[0]}: {exc}"])
            _report_failure(result, stream)
            return result
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    raw = lines.get(timeout=refresh)
                except queue.Empty:
                    if not verbose:
                        display.update(status, time.time())  # the clock moves while a stage is silent
                    continue
                if raw is None:
                    break
                text = strip_ansi(raw).rstrip("\r\n")
                f.write(text + "\n")
                f.flush()
                tail.append(text)
                if m := _ERROR.search(text):
                    error = m.group(1)
                if (m := status_re.search(text.rsplit("\r", 1)[-1])) and not (skip_re and skip_re.search(m.group(1))):
                    status = m.group(1).strip()
                if verbose:
                    stream.write(raw if raw.endswith("\n") else raw + "\n")
                    stream.flush()
                else:
                    display.update(status, time.time())
            code = proc.wait()
        except BaseException:  # Ctrl-C: end the command too, leave the terminal on a fresh line
            display.clear()
            proc.kill()
            proc.wait()
            f.write(f"# interrupted after {time.time() - t0:.0f}s\n")
            raise
        seconds = time.time() - t0
        f.write(f"# exit code {code} after {seconds:.0f}s\n")
    if not verbose:
        display.close(status, time.time())
    result = StageResult(code, seconds, log, status, error, list(tail))
    if code != 0:
        _report_failure(result, stream)
    return result


def _report_failure(result: StageResult, stream: IO[str]) -> None:
    stream.write(f"  FAILED (exit code {result.returncode}) after {result.seconds:.0f}s\n")
    if result.error and result.error not in result.tail:
        stream.write(f"  {result.error}\n")
    if result.tail:
        stream.write(f"  last {len(result.tail)} lines of its log:\n")
        stream.writelines(f"  | {line}\n" for line in result.tail)
    stream.write(f"  full log: {result.log}\n")
    stream.flush()
