"""Typed job configs: dataclasses with documented fields, named presets, YAML and CLI overrides.

Every job (render, pseudo-4D, the training stages) describes its options as a
dataclass whose fields carry a ``doc`` string. ``parse_config`` turns that into
a command line: each field becomes ``--name`` (nested dataclasses become
``--section.name``), ``--preset`` picks a starting point, ``--config`` layers a
YAML file on top, and explicit flags win over both. The resolved config is
written next to every output so any run can be reproduced from its folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad preset, override or option value; the message says how to fix it."""


PRESET_DOCS: dict[str, str] = {
    "tiny": "tests: seconds on CPU",
    "demo": "make demo: minutes on 2 CPU cores",
    "proof": "the GPU proof run of docs/results.md, at 64x64",
    "small": "one GPU and the CPUs of its machine",
    "paper": "the paper's settings, on a cluster",
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESET_DOCS)
"""The preset names every job offers (render, pseudo-4D, the three training stages, generate, evaluate), so one
name means one scale across the whole chain:

- ``tiny``: what the tests run; seconds on CPU, shapes as small as still mean something.
- ``demo``: what ``make demo`` runs; minutes on 2 CPU cores, enough for structure, not quality.
- ``proof``: the GPU proof run of docs/results.md (one H100, 64x64 frames, 8 x 8 windows).
- ``small``: one GPU and the CPUs of its machine.
- ``paper``: the paper's settings, on a cluster.

Each job writes its presets as a table (``name -> field overrides``, edm2's ``config_presets``) built by
``preset_table``. A run without ``--preset`` keeps the job's own default: the training stages and pseudo-4D
start from ``demo``; render, generate and evaluate from the config class's field defaults, which are no preset
(render's are the 144x256 8 x 16 renders of docs/rendering.md; generate's and evaluate's the documented
options). Recipes (``training/recipes``) are not jobs and name their presets as they need."""


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a help text (shown by ``--help`` and kept in the YAML dump)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or CLI value to the field's declared type, or raise ConfigError."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"option '{name}' may not be empty; give a {getattr(tp, '__name__', tp)}")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            for c in choices:  # a CLI value is a string: "2" is the Literal 2 (but YAML's yes is not 1)
                if isinstance(value, bool) == isinstance(c, bool) and (value == c or str(value) == str(c)):
                    return c
            raise ConfigError(f"option '{name}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()] if value.strip() else []
            items = [_coerce(v, item_tp, name) for v in value]
            return tuple(items) if origin is tuple else items
        if origin is dict or tp is dict:
            if not isinstance(value, Mapping):
                raise ValueError(value)
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        tname = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"option '{name}' expects {tname}, got {value!r}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def literal_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field of dataclass ``cls`` (None for other fields)."""
    tp, _ = _unwrap_optional(_field_types(cls).get(name))
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of ``cfg`` (nested dataclasses too) holds one of its values: the parser checks
    the CLI and YAML, this checks configs built in code (``dataclasses.replace``, tests, recipes)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
            continue
        choices = literal_choices(type(cfg), f.name)
        if choices is not None and not any(value == c and isinstance(value, bool) == isinstance(c, bool)
                                           for c in choices):
            raise ConfigError(f"option '{prefix}{f.name}' must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")


def apply_overrides(cfg: T, overrides: Mapping[str, Any], prefix: str = "") -> T:
    """Return a copy of ``cfg`` with nested ``overrides`` (dicts or dotted keys) applied and type-checked."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest:
            nested.setdefault(head, {})
            if not isinstance(nested[head], dict):
                raise ConfigError(f"option '{prefix}{head}' is set both as a value and as a section")
            nested[head][rest] = value
        else:
            if isinstance(nested.get(head), dict) and isinstance(value, Mapping):
                nested[head].update(value)
            else:
                nested[head] = value
    hints = _field_types(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown option '{full}'{hint}; see --help for the list")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"option '{full}' is a section; set its fields as {full}.<name>=<value>")
            changes[key] = apply_overrides(current, value, prefix=f"{full}.")
        elif isinstance(current, dict) and isinstance(value, Mapping):
            # A dict field (e.g. model overrides) merges key by key, so --set model.depth=4 keeps the
            # preset's other entries.
            changes[key] = {**current, **_coerce(value, hints[key], full)}
        else:
            changes[key] = _coerce(value, hints[key], full)
    new = dataclasses.replace(cfg, **changes)
    validate = getattr(new, "validate", None)
    if callable(validate) and not prefix:
        validate()
    return new


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted-key view of a config, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(to_dict(cfg), "")
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], base: T | None = None) -> T:
    """Rebuild a config from ``to_dict`` output (e.g. a resolved config.yaml)."""
    return apply_overrides(base if base is not None else cls(), data)


def ensure_output_dir(directory: str | Path) -> Path:
    """Create a job's output folder if needed and prove it writable, or fail with one line saying what to do.

    Every job calls this (through ``write_resolved``, or first thing) before any work starts: an output path
    that is a file, or a folder it cannot write, used to surface as a long traceback deep inside the job.
    """
    p = Path(directory)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"the output {p} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to the output folder {p} ({exc.strerror or exc}); pass a folder you can "
                          "write to, or fix its permissions") from None
    return p


def check_same_content(cfg: Any, output: str | Path, keys: typing.Sequence[str],
                       ignore: Mapping[str, typing.Sequence[str]] | None = None,
                       absent: Mapping[str, Any] | None = None) -> None:
    """Refuse to add samples made with other settings to an existing output (a silently mixed data set).

    ``keys`` are the options that shape a sample; the config.yaml the output recorded (``write_resolved``) must
    agree on each. ``ignore`` names sub-fields of a nested option that may change (procedural.count: more
    videos is fine). Options outside ``keys`` (workers, limits, retries) may change freely. ``absent`` gives
    what an option the recorded config lacks meant, for options added since (the render filters: none ran);
    other missing options are not compared.
    """
    path = Path(output) / "config.yaml"
    if not path.is_file():
        return
    old, new = yaml.safe_load(path.read_text()) or {}, to_dict(cfg)
    old = {**(absent or {}), **old}
    for d in (old, new):
        for k, subs in (ignore or {}).items():
            if isinstance(d.get(k), dict):
                d[k] = {a: b for a, b in d[k].items() if a not in subs}
    diffs = [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in keys if k in old and old[k] != new.get(k)]
    if diffs:
        from pipelines.common.errors import UserError
        raise UserError(f"{output} holds samples made with other settings ({'; '.join(diffs)}); adding to it would "
                        f"mix them: use a new --output, or rerun with --config {path}")


def write_resolved(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a job's outputs (checked writable first) and return its path."""
    path = ensure_output_dir(directory) / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value at the top level")
    return data


def _add_flags(parser: argparse.ArgumentParser, cfg: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _add_flags(parser, value, f"{name}.")
            continue
        flag = "--" + name.replace("_", "-")
        aliases = [flag] if flag == f"--{name}" else [flag, f"--{name}"]
        text = f.metadata.get("doc", "")
        choices = literal_choices(type(cfg), f.name)
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else "V"  # --help lists a choice's values
        parser.add_argument(*aliases, dest=f"override:{name}", metavar=metavar, default=argparse.SUPPRESS,
                            help=f"{text} [default: {value!r}]".replace("%", "%%"))  # argparse formats help with %


def build_preset(cls: type[T], overrides: Mapping[str, Any]) -> T:
    """One row of a preset table: ``cls()``'s field defaults with ``overrides`` (nested sections as nested
    dicts, or dotted keys) applied, type-checked and validated, as a fresh config (callers may change it)."""
    return apply_overrides(cls(), copy.deepcopy(dict(overrides)))  # the table's dicts stay as written


def preset_table(cls: type[T], table: Mapping[str, Mapping[str, Any]]) -> dict[str, Callable[[], T]]:
    """A job's presets from its table (``name -> field overrides``, edm2's ``config_presets``): name -> a
    function building that preset (``parse_config``'s ``presets``)."""
    return {name: functools.partial(build_preset, cls, overrides) for name, overrides in table.items()}


def _preset_help(presets: Mapping[str, Any], default_preset: str | None) -> str:
    names = ", ".join(f"{n} ({PRESET_DOCS[n]})" if n in PRESET_DOCS else n for n in presets)
    default = "%(default)s: no preset, the field defaults shown below" if default_preset is None else "%(default)s"
    return f"named starting config, one of: {names} (default: {default})"


def parse_config(cls: type[T], presets: Mapping[str, Callable[[], T]], argv: list[str] | None = None,
                 description: str = "", default_preset: str | None = "demo",
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[T, argparse.Namespace]:
    """Build ``cls`` from ``--preset``, ``--config`` YAML, ``--set k=v`` and per-field flags (in that order).

    ``default_preset`` is what a run without ``--preset`` starts from: a preset name, or None for ``cls()``'s
    field defaults (then no preset name is the default)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default=default_preset, help=_preset_help(presets, default_preset))
    parser.add_argument("--config", default=None, help="YAML file of overrides (nested sections or dotted keys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field by dotted name, e.g. --set model.depth=4")
    if extra is not None:
        extra(parser)
    _add_flags(parser, presets[default_preset]() if default_preset in presets else cls())
    args = parser.parse_args(argv)
    if args.preset is None and default_preset is None:
        cfg = cls()
    elif args.preset not in presets:
        raise ConfigError(f"unknown preset '{args.preset}'; choose one of: {', '.join(presets)}")
    else:
        cfg = presets[args.preset]()
    overrides: dict[str, Any] = {}
    if args.config:
        overrides.update(load_yaml(args.config))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"malformed override '{item}'; write --set key=value, e.g. --set views=8")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    for key, value in vars(args).items():
        if key.startswith("override:"):
            overrides[key[len("override:"):]] = value
    # YAML may hold nested sections; flags are dotted. apply_overrides accepts both.
    cfg = apply_overrides(cfg, overrides)
    return cfg, args


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point so that expected errors print one line and exit non-zero, not a traceback."""
    from pipelines.common.errors import UserError
    try:
        code = main(argv)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
