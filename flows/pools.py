"""Server-side set-up that flows/prefect.yaml cannot declare: the `cpu` and `gpu` work pools and the task
concurrency limits that keep two stages off one GPU and one DVC checkout.

    python -m flows.pipeline setup-pools [--gpu-pool-type kubernetes|docker|process]
"""

from __future__ import annotations

import json
from pathlib import Path

# Task tags that server-side concurrency limits key on (`setup-pools` creates both with limit 1):
# every stage holds the checkout's DVC lock; training stages also hold the GPU. The flow's tasks carry them.
DVC_TAG = "alignflow-dvc"
GPU_TAG = "alignflow-gpu"


K8S_TEMPLATE = Path(__file__).with_name("k8s_job_template.json")


def job_template(pool_type: str) -> dict:
    """The base job template of a work pool of `pool_type`. Kubernetes: the repo's flows/k8s_job_template.json
    (prefect-kubernetes' default plus the GPU request and limit, the credentials Secret, the DVC cache volume and
    /dev/shm; tests/unit/test_work_pools.py renders it with prefect-kubernetes' own code). Others: Prefect's
    default for the type (process; docker with prefect-docker installed)."""
    import asyncio

    if pool_type == "kubernetes":
        return json.loads(K8S_TEMPLATE.read_text())
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    template = asyncio.run(get_default_base_job_template_for_infrastructure_type(pool_type))
    if template is None:
        raise RuntimeError(f"no default job template for work pool type {pool_type!r} (pip install prefect-{pool_type})")
    return template


def setup_work_pools(gpu_pool_type: str = "kubernetes") -> None:
    """What flows/prefect.yaml cannot declare: the two work pools (one flow run at a time each) and the
    tag concurrency limits that keep two stages off one GPU and one DVC checkout. Idempotent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    pools = [
        WorkPoolCreate(
            name="cpu", type="process", concurrency_limit=1, base_job_template=job_template("process")
        ),
        WorkPoolCreate(
            name="gpu", type=gpu_pool_type, concurrency_limit=1, base_job_template=job_template(gpu_pool_type)
        ),
    ]
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(pool)
                print(f"work pool {pool.name!r} ({pool.type}) created, concurrency limit 1")
            except ObjectAlreadyExists:
                print(f"work pool {pool.name!r} exists; left as is")
        existing = {limit.tag for limit in client.read_concurrency_limits(limit=200, offset=0)}
        for tag in (DVC_TAG, GPU_TAG):
            if tag not in existing:
                client.create_concurrency_limit(tag=tag, concurrency_limit=1)
                print(f"task concurrency limit {tag!r} = 1")
