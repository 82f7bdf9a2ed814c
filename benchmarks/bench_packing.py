"""The update of one rollout batch with padded and with packed micro-batches (train.packing), on the same batch from the
same weights, alternating, at two shapes:

- variable: 64 completions of 16 to 512 tokens (uniform) after prompts of 64, the long-tailed lengths of reasoning
  runs, where most of a padded micro-batch is padding;
- short: the default study's shape, 256 completions of 2 to 16 tokens after prompts of 20 to 40.

    PYTHONPATH=src python benchmarks/bench_packing.py [--repeats 5] [--hidden 128] [--layers 2] [--threads 1]

Prints the median update time of each and their ratio, and the share of padding in the padded micro-batches.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kalmanrl.runtime.cpu import pin_cpu_dispatch

pin_cpu_dispatch()

import torch  # noqa: E402  (after the CPU dispatch is pinned)

from kalmanrl.configuration.config import validate_config  # noqa: E402
from kalmanrl.configuration.settings import config_train_settings  # noqa: E402
from kalmanrl.jobs.trainer import mini_batch_schedule, update_policy  # noqa: E402
from kalmanrl.policy.batch import build_batch, micro_batches  # noqa: E402
from kalmanrl.policy.model import build_tiny_model, load_policy  # noqa: E402
from kalmanrl.policy.optim import adamw  # noqa: E402
from kalmanrl.policy.rollout import Completion  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import tiny_spec  # noqa: E402

# name -> (groups, group size, prompt lengths, completion lengths): lengths drawn uniformly from the ranges
SHAPES = {"variable": (8, 8, (64, 64), (16, 512)), "short": (32, 8, (20, 40), (2, 16))}


def varied_batch(vocab: int, groups: int, group: int, prompts: tuple[int, int], completions: tuple[int, int],
                 seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def length(bounds: tuple[int, int]) -> int:
        return int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))

    def draw(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    sampled = [[Completion(token_ids=draw(n), logprobs=[0.0] * n, text="", finish_reason="stop")
                for n in (length(completions) for _ in range(group))] for _ in range(groups)]
    return build_batch([draw(length(prompts)) for _ in range(groups)], sampled,
                       torch.randn(groups, group, generator=generator), pad_id=0)


def padding_share(batch, schedule, budget: int) -> float:
    """Share of the padded micro-batches' token slots that are padding."""
    slots = real = 0
    prompt, completion = batch.widths()
    for mini in schedule[0]:
        for micro in micro_batches(batch, mini, budget):
            rows = micro.tolist()
            slots += len(rows) * (max(prompt[r] for r in rows) + max(max(completion[r] for r in rows), 1))
            real += sum(prompt[r] + completion[r] for r in rows)
    return 1 - real / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="alternations of padded and packed (medians)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", choices=list(SHAPES), nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); model "
          f"hidden {args.hidden} x {args.layers} layers, vocabulary 512; GRPO, 2 mini-batches, float32")
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**tiny_spec(args.hidden, args.layers), "max_position_embeddings": 1024}
        build_tiny_model(Path(tmp) / "model", ["1 + 2 = 3"] * 50, spec=spec, seed=0)
        policy = load_policy(Path(tmp) / "model")[0]
    start = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    for shape in args.shape:
        groups, group, prompts, completions = SHAPES[shape]
        batch = varied_batch(policy.config.vocab_size, groups, group, prompts, completions)
        settings = config_train_settings(validate_config({"train": {"mini_batches": 2, "precision": "float32"}}),
                                         algorithm="grpo")
        schedule = mini_batch_schedule(groups * group, settings.train, 0, 0)
        batch.old_logp = torch.zeros_like(batch.completion_mask)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for packing in (False, True):
                policy.load_state_dict(start)
                optimizer = adamw(policy.parameters(), settings.train.optimizer())
                begin = time.perf_counter()
                update_policy(policy, optimizer, batch, schedule, settings.with_train(packing=packing))
                times[packing].append(time.perf_counter() - begin)
        padded, packed = (statistics.median(times[p]) for p in (False, True))
        share = padding_share(batch, schedule, settings.train.micro_batch_tokens)
        print(f"{shape}: {groups * group} rows, prompts {prompts[0]}-{prompts[1]}, completions "
              f"{completions[0]}-{completions[1]} tokens, padding {share:.0%} of the padded micro-batches: update "
              f"padded {padded:.3f} s, packed {packed:.3f} s (median of {args.repeats}), padded / packed "
              f"{padded / packed:.2f}")


if __name__ == "__main__":
    main()
