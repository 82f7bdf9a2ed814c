"""Names in the results tree that both the package and the workflow use. Kept free of heavy imports: every Snakemake
start (and every cluster job) reads it."""

from __future__ import annotations

from pathlib import Path

# Report figure kinds: <report>/figures/<kind>/{model}__{task}.png, one directory each (Snakemake outputs, with a
# caption in workflow/report/<kind>.rst), and their titles.
FIGURES = {"differences": "Paired differences", "accuracy_vs_step": "Accuracy vs checkpoint step",
           "curves": "Training curves", "token_noise": "Token log-ratio noise"}


def checkpoints_root(run_dir: str | Path) -> Path:
    """A training run's checkpoints (not a workflow output, so Snakemake keeps them when a job fails)."""
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(root: Path, step: int) -> Path:
    """The checkpoint of one training step under a run's checkpoints/ directory: `model/` and, while it is the newest,
    `state/` (see `checkpoint_model_dir`, `checkpoint_state_dir`)."""
    return root / f"step_{step:06d}"


def checkpoint_model_dir(checkpoint: Path) -> Path:
    """The policy of a checkpoint as save_pretrained writes it, and nothing else: vLLM loads every *.safetensors of a
    model directory, so optimizer or RNG tensors beside the weights would reach its weight loader."""
    return checkpoint / "model"


def checkpoint_state_dir(checkpoint: Path) -> Path:
    """What only a resume needs (optimizer, RNG, scheduler, metrics so far, full-precision weights when the model
    directory holds a lower precision); removed from kept checkpoints once a newer one exists."""
    return checkpoint / "state"
