# GPU worker image for alignflow: CUDA PyTorch + this project, run by the `gpu` work pool (flows/prefect.yaml).
#
#   docker build -t alignflow-gpu:latest .
#   docker run --rm --gpus all alignflow-gpu:latest python -c "import torch; print(torch.cuda.is_available())"
#   docker run --rm --gpus all -v "$PWD:/work" -w /work alignflow-gpu:latest dvc repro   # on a checkout
#
# Install steps are the README's (venv, torch first, then the project with pyproject.toml's pins), except
# that torch is the CUDA build from the PyTorch wheel index instead of the CPU wheel. The CUDA runtime
# libraries come with that wheel, so the base image only needs the NVIDIA container environment (`base`).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
FROM ${CUDA_IMAGE}

# Same torch version as the README / .ci (CPU) install; the CUDA flavour picks the wheel index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PIP_VERSION=25.3

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# python3.11 as on the build machine; git for DVC and the deployments' git_clone pull step.
# Distro packages are not version-pinned: they follow the base image's Ubuntu release (security fixes).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

RUN groupadd --gid 1000 alignflow \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash alignflow \
    && mkdir -p /opt/alignflow \
    && chown alignflow:alignflow /opt/alignflow
WORKDIR /opt/alignflow

# The project with the exact pins of pyproject.toml (torch is already satisfied, so it stays the CUDA build).
COPY --chown=alignflow:alignflow pyproject.toml README.md ./
COPY --chown=alignflow:alignflow components ./components
COPY --chown=alignflow:alignflow flows ./flows
RUN pip install --no-cache-dir . \
    && python -c "import torch, components.core.config, flows.pipeline; print('torch', torch.__version__)"

# The rest of the pipeline definition (dvc.yaml, params.yaml, configs/ ...); .dockerignore keeps out
# .git, the venv, outputs, caches and tracking stores. Deployments clone the commit to run instead.
COPY --chown=alignflow:alignflow . .

USER 1000:1000
# No ENTRYPOINT on purpose: Kubernetes/Docker work pools start flow runs by replacing the command
# (`prefect flow-run execute ...`), and an entrypoint would be prepended to it.
CMD ["alignflow", "--help"]
