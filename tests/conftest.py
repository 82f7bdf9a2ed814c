"""Shared fixtures: paths of the repository and of the real datasets' local copies (when a directory is named)."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from kalmanrl.runtime.cpu import pin_cpu_dispatch

# The test process computes under the stages' CPU dispatch, pinned before anything loads numpy or torch; the CLI's
# in-process runs then find it pinned.
pin_cpu_dispatch()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A working directory where the smoke workflow (tests/smoke_runs.py) ran to completion, once per session: the
    workflow tests read it, the SLURM tests compare their runs with it, the vLLM workflow reuses its warm start. Read
    it; never change it."""
    from smoke_runs import smoke_workdir, snakemake

    workdir = smoke_workdir(tmp_path_factory.mktemp("smoke"))
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The directory of the real datasets' local copies, named by $KALMANRL_DATA_DIR (`.ci/run` names one when it
    exists beside the repository); tests of the loaders against the real data skip without it."""
    from kalmanrl.data.sources import DATA_DIR_ENV

    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"no local dataset copies: set ${DATA_DIR_ENV} to run the tests on the real data")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"${DATA_DIR_ENV}={value}: no such directory")
    return path


TINY_SPEC = {"vocab_size": 384, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
             "intermediate_size": 128, "max_position_embeddings": 512, "tie_word_embeddings": True}


@dataclass
class IdsTokenizer:
    """A tokenizer for models built here without one: pad 0, end 1, token ids decoded as their numbers."""

    pad_token_id: int = 0
    eos_token_id: int = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="session")
def arithmetic_parquet(tmp_path_factory) -> Path:
    """A small generated Arithmetic dataset (train 200 / test 20) as the data stage writes it."""
    from kalmanrl.data.dataset import write_dataset
    from kalmanrl.data.loaders import build_dataset

    table, _ = build_dataset({"loader": "arithmetic", "params": {"difficulty": "easy", "train_size": 200,
                                                                 "test_size": 20}},
                             local_dir=None, seed=0,
                             arithmetic_presets={"easy": [3, 3], "normal": [5, 5], "hard": [6, 6]})
    path = tmp_path_factory.mktemp("data") / "arithmetic.parquet"
    write_dataset(table, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, arithmetic_parquet) -> Path:
    """A tiny Qwen2 (head_dim 32) with a tokenizer trained on the arithmetic text, as the model stage builds it."""
    from kalmanrl.data.dataset import read_dataset
    from kalmanrl.policy.model import build_tiny_model

    table = read_dataset(arithmetic_parquet)
    texts = table.column("problem").to_pylist() + table.column("answer").to_pylist()
    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(out, texts, spec=TINY_SPEC, seed=0)
    return out
