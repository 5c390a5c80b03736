"""Input listing shared by the data jobs: a folder, a glob, or a Parquet manifest of files.

Each job turns the listed files into its own items (asset uids, video ids); the
rules for finding them, resolving manifest paths and the errors are one piece of code.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from pipelines.common.errors import UserError


@dataclass(frozen=True)
class InputFile:
    path: str
    """Absolute path, or a URL given in a manifest (streamed by the worker)."""
    name: str
    """Path relative to the listed folder, the glob match, or the manifest's path entry."""
    given_id: str | None = None
    """The manifest's id column, where it has one."""


def list_files(spec: str, extensions: tuple[str, ...], id_column: str, what: str,
               accepted: str = "a folder, a glob or a .parquet manifest") -> list[InputFile]:
    """Files with ``extensions`` under a folder (recursive), matching a glob, or listed in a Parquet manifest.

    A manifest has a ``path`` column (relative paths resolve against the manifest's folder)
    and an optional ``id_column``. Raises UserError when the spec names nothing; the message
    says ``what`` was looked for and the forms the job ``accepted``.
    """
    spec = spec.strip()
    p = Path(spec)
    if spec.endswith(".parquet"):
        files = _from_manifest(p, id_column)
    elif p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
        files = [InputFile(str(f.resolve()), f.relative_to(p).as_posix()) for f in found]
    else:
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches and not any(c in spec for c in "*?["):
            raise UserError(f"input '{spec}' is not {accepted} that exists, so no {what} there; check --input")
        files = [InputFile(str(Path(m).resolve()), m) for m in matches
                 if Path(m).is_file() and Path(m).suffix.lower() in extensions]
    if not files:
        raise UserError(f"no {what} found at '{spec}' (looked for {', '.join(extensions)}); give a folder, a glob "
                        "or a Parquet manifest with a 'path' column")
    return files


def _from_manifest(path: Path, id_column: str) -> list[InputFile]:
    import pyarrow.parquet as pq
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; pass a Parquet file with a 'path' column")
    table = pq.read_table(path)
    if "path" not in table.column_names:
        raise UserError(f"manifest {path} has no 'path' column (columns: {', '.join(table.column_names)}); "
                        "add one with the file paths")
    paths = table.column("path").to_pylist()
    ids = table.column(id_column).to_pylist() if id_column in table.column_names else [None] * len(paths)
    if any(x is None for x in paths) or (id_column in table.column_names and any(i is None for i in ids)):
        raise UserError(f"manifest {path} has empty 'path' or '{id_column}' entries; fill or drop those rows")
    given = [i for i in ids if i is not None]
    if len(set(given)) != len(given):
        raise UserError(f"manifest {path} lists a {id_column} twice; ids must be unique")
    out = []
    for raw, iid in zip(paths, ids):
        raw = str(raw)
        if "://" in raw:  # http(s) and other FFmpeg protocols pass through
            resolved = raw
        else:
            resolved = str(Path(raw) if Path(raw).is_absolute() else path.parent / raw)
        out.append(InputFile(resolved, raw, None if iid is None else str(iid)))
    return out
