"""MLflow stores as every job uses them: the default tracking URI and experiments created in the right
store. The training run's tracker (metrics, pictures, checkpoints as artifacts) is training/tracking.py."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def default_uri(given: str, folder: str | Path) -> str:
    """The tracking URI of a job: ``given`` (its --mlflow-uri), else MLFLOW_TRACKING_URI (a team's server),
    else a SQLite file in the job's output ``folder`` (one machine, nothing to set up). A local store given
    relative to the working directory (``sqlite:///mlflow.db``, ``./mlruns``) is made absolute: the
    training workers log from another directory, and would otherwise write to a store of their own."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(folder).resolve()}/mlflow.db"
    path = uri[len("sqlite:///"):]
    if uri.startswith("sqlite:///") and not path.startswith("/") and path != ":memory:":
        return f"sqlite:///{os.path.abspath(path)}"
    if uri.startswith("file:") and not uri.startswith("file://") and not uri[len("file:"):].startswith("/"):
        return f"file://{os.path.abspath(uri[len('file:'):])}"
    if uri.lower() not in ("none", "databricks") and not URI_SCHEME.match(uri):  # a folder: MLflow's file store
        return os.path.abspath(os.path.expanduser(uri))
    return uri


URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
"""A URI's scheme (``sqlite:``, ``http:``, ``runs:``, ``s3:``, ``models:``): what is not a local path."""


def say(message: str) -> None:
    """One status line from a worker; bypasses Ray Train's print patch, which would echo it twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def ensure_experiment_at(uri: str, name: str) -> str:
    """Create experiment ``name`` in the store at ``uri`` unless it exists; returns its id.

    Uses a client bound to ``uri``: ``mlflow.set_tracking_uri`` would also export
    MLFLOW_TRACKING_URI, sending every later run of this process to this store.
    """
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database file, not in the current directory, which is a
        # temporary copy under `ray job submit`.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)
