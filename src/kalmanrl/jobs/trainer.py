"""The GRPO-family RL loop. One loop serves every algorithm: an algorithm is only an advantage estimator, a ratio
transform and loss knobs, looked up by name in `kalmanrl.rl.algorithms`.

`train` is `setup` then, per rollout batch, the phases of docs/algorithms.md in order, each a function of its own:
`sample` (prompts -> G completions each), `score_rewards`, `estimate_advantages`, `score_logprobs` (old and reference
log-probs), `correct` (the rollout correction's weights and mask, when one is chosen), `update` (ppo_epochs x
mini_batches optimiser steps, so ratios and clipping act off-policy; the first takes its old log-probs from its own
forward pass, since the policy is still the sampling one), `record` (one metrics row) and `checkpoint`; `finish` writes
the final policy and the metrics.

One code path for one process and for N ranks under torchrun (`kalmanrl.runtime.distributed`): each rank samples whole
groups for its share of the step's prompts and estimates their advantages from every rank's rewards (so a batch-wide
estimator sees the whole batch); the ranks then gather the whole rollout batch (`whole_batch`, the one-process batch)
and take part in every mini-batch of the one-process schedule with a share of its rows balanced by length
(`batch.rank_rows`), normalised by the whole mini-batch's rows and tokens; the log-probs each rank scores are summed
into every rank's batch. Metrics are computed over all ranks, and rank 0 writes them and the final policy."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from kalmanrl.configuration.config import config_hash
from kalmanrl.configuration.settings import Train, TrainSettings, as_dict, resolve_train
from kalmanrl.core.io import remove_temporaries, write_parquet
from kalmanrl.core.layout import RUN, TRAINING_PROVENANCE, checkpoints_root, fields, fill, final_model_dir, metrics_file
from kalmanrl.core.progress import progress
from kalmanrl.data.dataset import read_dataset
from kalmanrl.data.prompts import PromptTemplate, get_template
from kalmanrl.data.rewards import RewardFunction, get_reward, limit_hits
from kalmanrl.jobs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_full_model
from kalmanrl.jobs.stage import completion_budgets, encode_prompts, engine_from_settings, fitting_prompts, length_limit
from kalmanrl.jobs.validation import Benchmark, due, load_benchmarks, rewards_open, validate
from kalmanrl.policy.batch import RolloutBatch, build_batch, micro_batches, rank_rows
from kalmanrl.policy.logprobs import token_logprobs
from kalmanrl.policy.lora import adapters_disabled, add_adapters, trainable_parameters
from kalmanrl.policy.model import load_policy
from kalmanrl.policy.optim import make_rollout_optimizer
from kalmanrl.policy.rollout import Completion, RolloutEngine, SamplingConfig, stop_token_ids
from kalmanrl.rl import algorithms
from kalmanrl.rl.correction import mismatch_metrics
from kalmanrl.runtime import distributed
from kalmanrl.runtime.devices import resolve_device
from kalmanrl.runtime.distributed import Ranks
from kalmanrl.runtime.provenance import environment
from kalmanrl.runtime.trackers import Trackers, start_trackers

__all__ = ["NonFiniteLossError", "RolloutBatch", "build_batch", "token_logprobs", "train", "update_policy"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients: the run diverged."""


@dataclass
class Run:
    """Everything the loop reads, built once by `setup`; `rows` and `nonfinite` grow as it runs."""

    settings: TrainSettings
    device: torch.device
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: object
    template: PromptTemplate
    problems: pd.DataFrame  # the train split without its overlong prompts
    overlong_dropped: int  # train problems dropped at setup (rollout.overlong_prompts), recorded in each metrics row
    limit: float  # the most prompt plus completion tokens: engine context and train.max_length (inf: none)
    reward_fn: RewardFunction
    validation: list[Benchmark]  # train.validation's problems (none when it is off)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: RolloutEngine
    # The first mini-batch's old log-probs come from its update forward (no dropout, no rollout correction: a
    # correction needs every old log-prob before the update, or takes the engine's).
    old_from_update: bool
    checkpoints: Path
    settings_hash: str
    ranks: Ranks
    start: int = 0
    rows: list[dict] = field(default_factory=list)
    environments: list[dict] = field(default_factory=list)  # one per start or resume, see `finish`
    nonfinite: int = 0

    @property
    def seed(self) -> int:
        return self.settings.seed


@dataclass
class Rollout:
    """One rollout batch as sampled: N problems, their prompt ids and G completions each."""

    problems: pd.DataFrame
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]


def train(policy_dir: Path, dataset: Path, out_dir: Path, *, settings: dict, threads: int = 1,
          gpus: int | None = None, validation_data: Sequence[Path] = ()) -> pd.DataFrame:
    """RL-train the policy in `policy_dir` on the train split of `dataset`. Writes `out_dir/final` (save_pretrained)
    and `out_dir/metrics.parquet`; resumes from `out_dir/checkpoints` when a run with the same settings was cut off.
    `gpus`: the GPUs the job was granted (`resolve_device`: refused when CUDA cannot give them). `validation_data`:
    with train.validation, each validated benchmark's dataset Parquet."""
    ranks = distributed.init_ranks(cuda=resolve_device(gpus).type == "cuda")
    try:
        return _train(policy_dir, dataset, out_dir, settings, threads, ranks, validation_data)
    finally:
        distributed.close_ranks(ranks)


def _train(policy_dir: Path, dataset: Path, out_dir: Path, settings: dict, threads: int, ranks: Ranks,
           validation_data: Sequence[Path]) -> pd.DataFrame:
    run = setup(policy_dir, dataset, out_dir, settings, threads, ranks, validation_data)
    cfg = run.settings.train
    bar = progress(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, unit="step",
                   desc=f"{run.settings.ident['algorithm']} seed {run.seed}", disable=not ranks.is_main)
    # The trackers close however the loop ends (an MLflow run left RUNNING otherwise).
    with contextlib.closing(_trackers(run, out_dir)) as writer, run.engine, run.reward_fn, \
            rewards_open(run.validation), bar:
        if run.start:
            run.engine.sync_weights(run.policy)
        for step in bar:
            clock = [time.perf_counter()]
            rollout, verdicts, rewards, sampling_seconds, drawn = collect(run, step)
            clock.append(clock[0] + sampling_seconds)  # draws interleave sampling and judging: time each apart
            advantages = estimate_advantages(run, rewards)
            clock.append(time.perf_counter())
            batch = whole_batch(run, rollout, advantages)
            schedule = mini_batch_schedule(len(batch.advantages), cfg, run.seed, step)
            run.engine.sleep()  # before scoring: its forward passes get the memory the engine held while sampling
            score_logprobs(run, batch, schedule[0])
            correct(run, batch)
            clock.append(time.perf_counter())
            stats = update(run, batch, schedule)
            run.engine.sync_weights(run.policy)
            clock.append(time.perf_counter())
            checks = validation_metrics(run, step + 1)
            row = record(run, step, rollout, verdicts, rewards, advantages, batch, {**stats, **drawn, **checks}, clock,
                         writer)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}", refresh=False)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                checkpoint(run, step + 1)
        # Before the engine closes: an in-process vLLM engine tears the process group down with it.
        return finish(run, out_dir)


def setup(policy_dir: Path, dataset: Path, out_dir: Path, settings: dict, threads: int,
          ranks: Ranks = Ranks(), validation_data: Sequence[Path] = ()) -> Run:
    """Seed, load the policy (and the frozen reference when beta > 0; both sharded over the ranks), the data (and
    the validation problems), the named algorithm parts, the optimiser and the rollout engine; restore the newest
    checkpoint of a run with the same settings."""
    device = ranks.device
    resolved = resolve_train(settings, device.type)
    cfg = resolved.train
    torch.manual_seed(resolved.seed)
    torch.set_num_threads(threads)
    check_ranks(cfg, ranks)

    policy, tokenizer = load_policy(policy_dir, device=device, dtype=cfg.precision.weights_dtype)
    if resolved.lora is not None:  # only the adapters train (and reach the optimiser), the base stays frozen
        add_adapters(policy, resolved.lora, key=resolved.lora_key)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = distributed.shard_model(policy, ranks)
    # The reference is the initial policy, stored as the policy is: under autocast its log-probs equal the policy's
    # until the first update (KL exactly 0), on one rank and on N. Under LoRA it is the policy itself, scored with its
    # adapters disabled (`score_logprobs`): the frozen base, without a second copy.
    reference = None
    if resolved.algorithm.beta > 0:
        reference = policy if resolved.lora is not None else distributed.shard_model(
            load_policy(policy_dir, device=device, dtype=cfg.precision.weights_dtype)[0], ranks
        ).eval().requires_grad_(False)
    problems = read_dataset(dataset, split="train").to_pandas()
    template = get_template(resolved.template, resolved.chat_template_kwargs,
                            add_special_tokens=resolved.add_special_tokens)
    # Overlong prompts leave once, here (as verl's filter at dataset load): the step's prompts stay a pure function
    # of the step, the same on every rank.
    context = resolved.rollout.context(getattr(policy.config, "max_position_embeddings", None))
    limit = length_limit(context, cfg.max_length)
    kept = fitting_prompts(encode_prompts(tokenizer, template, problems["problem"]), limit,
                           resolved.rollout.overlong_prompts, f"the train split of {dataset}",
                           fix="raise rollout.max_model_len or train.max_length")
    overlong_dropped, problems = len(problems) - len(kept), problems.iloc[kept].reset_index(drop=True)
    reward_fn = get_reward(resolved.reward, **{"num_workers": distributed.rank_cpus(), **resolved.reward_params})
    validation = load_benchmarks(cfg.validation, validation_data, tokenizer, limit=limit,
                                 overlong=resolved.rollout.overlong_prompts, num_workers=distributed.rank_cpus())
    optimizer, scheduler = make_rollout_optimizer(trainable_parameters(policy), cfg.optimizer())

    settings_hash = config_hash(settings)
    checkpoints = checkpoints_root(out_dir)
    start, rows, environments = 0, [], []
    if ranks.is_main:  # the run directory's one writer (its lock): what a killed job was writing would stay for good
        for path in (checkpoints / "step_*", final_model_dir(out_dir), metrics_file(out_dir)):
            remove_temporaries(path)
    found = distributed.broadcast_object(latest_checkpoint(checkpoints, settings_hash) if ranks.is_main else None,
                                         ranks)
    if found is not None:
        resumed = load_checkpoint(found, policy=policy, optimizer=optimizer, scheduler=scheduler, ranks=ranks)
        start, rows, environments = resumed.step, resumed.metrics.to_dict("records"), resumed.environments
    environments = [*environments, {"from_step": start, "ranks": ranks.world_size, **environment()}]
    engine = engine_from_settings(resolved.rollout, policy=policy, tokenizer=tokenizer, model_dir=policy_dir,
                                  dtype=resolved.model_dtype)
    return Run(settings=resolved, device=device, policy=policy, reference=reference, tokenizer=tokenizer,
               template=template, problems=problems, overlong_dropped=overlong_dropped, limit=limit,
               reward_fn=reward_fn, validation=validation, optimizer=optimizer, scheduler=scheduler, engine=engine,
               old_from_update=not has_dropout(policy) and resolved.algorithm.correction.name == "none",
               checkpoints=checkpoints, settings_hash=settings_hash,
               ranks=ranks, start=start, rows=rows, environments=environments,
               nonfinite=int(rows[-1]["nonfinite_total"]) if rows else 0)


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward pass in training mode may drop anything (a dropout module or a config's dropout rate above
    0): then the update's forward differs from the sampling policy's, and the old log-probs need their own pass."""
    rates = [value for key, value in model.config.to_dict().items() if ("dropout" in key or "pdrop" in key)
             and isinstance(value, (int, float)) and not isinstance(value, bool)]
    return any(rate > 0 for rate in rates) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def collect(run: Run, step: int) -> tuple[Rollout, list, torch.Tensor, float, dict[str, int]]:
    """This rank's groups of the step with their verdicts and rewards [N, G], the seconds spent sampling, and the
    dynamic-sampling counts (none without it). With the algorithm's dynamic_sampling, draws of prompts_per_step prompts
    are sampled and judged until prompts_per_step groups that vary (`varies`) are in hand over all ranks; the first of
    them in drawing order (draw, then prompt) are the step's batch, so N ranks train on the one-process batch."""
    cfg, dynamic, ranks = run.settings.train, run.settings.algorithm.dynamic_sampling, run.ranks
    draws, seconds, varied = [], 0.0, 0
    for draw in range(dynamic.max_draws if dynamic.enabled else 1):
        start = time.perf_counter()
        rollout = sample(run, step, draw)
        seconds += time.perf_counter() - start
        verdicts, rewards = score_rewards(run, rollout)
        if not dynamic.enabled:
            return rollout, verdicts, rewards, seconds, {}
        varying = varies(verdicts, rewards, dynamic.metric)
        draws.append((rollout, verdicts, rewards, varying))
        varied += int(distributed.global_sum(varying.sum(), ranks).item())
        if varied >= cfg.prompts_per_step:
            break
    else:
        key = f"algorithms.{run.settings.ident['algorithm']}.dynamic_sampling"
        raise RuntimeError(f"step {step + 1}: {varied} of {len(draws) * cfg.prompts_per_step} groups drawn varied "
                           f"in their {dynamic.metric}, fewer than train.prompts_per_step = {cfg.prompts_per_step} "
                           f"after {key}.max_draws = {len(draws)} draws: raise it, or train on problems the policy "
                           "sometimes solves and sometimes not")
    kept = _kept_groups(draws, cfg.prompts_per_step, ranks)
    rollout = Rollout(run.problems.iloc[[g.position for g in kept]], [g.prompt_ids for g in kept],
                      [g.completions for g in kept])
    counts = {"ds_draws": len(draws), "ds_groups_drawn": len(draws) * cfg.prompts_per_step, "ds_groups_varied": varied}
    return rollout, [v for g in kept for v in g.verdicts], torch.stack([g.rewards for g in kept]), seconds, counts


class Group(NamedTuple):
    """One prompt's group as dynamic sampling keeps it (and moves it between ranks)."""

    position: int  # in run.problems
    prompt_ids: list[int]
    completions: list[Completion]
    verdicts: list
    rewards: torch.Tensor  # [G]


def varies(verdicts: list, rewards: torch.Tensor, metric: str) -> torch.Tensor:
    """[N]: whether each group's accuracies (right or wrong, DAPO's recipe) or rewards (after the overlong penalty)
    are not all equal: the groups dynamic sampling keeps."""
    if metric == "accuracy":
        values = torch.tensor([v.correct for v in verdicts], dtype=torch.float64).view_as(rewards)
    elif metric == "reward":
        values = rewards
    else:
        raise ValueError(f"dynamic_sampling.metric: {metric!r} is neither 'accuracy' nor 'reward'")
    return (values != values[:, :1]).any(-1)


def _kept_groups(draws: list[tuple[Rollout, list, torch.Tensor, torch.Tensor]], needed: int, ranks: Ranks
                 ) -> list[Group]:
    """This rank's share of the first `needed` groups that vary over all ranks' draws, in drawing order (draw, then
    prompt, which is rank order within a draw): the groups the one-process run keeps, split evenly."""
    size = draws[0][2].shape[1]
    first = distributed.share(needed, ranks, "train.prompts_per_step").start  # this rank's first prompt of a draw
    mine = [((draw, first + i), Group(int(position), rollout.prompt_ids[i], rollout.completions[i],
                                      verdicts[i * size:(i + 1) * size], rewards[i]))
            for draw, (rollout, verdicts, rewards, varying) in enumerate(draws)
            for i, position in enumerate(rollout.problems.index) if varying[i]]
    everyone = sorted((item for part in distributed.gather_objects(mine, ranks) for item in part),
                      key=lambda item: item[0])
    share = distributed.share(needed, ranks, "train.prompts_per_step")
    return [group for _, group in everyone[:needed]][share.start:share.stop]


def validation_metrics(run: Run, step: int) -> dict[str, float]:
    """train.validation's accuracies of the policy after `step` RL steps when it is due, else none (blank in the
    metrics), sampled as training samples: in eval mode, under the precision policy."""
    cfg = run.settings.train
    if not due(cfg.validation, step, cfg.steps):
        return {}
    run.policy.eval()
    return validate(run.validation, run.engine, cfg.validation, seed=run.seed, precision=cfg.precision)


def sample(run: Run, step: int, draw: int = 0) -> Rollout:
    """This rank's share of the step's prompts (a pure function of the step and the draw: draw 0 is the step's own
    prompts, dynamic sampling's further draws come from streams of their own) and G completions of each from the
    current policy, sampled under the precision policy that scores them (an engine that runs the policy module
    itself, as the hf one does, would otherwise sample from the float32 function while the old log-probs come from
    the bf16-autocast one)."""
    cfg = run.settings.train
    mine = distributed.share(cfg.prompts_per_step, run.ranks, "train.prompts_per_step")
    stream = run.seed if draw == 0 else run.seed + draw * 1_000_000_007
    indices = _step_problems(len(run.problems), step, cfg.prompts_per_step, stream)
    problems = run.problems.iloc[indices[mine.start:mine.stop]]
    prompt_ids = encode_prompts(run.tokenizer, run.template, problems["problem"])
    sampling = SamplingConfig(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_tokens, seed=run.seed * 1_000_003 + step + draw * (1 << 40),
                              positions=tuple(range(mine.start, mine.stop)),
                              budgets=completion_budgets(prompt_ids, cfg.max_tokens, run.limit))
    run.optimizer.zero_grad(set_to_none=True)  # no gradient memory held through generation
    run.policy.eval()
    with cfg.precision.generating(run.engine):
        return Rollout(problems, prompt_ids, run.engine.generate(prompt_ids, sampling))


def score_rewards(run: Run, rollout: Rollout) -> tuple[list, torch.Tensor]:
    """The task reward's verdict on every completion, and the rewards [N, G] (float64), less DAPO's overlong
    penalty when the algorithm's overlong_buffer sets one."""
    cfg, buffer = run.settings.train, run.settings.algorithm.overlong_buffer
    texts = [c.text for completions in rollout.completions for c in completions]
    golds = [g for g in rollout.problems["answer"] for _ in range(cfg.group_size)]
    verdicts = run.reward_fn.judge(texts, golds)
    rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float64).view(-1, cfg.group_size)
    if buffer.length:
        lengths = torch.tensor([[len(c.token_ids) for c in group] for group in rollout.completions])
        rewards = rewards + algorithms.overlong_penalty(lengths, cfg.max_tokens, buffer.length, buffer.penalty)
    return verdicts, rewards


def estimate_advantages(run: Run, rewards: torch.Tensor) -> torch.Tensor:
    """This rank's advantages [n, G], estimated from the whole step's rewards (every rank's groups, in rank order):
    an estimator that looks past a group (GRPO's `scale: batch`) sees what one process would."""
    every = distributed.gather_rows(rewards, run.ranks)
    mine = distributed.share(len(every), run.ranks, "the step's groups")
    return run.settings.algorithm.estimator(every)[mine.start:mine.stop]


def whole_batch(run: Run, rollout: Rollout, advantages: torch.Tensor) -> RolloutBatch:
    """The step's whole rollout batch on every rank, the one-process batch to the bit: each rank builds its rows at
    the widths of the widest over all ranks, and the ranks' rows are gathered in rank order. Any rank can then
    compute any row, so micro-batches and ranks are balanced by length (`batch.rank_rows`)."""
    ranks, cfg = run.ranks, run.settings.train
    prompt_len, completion_len = distributed.global_max(
        max(len(p) for p in rollout.prompt_ids),
        max(len(c.token_ids) for group in rollout.completions for c in group), ranks=ranks)
    batch = build_batch(rollout.prompt_ids, rollout.completions, advantages, run.tokenizer.pad_token_id,
                        untrained_stops=() if cfg.loss_on_eos else stop_token_ids(run.policy, run.tokenizer),
                        prompt_len=prompt_len, completion_len=completion_len).to(run.device)
    return batch.map_tensors(lambda tensor: distributed.gather_rows(tensor, ranks))


def check_ranks(cfg: Train, ranks: Ranks) -> None:
    """Refuse, before any rank loads a model, a batch the ranks cannot share: the prompts of a step split evenly, and
    every rank has rows in every mini-batch (a rank with none would report no loss metrics for the step)."""
    distributed.share(cfg.prompts_per_step, ranks, "train.prompts_per_step")
    rows = cfg.prompts_per_step * cfg.group_size // cfg.mini_batches
    if rows < ranks.world_size:
        raise ValueError(f"a mini-batch holds {rows} completions (train.prompts_per_step x train.group_size / "
                         f"train.mini_batches), fewer than the {ranks.world_size} ranks: a rank would have none")


def mini_batch_schedule(size: int, cfg: Train, seed: int, step: int) -> list[list[torch.Tensor]]:
    """The rows [n] of each mini-batch, per epoch, cut into train.mini_batches parts: of a fresh permutation per
    epoch (`shuffled`; seeded by the step, so a resumed run draws the same) or of the rows in sampling order
    (`contiguous`, as verl)."""
    if cfg.mini_batch_order == "contiguous":
        return [list(torch.arange(size).chunk(cfg.mini_batches)) for _ in range(cfg.ppo_epochs)]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [list(torch.randperm(size, generator=generator).chunk(cfg.mini_batches)) for _ in range(cfg.ppo_epochs)]


def score_logprobs(run: Run, batch: RolloutBatch, minis: list[torch.Tensor]) -> None:
    """Fill the batch's old log-probs (the sampling policy's) and, when beta > 0, the reference model's, over the
    micro-batches of the first epoch's mini-batches `minis`: the first update then runs the very same forward passes,
    so its ratio is exactly 1. With `run.old_from_update` the first mini-batch's old log-probs are left (0) to the
    update's first forward pass (`update_policy(old_from_first=True)`), which computes exactly these numbers: the
    policy has not changed yet. Under the `bypass` rollout correction the engine's log-probs are the old log-probs
    and the policy runs no scoring pass. A LoRA policy is its own reference, scored with its adapters disabled."""
    cfg = run.settings.train
    if run.settings.algorithm.correction.bypass:
        batch.old_logp = batch.engine_logp.clone()
    else:
        batch.old_logp = batch_logprobs(run.policy, batch, minis[1:] if run.old_from_update else minis, cfg,
                                        run.ranks)
    if run.reference is not None:
        with adapters_disabled(run.reference):
            batch.ref_logp = batch_logprobs(run.reference, batch, minis, cfg, run.ranks)
        distributed.reshard(run.reference)


def correct(run: Run, batch: RolloutBatch) -> None:
    """The rollout correction's per-token weights and loss mask (`kalmanrl.rl.correction`) from the old and the
    engine's log-probs of the whole batch (every rank alike); nothing under `none` and `bypass`."""
    correction = run.settings.algorithm.correction
    if correction.weighs:
        sampled = batch.completion_mask.bool()
        bad = sum(int((~torch.isfinite(logp[sampled])).sum()) for logp in (batch.old_logp, batch.engine_logp))
        if bad:  # a mask would drop such tokens silently, a weight would carry NaN into the loss
            raise NonFiniteLossError(f"{bad} non-finite old or engine log-probs of sampled tokens: the policy or the "
                                     f"rollout engine diverged; correction {correction.name!r} cannot weigh them")
        batch.weights, batch.loss_mask = correction.apply(batch.old_logp, batch.engine_logp, batch.completion_mask)


def mismatch(run: Run, batch: RolloutBatch) -> dict[str, float]:
    """The step's train/inference mismatch over the whole batch's completion tokens (`kalmanrl.rl.correction`), from
    the old log-probs the update has completed; none under `bypass`, where the old log-probs are the engine's."""
    if run.settings.algorithm.correction.bypass:
        return {}
    return mismatch_metrics(batch.old_logp, batch.engine_logp, batch.completion_mask)


def batch_logprobs(model, batch: RolloutBatch, minis: list[torch.Tensor], cfg: Train,
                   ranks: Ranks = Ranks()) -> torch.Tensor:
    """Log-probs [B, T] of the rows of `minis` without gradient, micro-batch by micro-batch (0 on padding). With N
    ranks each computes its share of every mini-batch (`rank_rows`) and the shares are summed into every rank's."""
    out = torch.zeros_like(batch.completion_mask)
    with torch.no_grad():
        for mini in minis:
            rows = rank_rows(batch, mini.to(out.device), ranks.world_size, ranks.rank)
            for micro, real in distributed.in_step(micro_batches(batch, rows, cfg.micro_batch_tokens,
                                                                 packed=cfg.packing), ranks,
                                                   stand_in=torch.zeros(1, dtype=torch.long, device=out.device)):
                part = batch.select(micro).trimmed()
                with cfg.precision.autocast():
                    logp = token_logprobs(model, part, chunk_tokens=cfg.logit_chunk_tokens, packed=cfg.packing)
                if real:
                    out[micro, :part.completion_mask.shape[1]] = logp
    return distributed.summed(out, ranks)


def update(run: Run, batch: RolloutBatch, schedule: list[list[torch.Tensor]]) -> dict[str, float]:
    """The optimiser steps of one rollout batch at this batch's learning rate, then the schedule's step; counts
    skipped updates (a non-finite loss or gradient) and aborts past the limit. With `run.old_from_update` the first
    mini-batch's forward provides its old log-probs (see `update_policy`)."""
    run.policy.train()
    lr = run.scheduler.get_last_lr()[0]
    stats, skipped = update_policy(run.policy, run.optimizer, batch, schedule, run.settings, run.ranks,
                                   old_from_first=run.old_from_update)
    run.scheduler.step()
    run.nonfinite += skipped
    limit = run.settings.train.max_nonfinite
    if run.nonfinite > limit:
        raise NonFiniteLossError(f"{run.nonfinite} non-finite losses or gradients (train.max_nonfinite = {limit}); "
                                 "lower train.lr or check the reward scale")
    return {"lr": lr, "nonfinite_skipped": skipped, "nonfinite_total": run.nonfinite, **stats}


def record(run: Run, step: int, rollout: Rollout, verdicts: list, rewards: torch.Tensor,
           advantages: torch.Tensor, batch: RolloutBatch, stats: dict[str, float], clock: list[float],
           writer: Trackers) -> dict:
    """Append this step's metrics row (rewards, advantages, lengths, reward limit hits, phase timings, update
    statistics) for the whole step: per-completion values are gathered from all ranks, update statistics reduced over
    them (timings and throughputs are rank 0's)."""
    t0, t_rollout, t_reward, t_score, t_end = clock
    ranks = run.ranks
    completions = [c for group in rollout.completions for c in group]
    rewards, advantages = distributed.gather_rows(rewards, ranks), distributed.gather_rows(advantages, ranks)
    per_completion = distributed.gather_rows(torch.tensor(
        [[len(c.token_ids), c.finish_reason == "length", v.correct]
         for c, v in zip(completions, verdicts, strict=True)],
        dtype=torch.float), ranks)
    lengths, truncated, correct = per_completion.T
    row = {**run.settings.ident, "step": step + 1, "wall_time": t_end - t0,
           "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
           "accuracy": correct.mean().item(),
           "advantage_mean": advantages.mean().item(), "advantage_std": advantages.std().item(),
           "advantage_abs_max": advantages.abs().max().item(),
           "response_length": lengths.mean().item(),
           "truncation_rate": truncated.mean().item(), "overlong_prompts_dropped": run.overlong_dropped,
           "limit_hits": int(distributed.global_sum(limit_hits(verdicts), ranks).item()),  # scored 0, not judged
           "rollout_tokens_per_s": lengths.sum().item() / (t_rollout - t0),
           "train_tokens_per_s": run.settings.train.ppo_epochs
           * batch.attention_mask.sum().item() / (t_end - t_score),
           "time_rollout": t_rollout - t0, "time_reward": t_reward - t_rollout,
           "time_score": t_score - t_reward, "time_update": t_end - t_score,
           **mismatch(run, batch), **distributed.reduce_metrics(stats, ranks)}
    run.rows.append(row)
    writer.log({key: value for key, value in row.items() if isinstance(value, float)}, step + 1)
    return row


def checkpoint(run: Run, step: int) -> None:
    """Resumable state after `step` rollout batches."""
    save_checkpoint(run.checkpoints, step, policy=run.policy, tokenizer=run.tokenizer, optimizer=run.optimizer,
                    scheduler=run.scheduler, metrics=pd.DataFrame(run.rows), settings_hash=run.settings_hash,
                    dtype=run.settings.model_dtype, keep_every=run.settings.train.keep_every,
                    environments=run.environments,
                    ranks=run.ranks)


def finish(run: Run, out_dir: Path) -> pd.DataFrame:
    """Write the final policy (a plain save_pretrained directory, also from a sharded model) with its provenance and
    the metrics table (rank 0). `final/provenance.json` lists the environment (versions, lock, machine, commit) of
    every start and resume of the run with the step it started from: a run resumed elsewhere says so."""
    metrics = pd.DataFrame(run.rows)
    with distributed.shared_atomic_dir(final_model_dir(out_dir), run.ranks) as tmp:
        write_full_model(run.policy, run.tokenizer, tmp, run.ranks, dtype=run.settings.model_dtype)
        if run.ranks.is_main:
            provenance = {"settings_hash": run.settings_hash, "environments": run.environments}
            (tmp / TRAINING_PROVENANCE).write_text(json.dumps(provenance, indent=1))
    if run.ranks.is_main:
        write_parquet(metrics, metrics_file(out_dir))
    return metrics


def update_policy(policy, optimizer, batch: RolloutBatch, schedule: list[list[torch.Tensor]],
                  settings: TrainSettings, ranks: Ranks = Ranks(), *,
                  old_from_first: bool = False) -> tuple[dict[str, float], int]:
    """One optimiser step per mini-batch of `schedule` (ppo_epochs x mini_batches) over one rollout batch; returns
    step metrics and skipped updates. `batch` is the whole batch (every rank's rows: `whole_batch`), and with N ranks
    each computes its share of every mini-batch. `old_from_first`: the policy is the sampling policy (no dropout)
    and the first mini-batch's old log-probs are not yet in `batch`: its forward pass provides them
    (`mini_batch_backward`)."""
    sums: dict[str, list[float]] = defaultdict(list)
    skipped = 0
    for epoch, minis in enumerate(schedule):
        for position, mini in enumerate(minis):
            optimizer.zero_grad(set_to_none=True)
            first = old_from_first and epoch == position == 0
            mini = mini.to(batch.input_ids.device)
            losses = mini_batch_backward(policy, batch, mini, settings, sums, ranks=ranks, old_from_forward=first)
            if first:  # each rank wrote the old log-probs of its own rows of the mini-batch (0 in the others')
                batch.old_logp[mini] = distributed.summed(batch.old_logp[mini], ranks)
            # A finite loss can still have a non-finite gradient (a bf16 overflow in the backward pass): both skip.
            norm = distributed.clip_grad_norm(policy, settings.train.max_grad_norm) \
                if distributed.all_finite(losses, ranks) else math.nan
            if not math.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            sums["grad_norm"].append(norm)
            sums["loss"].append(distributed.global_sum(sum(x.item() for x in losses), ranks).item())
            optimizer.step()
    return _summarise(sums), skipped


def mini_batch_backward(policy, batch: RolloutBatch, mini: torch.Tensor, settings: TrainSettings,
                        sums: dict[str, list[float]], *, ranks: Ranks = Ranks(),
                        old_from_forward: bool = False) -> list[torch.Tensor]:
    """Accumulate the gradient of the loss of the rows `mini` into the policy, micro-batch by micro-batch (at most
    train.micro_batch_tokens tokens per forward); returns the weighted micro-batch losses (their sum is the
    mini-batch's loss) and appends the loss metrics to `sums`. With N ranks this rank computes its share of `mini`
    (`rank_rows`): weights use the whole mini-batch's rows and tokens, so the ranks' summed gradients are the
    one-process gradient. With `old_from_forward` the policy is still the sampling policy: each
    micro-batch's log-probs, detached, are its old log-probs (the very numbers `batch_logprobs` would compute over
    the same micro-batch) and are written into `batch.old_logp` for later epochs; this saves that forward pass.
    A rollout correction's weights and mask (`correct`) weight the surrogate and decide which tokens the loss and its
    aggregate count; the ratio transform and the diagnostics see every sampled token."""
    cfg, alg = settings.train, settings.algorithm
    trained_mask = batch.loss_tokens()[mini]
    active = int(trained_mask.sum())
    shares = algorithms.MiniBatch(rows=len(mini), trained_rows=int((trained_mask.sum(-1) > 0).sum()), tokens=active)
    losses = []
    stand_in = torch.zeros(1, dtype=torch.long, device=mini.device)
    mine = rank_rows(batch, mini, ranks.world_size, ranks.rank)
    for micro, real in distributed.in_step(micro_batches(batch, mine, cfg.micro_batch_tokens, packed=cfg.packing),
                                           ranks, stand_in=stand_in):
        part = batch.select(micro).trimmed()
        with cfg.precision.autocast():
            logp, entropy = token_logprobs(policy, part, with_entropy=True, chunk_tokens=cfg.logit_chunk_tokens,
                                           packed=cfg.packing)
        if old_from_forward:
            part.old_logp = logp.detach()
            if real:
                batch.old_logp[micro, :logp.shape[1]] = part.old_logp
        rho = alg.ratio_transform(logp, part.old_logp, part.completion_mask)
        trained = part.loss_tokens()
        loss, metrics = algorithms.policy_loss(
            rho, part.advantages.unsqueeze(-1).expand_as(logp), trained,
            eps_low=alg.eps_low, eps_high=alg.eps_high, clip=alg.clip, beta=alg.beta, logp=logp,
            ref_logp=part.ref_logp, aggregate=alg.aggregate, num_active_tokens=active,
            max_length=cfg.max_tokens, surrogate=alg.surrogate, clip_ratio_c=alg.clip_ratio_c, weights=part.weights)
        if not real:  # keeps this rank's gathers and reductions in step with the others; adds nothing
            (logp.sum() * 0.0).backward()
            continue
        loss = loss * alg.aggregation.share(trained, shares)
        loss.backward()
        losses.append(loss.detach())
        _record(sums, metrics, logp.detach() - part.old_logp, entropy, part.completion_mask, alg.noise_filter)
    return losses


def _record(sums, metrics: dict, z: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
            noise_filter: Mapping[str, float | str]) -> None:
    for key, value in metrics.items():
        sums[key].append(float(value))
    sums["entropy"].append(((entropy * mask).sum() / mask.sum().clamp(min=1)).item())
    filtered = algorithms.filtered_log_ratio(z, mask, **noise_filter)
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


def _trackers(run: Run, out_dir: Path) -> Trackers:
    """Rank 0's experiment trackers (train.loggers; none on other ranks), started with the resolved settings and this
    start's environment; a resumed run logs on from its checkpoint's step."""
    ident = run.settings.ident
    return start_trackers(run.settings.train.loggers if run.ranks.is_main else [], out_dir,
                          run_name=fill(RUN, **{k: ident[k] for k in fields(RUN)}), settings=as_dict(run.settings),
                          provenance=run.environments[-1], start_step=run.start)
