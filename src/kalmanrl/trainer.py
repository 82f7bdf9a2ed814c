"""The GRPO-family RL loop. One loop serves every algorithm: an algorithm is only an advantage estimator, a ratio
transform and loss knobs, looked up by name in `kalmanrl.algorithms`.

Per step (algorithms.md): sample prompts; G completions each; rewards; advantages; recompute old log-probs; then
ppo_epochs x mini_batches optimiser steps over the rollout batch, so ratios and clipping act off-policy."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pandas as pd
import torch

from kalmanrl import algorithms
from kalmanrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kalmanrl.config import config_hash
from kalmanrl.data import read_dataset
from kalmanrl.devices import resolve_device
from kalmanrl.io import atomic_path, write_parquet
from kalmanrl.layout import checkpoints_root
from kalmanrl.model import load_policy, save_policy
from kalmanrl.optim import make_optimizer
from kalmanrl.progress import progress
from kalmanrl.prompts import get_template
from kalmanrl.rewards import get_reward
from kalmanrl.rollout import Completion, SamplingConfig, make_engine


@dataclass
class RolloutBatch:
    """B = prompts x G sequences: left-padded prompts then right-padded completions, so every completion starts at
    column `prompt_len` and per-token tensors are response-aligned ([B, T])."""

    input_ids: torch.Tensor        # [B, P + T]
    attention_mask: torch.Tensor   # [B, P + T]
    position_ids: torch.Tensor     # [B, P + T]
    completion_mask: torch.Tensor  # [B, T] float
    prompt_len: int
    advantages: torch.Tensor       # [B]
    old_logp: torch.Tensor | None = None  # [B, T]
    ref_logp: torch.Tensor | None = None  # [B, T]

    def _map(self, fn) -> RolloutBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    def select(self, index: torch.Tensor) -> RolloutBatch:
        return self._map(lambda t: t[index])

    def to(self, device: torch.device) -> RolloutBatch:
        return self._map(lambda t: t.to(device))


def build_batch(prompt_ids: list[list[int]], completions: list[list[Completion]], advantages: torch.Tensor,
                pad_id: int) -> RolloutBatch:
    """Pack prompts [N] and their completions [N][G] into one padded batch of N*G rows (prompt-major order)."""
    rows = [(p, c.token_ids) for p, group in zip(prompt_ids, completions) for c in group]
    prompt_len = max(len(p) for p, _ in rows)
    max_completion = max(1, max(len(c) for _, c in rows))
    ids = torch.full((len(rows), prompt_len + max_completion), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, prompt_len - len(p):prompt_len] = torch.tensor(p)
        ids[i, prompt_len:prompt_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, prompt_len - len(p):prompt_len + len(c)] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(ids, attention, positions, attention[:, prompt_len:].float(), prompt_len,
                        advantages.reshape(-1).float())


def token_logprobs(model, batch: RolloutBatch, *, with_entropy: bool = False):
    """Log-probs [B, T] of the completion tokens under `model` (and their per-token entropy [B, T])."""
    steps = batch.completion_mask.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   logits_to_keep=steps + 1).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, batch.prompt_len:]
    taken = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return taken
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return taken, entropy


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses: the run diverged."""


def train(policy_dir: Path, dataset: Path, out_dir: Path, *, settings: dict, threads: int = 1,
          gpus: int | None = None) -> pd.DataFrame:
    """RL-train the policy in `policy_dir` on the train split of `dataset`. Writes `out_dir/final` (save_pretrained)
    and `out_dir/metrics.parquet`; resumes from `out_dir/checkpoints` when a run with the same settings was cut off."""
    cfg, alg, ident = settings["train"], settings["algorithm"], settings["ident"]
    seed = ident["seed"]
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    device = resolve_device(gpus)
    optimizer_steps = cfg["ppo_epochs"] * cfg["mini_batches"]
    algorithms.check_off_policy(alg["ratio"], optimizer_steps)

    policy, tokenizer = load_policy(policy_dir, device=device)
    reference = load_policy(policy_dir, device=device)[0].eval().requires_grad_(False) if alg["beta"] > 0 else None
    problems = read_dataset(dataset, split="train").to_pandas()
    template = get_template(settings["task"]["template"], settings["task"]["chat_template_kwargs"])
    reward_fn = get_reward(settings["task"]["reward"], **settings["task"]["reward_params"])
    advantage_fn = algorithms.get_advantage_estimator(alg["advantage"], **alg["advantage_params"])
    ratio_fn = algorithms.get_ratio_transform(alg["ratio"], **alg["ratio_params"])
    # The token-noise diagnostic filters z the way KPO would, for every algorithm, so runs are comparable.
    kpo_params = alg["ratio_params"] if alg["ratio"] == "kpo" else {}

    optimizer, scheduler = make_optimizer(policy.parameters(), cfg, cfg["steps"] * optimizer_steps)

    settings_hash = config_hash(settings)
    checkpoints = checkpoints_root(out_dir)
    start, rows = 0, []
    if (found := latest_checkpoint(checkpoints, settings_hash)) is not None:
        resumed = load_checkpoint(found, policy=policy, optimizer=optimizer, scheduler=scheduler)
        start, rows = resumed.step, resumed.metrics.to_dict("records")

    rollout = settings["rollout"]
    engine = make_engine(rollout["backend"], policy=policy, tokenizer=tokenizer, model_dir=policy_dir, **{
        k: v for k, v in rollout.items() if k != "backend"})
    writer = _tensorboard(out_dir) if cfg["tensorboard"] else None
    nonfinite = int(rows[-1]["nonfinite_total"]) if rows else 0
    with engine, reward_fn, progress(range(start, cfg["steps"]), initial=start, total=cfg["steps"],
                                     desc=f"{ident['algorithm']} seed {seed}", unit="step") as bar:
        if start:
            engine.sync_weights(policy)
        for step in bar:
            t0 = time.perf_counter()
            rows_idx = _step_problems(len(problems), step, cfg["prompts_per_step"], seed)
            batch_problems = problems.iloc[rows_idx]
            prompt_ids = [tokenizer(template.render(tokenizer, p), add_special_tokens=False)["input_ids"]
                          for p in batch_problems["problem"]]
            sampling = SamplingConfig(n=cfg["group_size"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                                      max_tokens=cfg["max_tokens"], seed=seed * 1_000_003 + step)
            policy.eval()
            completions = engine.generate(prompt_ids, sampling)
            t_rollout = time.perf_counter()

            texts = [c.text for group in completions for c in group]
            golds = [g for g in batch_problems["answer"] for _ in range(cfg["group_size"])]
            verdicts = reward_fn.judge(texts, golds)
            rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float64).view(-1, cfg["group_size"])
            advantages = advantage_fn(rewards)
            t_reward = time.perf_counter()

            batch = build_batch(prompt_ids, completions, advantages, tokenizer.pad_token_id).to(device)
            with torch.no_grad():
                batch.old_logp = token_logprobs(policy, batch)
                if reference is not None:
                    batch.ref_logp = token_logprobs(reference, batch)
            t_score = time.perf_counter()

            policy.train()
            stats, skipped = update_policy(policy, optimizer, scheduler, batch, ratio_fn, alg, cfg, seed, step,
                                           kpo_params)
            nonfinite += skipped
            if nonfinite > cfg["max_nonfinite"]:
                raise NonFiniteLossError(
                    f"{nonfinite} non-finite losses (train.max_nonfinite = {cfg['max_nonfinite']}); lower train.lr or "
                    "check the reward scale")
            engine.sync_weights(policy)
            t_end = time.perf_counter()

            lengths = torch.tensor([len(c.token_ids) for group in completions for c in group], dtype=torch.float)
            row = {**ident, "step": step + 1, "wall_time": t_end - t0,
                   "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                   "accuracy": sum(v.correct for v in verdicts) / len(verdicts),
                   "advantage_mean": advantages.mean().item(), "advantage_std": advantages.std().item(),
                   "advantage_abs_max": advantages.abs().max().item(),
                   "response_length": lengths.mean().item(),
                   "truncation_rate": sum(c.finish_reason == "length" for g in completions for c in g) / len(lengths),
                   "rollout_tokens_per_s": lengths.sum().item() / (t_rollout - t0),
                   "train_tokens_per_s": cfg["ppo_epochs"] * batch.attention_mask.sum().item() / (t_end - t_score),
                   "time_rollout": t_rollout - t0, "time_reward": t_reward - t_rollout,
                   "time_score": t_score - t_reward, "time_update": t_end - t_score,
                   "lr": scheduler.get_last_lr()[0], "nonfinite_skipped": skipped, "nonfinite_total": nonfinite,
                   **stats}
            rows.append(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}", refresh=False)
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, float):
                        writer.add_scalar(key, value, step + 1)
            if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]:
                save_checkpoint(checkpoints, step + 1, policy=policy, tokenizer=tokenizer, optimizer=optimizer,
                                scheduler=scheduler, metrics=pd.DataFrame(rows), settings_hash=settings_hash,
                                dtype=settings["dtype"], keep_every=cfg["keep_every"])

    if writer is not None:
        writer.close()
    metrics = pd.DataFrame(rows)
    with atomic_path(out_dir / "final", directory=True) as tmp:
        save_policy(policy, tokenizer, tmp, dtype=settings["dtype"])
    write_parquet(metrics, out_dir / "metrics.parquet")
    return metrics


def update_policy(policy, optimizer, scheduler, batch: RolloutBatch, ratio_fn, alg: dict, cfg: dict, seed: int,
                  step: int, kpo_params: dict) -> tuple[dict[str, float], int]:
    """ppo_epochs x mini_batches optimiser steps over one rollout batch; returns step metrics and skipped updates."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    size = batch.input_ids.shape[0]
    sums: dict[str, list[float]] = defaultdict(list)
    skipped = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.input_ids.is_cuda)
    for _ in range(cfg["ppo_epochs"]):
        order = torch.randperm(size, generator=generator).to(batch.input_ids.device)
        for mini in order.chunk(cfg["mini_batches"]):
            optimizer.zero_grad(set_to_none=True)
            active = batch.completion_mask[mini].sum().item()
            losses = []
            for micro in mini.chunk(cfg["grad_accum"]):
                part = batch.select(micro)
                with autocast:
                    logp, entropy = token_logprobs(policy, part, with_entropy=True)
                rho = ratio_fn(logp, part.old_logp, part.completion_mask)
                loss, metrics = algorithms.policy_loss(
                    rho, part.advantages.unsqueeze(-1).expand_as(logp), part.completion_mask,
                    eps_low=alg["eps_low"], eps_high=alg["eps_high"], clip=alg["clip"], beta=alg["beta"], logp=logp,
                    ref_logp=part.ref_logp, aggregate=alg["aggregate"], num_active_tokens=active,
                    max_length=cfg["max_tokens"], surrogate=alg["surrogate"], clip_ratio_c=alg["clip_ratio_c"])
                # dapo already divides by the whole mini-batch's tokens; the other aggregates average micro-batches.
                (loss if alg["aggregate"] == "dapo" else loss / cfg["grad_accum"]).backward()
                losses.append(loss.detach())
                _record(sums, metrics, logp.detach() - part.old_logp, entropy.detach(), part.completion_mask,
                        kpo_params)
            if not all(torch.isfinite(x) for x in losses):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg["max_grad_norm"])
            sums["grad_norm"].append(grad_norm.item())
            sums["loss"].append(torch.stack(losses).mean().item())
            optimizer.step()
            scheduler.step()
    return _summarise(sums), skipped


def _record(sums, metrics: dict, z: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
            kpo_params: dict) -> None:
    for key, value in metrics.items():
        sums[key].append(float(value))
    sums["entropy"].append(((entropy * mask).sum() / mask.sum().clamp(min=1)).item())
    filtered = algorithms.filtered_log_ratio(z, mask, **{k: v for k, v in kpo_params.items() if k != "clamp"})
    for prefix, series in (("raw", z), ("filtered", filtered)):
        for key, value in algorithms.token_noise_stats(series, mask).items():
            sums[f"{key}_{prefix}"].append(float(value))


def _summarise(sums: dict[str, list[float]]) -> dict[str, float]:
    out = {}
    for key, values in sums.items():
        reduce = min if key.endswith("_min") else max if key.endswith("_max") else (lambda v: sum(v) / len(v))
        out[key] = reduce(values) if values else float("nan")
    return out


def _step_problems(num_problems: int, step: int, per_step: int, seed: int) -> list[int]:
    """The data-loader position is a pure function of the step: an epoch-wise seeded permutation, so a resumed run
    sees exactly the prompts an uninterrupted one would."""
    orders: dict[int, torch.Tensor] = {}
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_problems)
        if epoch not in orders:
            orders[epoch] = torch.randperm(num_problems, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise RuntimeError("train.tensorboard is on but tensorboard is not installed: pip install tensorboard") from err
    return SummaryWriter(out_dir / "tensorboard")
