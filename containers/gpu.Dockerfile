# GPU image: CUDA torch + vLLM + kalmanrl, for the sft / train / evaluate stages on NVIDIA GPUs.
# Build from the repository root:  docker build -f containers/gpu.Dockerfile -t kalmanrl-gpu:0.1.0 .
# Run with the host's GPUs:        docker run --gpus all kalmanrl-gpu:0.1.0 kalmanrl --help
# PyPI's Linux torch wheel carries its own CUDA runtime, so the base needs only Python; the host supplies the driver.
# Versions agree with pyproject.toml (tests/test_containers.py checks it).
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

COPY pyproject.toml README.md /opt/kalmanrl/
COPY src /opt/kalmanrl/src
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "vllm==${VLLM_VERSION}" "/opt/kalmanrl[vllm]" \
 && kalmanrl --version

WORKDIR /work
CMD ["kalmanrl", "--help"]
