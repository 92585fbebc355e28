"""The `gpu` work pool's Kubernetes job template (flows/k8s_job_template.json), rendered by prefect-kubernetes' own
code with the job variables flows/prefect.yaml deploys: every variable reaches the job manifest (a variable that
job_configuration does not reference is dropped without a word, as prefect-kubernetes users keep finding)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml

from flows import pools

ROOT = Path(__file__).resolve().parents[2]
prefect_kubernetes = pytest.importorskip("prefect_kubernetes.worker", reason="prefect-kubernetes (the cluster extra)")


def render(template: dict, values: dict) -> dict:
    """The Job manifest a kubernetes worker would submit for a flow run with these job variables."""
    client = mock.AsyncMock()  # resolves block / variable references: the template has none, so it is not called
    client.__aenter__.return_value = client
    config = asyncio.run(prefect_kubernetes.KubernetesWorkerJobConfiguration.from_template_and_values(
        template, values, client=client))
    assert not client.mock_calls
    return config.job_manifest


def deployment_job_variables(name: str) -> dict:
    spec = yaml.safe_load((ROOT / "flows/prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)["work_pool"]["job_variables"]


def test_every_variable_is_referenced_by_the_job_configuration():
    template = pools.job_template("kubernetes")
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert set(template["variables"]["properties"]) == used
    for key in ("gpu_count", "credentials_secret", "dvc_cache_claim", "shm_size"):
        assert key in template["variables"]["properties"]


def test_the_nightly_deployment_renders_a_gpu_job_with_its_image_env_secret_and_cache():
    variables = deployment_job_variables("nightly")
    job = render(pools.job_template("kubernetes"), variables)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == variables["image"] == "alignflow-gpu:latest"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == str(variables["gpu_count"])
    env = container["env"]  # a mapping here; the worker turns it into name/value pairs when it submits the job
    env = env if isinstance(env, dict) else {e["name"]: e.get("value") for e in env}
    for key, value in variables["env"].items():
        assert env[key] == value, key
    assert container["envFrom"] == [{"secretRef": {"name": variables["credentials_secret"], "optional": True}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dvc-cache"]["persistentVolumeClaim"]["claimName"] == variables["dvc_cache_claim"]
    assert {"name": "dvc-cache", "mountPath": "/mnt/dvc-cache"} in container["volumeMounts"]
    # the pull steps point the clone's DVC cache at that mount
    spec = (ROOT / "flows/prefect.yaml").read_text()
    assert "dvc cache dir --local /mnt/dvc-cache" in spec


def test_every_value_given_reaches_the_manifest():
    template = pools.job_template("kubernetes")
    samples = {"image": "registry.example/alignflow:abc123", "gpu_count": 4, "credentials_secret": "team-creds-7",
               "dvc_cache_claim": "cache-claim-9", "shm_size": "31Gi", "namespace": "ml-team",
               "service_account_name": "trainer-sa", "cpu_request": "7", "memory_limit": "123Gi",
               "env": {"ALIGNFLOW_DVC_REMOTE": "remote-x"}, "labels": {"team": "align-lbl"}}
    manifest = json.dumps(render(template, samples))
    for key, value in samples.items():
        needles = [json.dumps(v) for v in value.values()] if isinstance(value, dict) else [json.dumps(value),
                                                                                              json.dumps(str(value))]
        assert any(n in manifest for n in needles), f"{key}={value!r} did not reach the job manifest"
