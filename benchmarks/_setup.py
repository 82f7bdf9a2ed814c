"""What the training benchmarks build before they measure: an Arithmetic dataset and a tiny Qwen2 with a tokenizer
trained on it, written into a directory (no hub)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from kalmanrl.data.dataset import read_dataset, write_dataset
from kalmanrl.data.loaders import build_dataset
from kalmanrl.policy.batch import RolloutBatch, build_batch
from kalmanrl.policy.model import build_tiny_model, tokenizer_corpus
from kalmanrl.policy.rollout import Completion

EASY_PRESETS = {"easy": [3, 3]}  # the KRPO paper's easy Arithmetic: three terms of up to three digits


def tiny_spec(hidden: int, layers: int) -> dict:
    """A tiny Qwen2 of `hidden` width and `layers` layers (vocabulary 512, 32-wide heads, MLP 4 x hidden)."""
    return {"vocab_size": 512, "hidden_size": hidden, "num_layers": layers, "num_heads": hidden // 32,
            "num_kv_heads": max(1, hidden // 64), "intermediate_size": 4 * hidden, "max_position_embeddings": 512,
            "tie_word_embeddings": True}


def easy_arithmetic(train_size: int) -> dict:
    """A dataset entry (as in a config's `datasets`) of easy Arithmetic with `train_size` training problems."""
    return {"loader": "arithmetic", "params": {"difficulty": "easy", "train_size": train_size, "test_size": 10}}


def build_data_and_model(directory: Path, dataset: dict, spec: dict, *, presets: dict = EASY_PRESETS,
                         templates: Iterable[str] | None = None) -> tuple[Path, Path]:
    """Write `dataset` (a config's dataset entry, seed 0) to `directory/data.parquet` and a tiny Qwen2 of `spec`
    (seed 0) to `directory/model`; returns (model dir, dataset file). The tokenizer learns the problems alone, or
    with `templates` (names) the corpus `kalmanrl model` gives it, as the workflow builds the model."""
    table, _ = build_dataset(dataset, local_dir=None, seed=0, arithmetic_presets=presets)
    data, model = directory / "data.parquet", directory / "model"
    write_dataset(table, data)
    texts = (tokenizer_corpus(read_dataset(data), templates) if templates is not None
             else read_dataset(data).column("problem").to_pylist())
    build_tiny_model(model, texts, spec=spec, seed=0)
    return model, data


def synthetic_batch(vocab: int, *, rows: int, group: int, prompt_len: int, completion_len: int,
                    seed: int = 0) -> RolloutBatch:
    """A rollout batch of `rows` sequences (groups of `group`) whose prompts and completions all have the given
    lengths, random token ids below `vocab` and random advantages: what a step's memory and speed depend on."""
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    completions = [[Completion(token_ids=draw(completion_len), logprobs=[0.0] * completion_len, text="",
                               finish_reason="length")
                    for _ in range(group)] for _ in range(rows // group)]
    return build_batch([draw(prompt_len) for _ in completions], completions,
                       torch.randn(rows // group, group, generator=generator), pad_id=0)
