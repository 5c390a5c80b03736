"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations

import importlib


class UserError(RuntimeError):
    """An error caused by input or environment, not a bug; printed as one line by ``run_cli``."""


class ItemError(Exception):
    """A single item of a data job failed; ``stage`` names where (download, import, render, decode, ...).
    The job records it in failures.parquet and goes on with the other items."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


# import name -> pip requirement that provides it
_PROVIDERS = {
    "bpy": "bpy==5.0.1", "ray": "ray[data,train,default]", "deepspeed": "deepspeed", "av": "av",
    "webdataset": "webdataset", "mlflow": "mlflow", "trimesh": "trimesh", "torch": "torch==2.13.0",
    "einops": "einops", "pyarrow": "pyarrow", "yaml": "pyyaml",
}


def require(*modules: str) -> None:
    """Import each module or raise UserError naming the package to install."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            pkg = _PROVIDERS.get(name, name)
            raise UserError(f"missing dependency '{name}' ({exc}); run 'make install' "
                            f"or 'pip install \"{pkg}\"' in the project's .venv") from None
