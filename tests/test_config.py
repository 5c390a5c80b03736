"""Config presets, YAML and CLI overrides, and their one-line errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.common.config import ConfigError, doc, parse_config, write_resolved, from_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Inner:
    depth: int = doc(2, "blocks")
    rate: float = doc(0.5, "a rate")


@dataclasses.dataclass
class Outer:
    name: str = doc("x", "a name")
    views: int = doc(8, "views")
    flag: bool = doc(False, "a switch")
    tags: list[str] = doc(text="tags", factory=list)
    inner: Inner = doc(text="nested", factory=Inner)


PRESETS = {"demo": Outer, "tiny": lambda: Outer(views=2, inner=Inner(depth=1))}


def test_preset_yaml_cli_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"views": 4, "inner": {"rate": 0.25}, "name": "from-yaml"}))
    cfg, _ = parse_config(Outer, PRESETS, ["--preset", "tiny", "--config", str(cfg_file), "--name", "cli",
                                           "--set", "inner.depth=7", "--flag", "yes", "--tags", "a,b"])
    assert cfg.views == 4 and cfg.name == "cli" and cfg.flag is True and cfg.tags == ["a", "b"]
    assert cfg.inner.depth == 7 and cfg.inner.rate == 0.25
    path = write_resolved(cfg, tmp_path / "out")
    again = from_dict(Outer, yaml.safe_load(path.read_text()))
    assert again == cfg


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--set", "views"], "malformed override 'views'"),
    (["--set", "vews=3"], "unknown option 'vews'"),
    (["--views", "eight"], "option 'views' expects int"),
    (["--flag", "maybe"], "option 'flag' expects bool"),
    (["--set", "inner=3"], "option 'inner' is a section"),
])
def test_bad_input_is_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(Outer, PRESETS, argv)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Outer, PRESETS, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("views: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config(Outer, PRESETS, ["--config", str(bad)])


def test_missing_dependency_message() -> None:
    from pipelines.common.errors import UserError, require
    with pytest.raises(UserError, match="missing dependency 'no_such_module_xyz'.*make install"):
        require("no_such_module_xyz")


def test_training_presets_survive_repeated_use() -> None:
    """The CLI builds a preset twice (once for --help defaults); both must carry the preset's values."""
    from training.config import TrainConfig, presets_for
    presets = presets_for("4d")
    first, second = presets["demo"](), presets["demo"]()
    assert first == second and second.optim.lr == 2e-3 and second.data.frames == 4
    cfg, _ = parse_config(TrainConfig, presets, ["--preset", "demo"], default_preset="demo")
    assert cfg.optim.lr == 2e-3 and cfg.data.height == 32


def test_output_that_is_a_file_or_unwritable_is_one_clear_error(tmp_path: Path) -> None:
    from pipelines.common.config import ensure_output_dir
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        ensure_output_dir(a_file)
    with pytest.raises(ConfigError, match="cannot write to the output folder"):
        ensure_output_dir(a_file / "below")  # its parent is a file
    if os.geteuid() == 0:  # root writes through permission bits; the kernel's own refusal is real
        unwritable = Path("/sys/4real-output-probe")
    else:
        unwritable = tmp_path / "ro" / "out"
        unwritable.parent.mkdir()
        unwritable.parent.chmod(0o500)
    with pytest.raises(ConfigError, match="cannot write to the output folder"):
        ensure_output_dir(unwritable)
    assert a_file.read_text() == "keep me"  # nothing already there is touched
    ok = ensure_output_dir(tmp_path / "new" / "deep")
    assert ok.is_dir() and not list(ok.iterdir())  # the write probe leaves nothing behind


@pytest.mark.parametrize("argv", [
    ["training/train_base.py", "--preset", "tiny", "--output"],
    ["pipelines/make_pseudo4d.py", "--preset", "tiny", "--output"],
    ["pipelines/generate_4d.py", "--checkpoint", "weights/proof/soft.pt.gz", "--from-grid", "weights/proof/heldout",
     "--out"],
])
def test_jobs_refuse_an_output_that_is_a_file_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    a_file = tmp_path / "out"
    a_file.write_text("keep me")
    proc = subprocess.run([sys.executable, *argv, str(a_file)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error:") and "is a file, not a folder" in lines[0]
    assert a_file.read_text() == "keep me"


def test_choices_are_literal_fields_the_parser_checks_and_help_lists(capsys) -> None:
    """A Literal field: the CLI value is matched to its choice (``--zero-stage 3`` is the int 3), a wrong one
    is one line naming the choices, ``--help`` lists them, and configs built in code are checked alike."""
    import dataclasses

    from pipelines.common.config import check_choices
    from training.config import TrainConfig, presets_for
    cfg, _ = parse_config(TrainConfig, presets_for("4d"), ["--preset", "tiny", "--zero-stage", "3"],
                          default_preset="tiny")
    assert cfg.zero_stage == 3 and isinstance(cfg.zero_stage, int)
    with pytest.raises(ConfigError, match=r"option 'sync' must be one of soft, hard, hard_channel, sequential; "
                                          r"got 'soft2'"):
        parse_config(TrainConfig, presets_for("4d"), ["--preset", "tiny", "--sync", "soft2"], default_preset="tiny")
    with pytest.raises(ConfigError, match=r"option 'data.background' must be one of white, black, gray, random"):
        check_choices(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, background="blue")))
    with pytest.raises(ConfigError, match=r"option 'zero_stage' must be one of 0, 1, 2, 3; got True"):
        check_choices(dataclasses.replace(cfg, zero_stage=True))  # YAML's yes is not ZeRO stage 1
    # a config built in code with a training-free variant is told where those run, not just the choices
    with pytest.raises(ConfigError, match="'train_free_soft' cannot be trained.*generation and evaluation"):
        dataclasses.replace(cfg, sync="train_free_soft").validate()
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, presets_for("4d"), ["--help"], default_preset="tiny")
    assert "--precision {bf16,fp32}" in capsys.readouterr().out
