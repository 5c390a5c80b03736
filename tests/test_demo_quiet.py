"""`make demo` is quiet by default (issue 12 item 5): a stage's noise goes to its log, the terminal gets its
status lines, a failure shows its error and log tail. CPU only, no Ray: the stages are small Python scripts
(and a fake `ray` for the demo's own wiring)."""

from __future__ import annotations

import io
import os
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.common.stage_runner import run_stage, status_pattern

NOISE = "2026-11-22 06:29:04,385\tWARNING working_dir.py:101 -- Directory '.git' is now ignored by default"

# A stage: Ray-like noise on stdout and stderr, coloured actor prefixes, its own status lines, then exit <code>.
STAGE = textwrap.dedent(f"""
    import sys
    code = int(sys.argv[1])
    print({NOISE!r}, flush=True)
    print("2026-11-22 06:29:57 INFO mlflow.store.db.utils: Creating initial MLflow database tables...", flush=True)
    print("\\x1b[36m(TrainController pid=17651)\\x1b[0m Requesting resources: {{'CPU': 1.0}} * 2", flush=True)
    for step in (10, 20, 30):
        print(f"\\x1b[36m(RayTrainWorker pid=17724)\\x1b[0m [train base] step {{step}}/30 | loss 0.{{step}}",
              flush=True)
        print("(RayTrainWorker pid=17749) FutureWarning: all_gather_into_tensor is deprecated", file=sys.stderr,
              flush=True)
    print("[data] skipping unreadable sample k1", flush=True)  # a tag this stage does not show
    if code:
        for i in range(30):
            print(f"traceback line {{i:02d}}", file=sys.stderr, flush=True)
        print("error: the grid folder /nope holds no shards", file=sys.stderr, flush=True)
        print("2026-11-22 06:35:28,096\\tERROR cli.py:67 -- Job 'raysubmit_x' failed", flush=True)
    else:
        print("[train base] done: final checkpoint /out/model.pt", flush=True)
    sys.exit(code)
""")


@pytest.fixture
def stage(tmp_path: Path) -> list[str]:
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    return [sys.executable, str(script)]


def _run(stage: list[str], tmp_path: Path, code: int, **kw):
    term = io.StringIO()
    kw.setdefault("tty", False)
    result = run_stage([*stage, str(code)], log=tmp_path / "logs" / "stage.log", tags=("train base", "train"),
                       stream=term, **kw)
    return result, term.getvalue(), (tmp_path / "logs" / "stage.log").read_text()


def test_status_pattern_finds_tagged_lines_only() -> None:
    pat = status_pattern(("train base", "train"))
    assert pat.search("(RayTrainWorker pid=1) [train base] step 1/2 | loss 1").group(1) == \
        "[train base] step 1/2 | loss 1"
    assert pat.search("[train] final checkpoint: /x").group(1) == "[train] final checkpoint: /x"
    assert pat.search("[train 4d] step 1/2") is None
    assert pat.search("[2026-11-22 06:29:10,047 E 16852 16852] core_worker.cc:2465: Actor") is None
    assert pat.search("x[train base] glued to a word") is None


def test_success_shows_status_not_noise_and_logs_everything(stage, tmp_path) -> None:
    result, term, log = _run(stage, tmp_path, 0, interval=0.0)
    assert result.ok and result.returncode == 0
    assert result.status == "[train base] done: final checkpoint /out/model.pt"
    # the terminal: the stage's own lines, without the actor prefix, and nothing else
    assert "[train base] step 20/30 | loss 0.20" in term
    assert term.rstrip("\n").splitlines()[-1].endswith("[train base] done: final checkpoint /out/model.pt")
    for noise in ("WARNING", "mlflow.store", "Requesting resources", "FutureWarning", "RayTrainWorker", "[data]",
                  "\x1b["):
        assert noise not in term, noise
    assert len(term.splitlines()) == 4  # steps 10, 20, 30 and done
    # the log: every line, stderr included, without colour codes, with the command and the exit code
    assert NOISE in log
    assert "(TrainController pid=17651) Requesting resources" in log
    assert log.count("FutureWarning") == 3
    assert "[data] skipping unreadable sample k1" in log
    assert "\x1b[" not in log
    assert log.splitlines()[0].startswith(f"$ {sys.executable} ")
    assert log.splitlines()[-1].startswith("# exit code 0 after")


def test_skip_keeps_the_last_progress_line(stage, tmp_path) -> None:
    from pipelines.demo import STATUS_SKIP
    result, term, log = _run(stage, tmp_path, 0, interval=3600.0, skip=STATUS_SKIP)
    assert result.status == "[train base] step 30/30 | loss 0.30"  # not the pointer "done: final checkpoint"
    assert term.splitlines() == [term.splitlines()[0]] and term.rstrip().endswith("[train base] step 30/30 | loss 0.30")
    assert "[train base] done: final checkpoint /out/model.pt" in log


def test_not_a_tty_prints_a_few_lines_not_every_one(stage, tmp_path) -> None:
    _, term, _ = _run(stage, tmp_path, 0, interval=3600.0)
    # inside one interval only the stage's last word is printed
    assert term.splitlines() == [term.splitlines()[0]]
    assert "[train base] done: final checkpoint /out/model.pt" in term
    assert "step 10/30" not in term


def test_tty_updates_one_line_in_place(stage, tmp_path) -> None:
    result, term, _ = _run(stage, tmp_path, 0, tty=True)
    assert result.ok
    assert term.count("\n") == 1 and term.endswith("\n")  # one line, finished once the stage ends
    assert term.count("\r\x1b[K") >= 4  # redrawn for each status line
    final = term.rsplit("\r\x1b[K", 1)[-1]
    assert "[train base] done: final checkpoint /out/model.pt" in final
    assert "WARNING" not in term and "FutureWarning" not in term


def test_failure_prints_error_tail_and_log_path(stage, tmp_path) -> None:
    result, term, log = _run(stage, tmp_path, 3, interval=3600.0)
    assert not result.ok and result.returncode == 3
    assert result.error == "error: the grid folder /nope holds no shards"
    assert "FAILED (exit code 3)" in term
    assert "| error: the grid folder /nope holds no shards" in term
    assert "| 2026-11-22 06:35:28,096\tERROR cli.py:67 -- Job 'raysubmit_x' failed" in term  # the log's last line
    assert "| traceback line 29" in term and "| traceback line 12" in term
    assert "traceback line 11" not in term  # 20 lines: 12..29, the error line and Ray's last line
    assert f"full log: {tmp_path / 'logs' / 'stage.log'}" in term
    assert "traceback line 00" in log and log.splitlines()[-1].startswith("# exit code 3 after")


def test_failure_shows_the_error_line_even_outside_the_tail(stage, tmp_path) -> None:
    result, term, _ = _run(stage, tmp_path, 3, tail_lines=1)
    assert result.tail == ["2026-11-22 06:35:28,096\tERROR cli.py:67 -- Job 'raysubmit_x' failed"]
    assert "  error: the grid folder /nope holds no shards\n" in term


def test_verbose_streams_everything_and_still_logs(stage, tmp_path) -> None:
    result, term, log = _run(stage, tmp_path, 0, verbose=True, tty=True)
    assert result.ok
    assert NOISE in term and "FutureWarning" in term and "[data] skipping" in term
    assert "\r" not in term
    assert NOISE in log


def test_missing_command_is_a_failed_stage(tmp_path) -> None:
    term = io.StringIO()
    result = run_stage(["/nonexistent/ray", "job"], log=tmp_path / "x.log", tags=("render",), stream=term, tty=False)
    assert result.returncode == 127 and "could not run /nonexistent/ray" in term.getvalue()


# The demo's wiring, with a fake `ray` that plays every stage: quiet sections, logs per stage, a failure.
FAKE_RAY = textwrap.dedent("""
    import os, sys
    script = sys.argv[sys.argv.index("python") + 1]
    print("2026-11-22 06:29:04,387\\tINFO packaging.py:385 -- Ignoring upload to cluster for these files")
    print("Running entrypoint for job raysubmit_x: python " + " ".join(sys.argv[sys.argv.index("python") + 1:]))
    for line in ("[render] r-status", "[pseudo4d] p-status", "(RayTrainWorker pid=1) [train base] step 7/9",
                 "(RayTrainWorker pid=1) [train 4d] step 8/9", "[generate] g-status " + script,
                 "[train base] MLflow: mlflow ui ...", "[generate] contact sheet: /x.png"):  # pointers: not status
        print(line)
    if os.environ.get("FAKE_RAY_FAIL") and os.environ["FAKE_RAY_FAIL"] in script:
        print("error: --base-checkpoint /x does not exist", file=sys.stderr)
        sys.exit(1)
""")


@pytest.fixture
def fake_ray(tmp_path: Path, monkeypatch) -> Path:
    import pipelines.demo as demo
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(f"#!{sys.executable}\n{FAKE_RAY}")
    ray.chmod(0o755)
    monkeypatch.setattr(demo, "_head_env", lambda logs, verbose: {  # read at call time: tests set env vars
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_ADDRESS": "http://127.0.0.1:1"})
    return tmp_path / "out"


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("[demo] ") and "/" in line.split()[1]:
            key = line
            out[key] = []
        elif key is not None:
            out[key].append(line)
    return out


def test_demo_main_is_quiet_and_writes_a_log_per_stage(fake_ray, capsys) -> None:
    from pipelines.demo import main
    assert main(["--output", str(fake_ray)]) == 0
    term = capsys.readouterr().out
    assert "INFO" not in term and "Running entrypoint" not in term and "RayTrainWorker" not in term
    sections = _sections(term.split("\n[demo] all stages done")[0])
    titles = list(sections)
    assert len(titles) >= 4 and titles[0] == f"[demo] 1/{len(titles)} render procedural assets (Blender/Cycles)"
    want = {"render": "[render] r-status", "pseudo4d": "[pseudo4d] p-status", "train_base": "[train base] step 7/9",
            "train_4d": "[train 4d] step 8/9", "generate": "[generate] g-status pipelines/generate_4d.py"}
    for (title, lines), key in zip(sections.items(), want):
        assert len(lines) == 2, (title, lines)  # the status line, then the closing line
        assert lines[0].endswith(want[key]), (title, lines)
        assert lines[1].startswith("  done in ") and f"logs/{key}.log" in lines[1], lines[1]
        log = (fake_ray / "logs" / f"{key}.log").read_text()
        assert "INFO packaging.py:385" in log and "Running entrypoint" in log
    assert f"full logs            {fake_ray / 'logs'}" in term
    assert len(term.splitlines()) < 3 * len(titles) + 15


def test_demo_main_failure_names_the_log_and_stops(fake_ray, capsys, monkeypatch) -> None:
    from pipelines.common.errors import UserError
    from pipelines.demo import main
    monkeypatch.setenv("FAKE_RAY_FAIL", "train_4d.py")
    with pytest.raises(UserError, match=r"demo stage 'train the 4D model \(soft sync\)' failed; full log: .*"
                                        r"logs/train_4d\.log"):
        main(["--output", str(fake_ray)])
    term = capsys.readouterr().out
    assert "| error: --base-checkpoint /x does not exist" in term
    assert "FAILED (exit code 1)" in term
    assert (fake_ray / "logs" / "train_base.log").exists()
    assert not (fake_ray / "logs" / "generate.log").exists()  # nothing after the failed stage ran


def test_demo_main_verbose_streams_everything(fake_ray, capsys) -> None:
    from pipelines.demo import main
    assert main(["--output", str(fake_ray), "--verbose"]) == 0
    term = capsys.readouterr().out
    assert term.count("INFO packaging.py:385") >= 4 and "[demo] $ ray job submit" in term
    assert (fake_ray / "logs" / "render.log").exists()
