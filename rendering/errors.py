"""The rendering layer's one error shape: one asset failed at a named stage.

rendering/ imports nothing of the jobs, so this is its own; the data jobs' ``ItemError``
(pipelines/common/errors.py) has the same shape, and the render job turns one into the other.
"""

from __future__ import annotations


class StageError(Exception):
    """One asset failed; ``stage`` names where (import, static, normalize, render, timeout, crash, ...): what
    failures.parquet records."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
