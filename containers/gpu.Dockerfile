# GPU image: the GPU lock (CUDA torch + vLLM) + kalmanrl, for the sft / train / evaluate stages on NVIDIA GPUs.
# Build from the repository root:  docker build -f containers/gpu.Dockerfile -t kalmanrl-gpu:0.1.0 .
# Where no image can be pulled:     containers/build.sh gpu   (a debootstrap base)
# Run with the host's GPUs:         docker run --gpus all kalmanrl-gpu:0.1.0 kalmanrl --help
# PyPI's Linux torch wheel carries its own CUDA runtime, so the base needs only Python; the host supplies the driver.
# Every package comes from locks/gpu.txt at its exact version, checked against its hash (make lock regenerates it).
ARG BASE=python:3.11.11-slim-bookworm

# The run-time image: Python and gcc (Triton compiles kernels at run time: vLLM with enforce_eager: false, torch.compile).
FROM ${BASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 "libc6-dev=$(dpkg-query -W -f='${Version}' libc6)" \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    KALMANRL_LOCK=/opt/kalmanrl/locks/gpu.txt

# The locked packages, in a build stage: what the host hands in (containers/handed-in/: nothing usually) stays out of the
# final image. A ca.crt there is the CA bundle pip trusts (a host behind a TLS-inspecting proxy).
FROM runtime AS locked
COPY locks/gpu.txt /opt/kalmanrl/locks/gpu.txt
COPY containers/handed-in/ /tmp/handed-in/
RUN python3 -m venv /opt/venv \
 && if [ -f /tmp/handed-in/ca.crt ]; then export PIP_CERT=/tmp/handed-in/ca.crt; fi \
 && pip install --require-hashes --no-deps -r /opt/kalmanrl/locks/gpu.txt

FROM runtime
COPY --from=locked /opt/venv /opt/venv
COPY locks/gpu.txt /opt/kalmanrl/locks/gpu.txt
# The package last, so that a change of the code does not reinstall the locked dependencies (the lock has setuptools,
# so the build needs nothing from the network).
COPY pyproject.toml README.md /opt/kalmanrl/
COPY src /opt/kalmanrl/src
# src/kalmanrl/configuration/config.schema.yaml links to the workflow's schema (one source of the config's defaults).
COPY workflow/schemas /opt/kalmanrl/workflow/schemas
RUN pip install --no-deps --no-build-isolation /opt/kalmanrl \
 && kalmanrl --version \
 && gcc --version

WORKDIR /work
CMD ["kalmanrl", "--help"]
