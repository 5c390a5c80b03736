"""KubeRay manifests, the cluster-launcher YAML and the runtime env parse, and name real entry points."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
ENTRY = re.compile(r"\b((?:pipelines|training)/[A-Za-z0-9_]+\.py)\b")


def _entry_points(text: str) -> set[str]:
    return set(ENTRY.findall(text))


def test_kuberay_manifests() -> None:
    cluster = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-render", "gpu-train"}
    gpu = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu-render"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for name in ("rayjob-train-4d.yaml", "rayjob-render.yaml"):
        job = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
        assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
        entry = job["spec"]["entrypoint"]
        assert entry.startswith("python ") and _entry_points(entry), entry
        yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_every_claimed_volume_is_defined_and_shared() -> None:
    """Every pod mounts the one ReadWriteMany claim that pvc.yaml defines: shards, run folders and Ray Train's
    checkpoints must be one file system for pods on different nodes."""
    pvc = yaml.safe_load((CLUSTER / "kuberay/pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = set()
    for manifest in ("raycluster.yaml", "rayjob-render.yaml", "rayjob-train-4d.yaml"):
        text = (CLUSTER / "kuberay" / manifest).read_text()
        claims |= set(re.findall(r"claimName:\s*([\w-]+)", text))
        assert "mountPath: /data" in text, manifest
    assert claims == {pvc["metadata"]["name"]}


def test_launcher_config_validates_against_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())
    validate_config(prepare_config(config))
    assert {"cpu_render", "gpu_train"} <= set(config["available_node_types"])
    # the shared path: mounted on every host, then into every container
    assert any("/data" in c and "mount" in c for c in config["initialization_commands"])
    assert "-v /data:/data" in " ".join(config["docker"]["run_options"])


def test_runtime_env_is_valid() -> None:
    from ray.runtime_env import RuntimeEnv
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert ".venv/" in env["excludes"]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in CLUSTER.rglob("*")
                                        if p.is_file() and p.suffix in (".yaml", ".sh", "") ))
def test_every_named_entry_point_exists(path: str) -> None:
    for entry in _entry_points((ROOT / path).read_text()):
        assert (ROOT / entry).is_file(), f"{path} names {entry}, which does not exist"
