"""The import graph points one way (issue 12, docs/extending.md): a test reads every module's imports and
fails on any edge that climbs the layers, so a cycle cannot come back unnoticed.

Layers, lowest first; a module may import its own layer and those below it:

- ``model`` (pure torch) and ``rendering`` (Blender and camera math): each imports only itself.
- ``core`` = ``pipelines/common``: the shard format (writer and reader), checkpoints, config, errors,
  tracking and pictures; may import ``model`` (a checkpoint rebuilds its model).
- ``pipelines``: the data jobs and the generation and evaluation libraries with their CLIs; never
  ``training``.
- ``training``: the training jobs and the recipes that drive every job.
- ``cluster``, ``benchmarks``: anything.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "rendering", "pipelines", "training", "cluster", "benchmarks")
# layer -> the layers it may import (its own included)
ALLOWED = {
    "model": {"model"},
    "rendering": {"rendering"},
    "core": {"core", "model"},
    "pipelines": {"pipelines", "core", "model", "rendering"},
    "training": {"training", "pipelines", "core", "model", "rendering"},
    "cluster": set(PACKAGES) | {"core"},
    "benchmarks": set(PACKAGES) | {"core"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    return "core" if parts[:2] == ["pipelines", "common"] else parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every absolute import of a project package, at any depth (lazy imports
    inside functions count: they run too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from pipelines import generate_4d" imports the module pipelines.generate_4d: name each imported
            # name under its module, so the layer and entry-script checks see what is really imported
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return out


def project_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def back_edges(paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        src = layer(module_name(path))
        for line, target in imports(path):
            if layer(target) not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {target} ({layer(target)})")
    return bad


def test_no_module_imports_a_higher_layer() -> None:
    assert len(project_modules()) > 50  # the walk found the tree
    assert back_edges(project_modules()) == []


def test_no_library_module_imports_an_entry_script() -> None:
    """The jobs' entry scripts (files under pipelines/ and training/ with a ``__main__`` block) are thin CLIs;
    libraries import libraries. (rendering/'s worker and procedural scene builder are also Blender's
    programs, run in a subprocess: those are imported on purpose.)"""
    scripts = {module_name(p) for p in project_modules() if MAIN_GUARD.search(p.read_text())
               and layer(module_name(p)) in ("pipelines", "training")}
    assert "pipelines.generate_4d" in scripts and "pipelines.evaluate_4d" in scripts
    bad = [f"{p.relative_to(ROOT)}:{line}: imports the entry script {target}"
           for p in project_modules() if layer(module_name(p)) not in ("benchmarks", "cluster")
           for line, target in imports(p) if imports_script(target, scripts)]
    assert bad == []


MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*['"]__main__['"]""", re.M)


def test_every_entry_script_finds_the_package_one_way() -> None:
    """Run as a file (``python pipelines/x.py``, ``ray job submit ... python training/y.py``), an entry script
    puts the checkout on sys.path with the one line below, at its own depth; no other spelling."""
    odd = []
    for p in project_modules():
        rel = p.relative_to(ROOT)
        text = p.read_text()
        if rel.parts[0] not in ("pipelines", "training") or not MAIN_GUARD.search(text):
            continue
        depth = len(rel.parts) - 1  # parents[depth] of the file is the checkout
        line = (f"sys.path.insert(0, str(Path(__file__).resolve().parents[{depth}]))  # run as a file from a "
                "checkout without install")
        if text.count("sys.path.insert") != 1 or line not in text:
            odd.append(str(rel))
    assert odd == []


def imports_script(target: str, scripts: set[str]) -> bool:
    """``target`` (a module, or a name in one) is one of the entry scripts or a name inside one."""
    return target in scripts or target.rsplit(".", 1)[0] in scripts


def test_entry_script_detection_sees_every_spelling() -> None:
    assert MAIN_GUARD.search("x = 1\nif __name__ == '__main__':\n    main()\n")
    assert MAIN_GUARD.search('if __name__ == "__main__":\n    main()\n')
    assert MAIN_GUARD.search('if __name__=="__main__":\n    main()\n')
    assert not MAIN_GUARD.search("# if __name__ == '__main__' is not a guard in a comment\n")
    scripts = {"pipelines.generate_4d"}
    assert imports_script("pipelines.generate_4d", scripts)  # import pipelines.generate_4d
    assert imports_script("pipelines.generate_4d.main", scripts)  # from pipelines.generate_4d import main
    assert not imports_script("pipelines.generation.Generator4D", scripts)


@pytest.mark.parametrize("src, line, expected", [
    ("model/x.py", "from training.config import TrainConfig", "model imports training.config"),
    ("rendering/x.py", "from pipelines.affine import draw_path", "rendering imports pipelines.affine"),
    ("pipelines/common/x.py", "    from pipelines.video_io import encode_video", "core imports pipelines.video_io"),
    ("pipelines/x.py", "import training.data", "pipelines imports training.data"),
    ("pipelines/x.py", "from training import data", "pipelines imports training.data"),
    ("model/x.py", "from pipelines.common import checkpoints", "model imports pipelines.common.checkpoints"),
])
def test_the_check_catches_each_kind_of_back_edge(tmp_path: Path, monkeypatch, src: str, line: str,
                                                 expected: str) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    f = tmp_path / src
    f.parent.mkdir(parents=True, exist_ok=True)
    body = f"def f():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    f.write_text(body)
    found = back_edges([f])
    assert len(found) == 1 and expected in found[0], found
