"""Reinforcement learning with verifiable rewards (GRPO) for a Qwen vision-language model: the whole loop, in one file.

For every prompt the model samples a group of answers; reward functions (programs: an exact match, a
number, a format) score them against the prompt's reference answer; each answer's advantage is its reward
measured against its group's; and PPO's clipped objective moves the model towards its better answers.
Read grpo() top to bottom: config -> data (prompts, checked) -> rewards -> model -> optimizer -> resume
-> loop -> save. The step is in the loop, with rollouts() and policy_backward() just above it. train() runs
it with the output folder locked and signals handled (qwen_ft/run.py), as finetune.py's train() does.

    python finetune_grpo.py --model output-sft --data train_data/data.json --reward exact --output-dir output-grpo
    torchrun --nproc-per-node 4 finetune_grpo.py [flags]     # DDP; --fsdp shards a full fine-tuning
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qwen_ft import grounding
from qwen_ft.checkpoint import (
    save_checkpoint,
)
from qwen_ft.collate import Collator
from qwen_ft.config import Config, ConfigError, option, parse_config
from qwen_ft.data.checked import checked_samples
from qwen_ft.dist import Dist
from qwen_ft.generate import generate_answers
from qwen_ft.model import load_processor
from qwen_ft.packing import real_tokens
from qwen_ft.rewards import RewardError, measures_boxes, parse_rewards, score
from qwen_ft.rollout import PromptCollator, check_prompts, prompt_and_reference, sample_completions, with_completions
from qwen_ft.run import guarded_run
from qwen_ft.stop import StopSignal, out_of_memory
from qwen_ft.training import (
    RunLog,
    after_step,
    autocast_of,
    batch_plan,
    compute_dtype,
    data_workers,
    frozen_copy,
    micro_batches,
    next_window,
    optimizer_and_schedule,
    restore,
    resume_point,
    run_alone_or_under_torchrun,
    save_final,
    seed_everything,
    trainable_model,
)

LOSS_TYPES = ("grpo", "dr-grpo", "dapo")


@dataclass
class GRPOConfig(Config):
    lr: float = option(1e-6, "peak learning rate of the LLM and of LoRA adapters; warm-up, then cosine decay to 0")
    lora_dropout: float = option(
        0.0, "dropout on the adapters' input (off by default: dropout makes the probability ratio noisy)"
    )
    num_generations: int = option(8, "answers sampled per prompt: a group, whose rewards set each one's advantage")
    max_new_tokens: int = option(256, "longest sampled answer in tokens (answers cut there are scored as they are)")
    temperature: float = option(1.0, "sampling temperature (the log-probabilities trained are of the same policy)")
    top_p: float = option(1.0, "sample from the most likely tokens that together hold this probability (1: all)")
    reward: str = option(
        "exact",
        "comma list of NAME[:WEIGHT]: exact, contains, numeric, format, iou (boxes), or a function of your own as "
        "path/to/file.py:function or package.module:function; an answer's reward is the weighted sum",
    )
    format_regex: str | None = option(None, "the regular expression a whole answer must match for --reward format")
    numeric_tolerance: float = option(0.01, "relative tolerance of --reward numeric")
    beta: float = option(0.0, "weight of the KL penalty to the model as loaded (0: none, and no reference pass)")
    epsilon: float = option(0.2, "the probability ratio is clipped to [1 - epsilon, 1 + epsilon-high]")
    epsilon_high: float | None = option(None, "upper clip range (default: --epsilon; DAPO uses 0.28)")
    num_iterations: int = option(1, "optimizer steps on each batch of rollouts (DeepSeekMath's mu)")
    scale_rewards: str = option(
        "group",
        "divide advantages by the std of the rewards of the group, of the whole batch, or not at all (Dr. GRPO)",
        choices=("group", "batch", "none"),
    )
    loss_type: str = option(
        "dapo",
        "how token losses are averaged: grpo (per answer, then over answers), dr-grpo (summed, over answers x "
        "--max-new-tokens), dapo (over the step's answer tokens)",
        choices=LOSS_TYPES,
    )
    log_rollouts: int = option(
        0, "write a few prompts with their answers, rewards and advantages every this many steps (0: at checkpoints)"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.num_generations < 2:
            raise ValueError("--num-generations must be at least 2: an advantage compares answers to one prompt")
        if self.max_new_tokens < 1 or self.num_iterations < 1 or self.log_rollouts < 0:
            raise ValueError("--max-new-tokens and --num-iterations must be at least 1, --log-rollouts not negative")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be positive and --top-p in (0, 1]")
        if self.beta < 0 or self.epsilon < 0 or self.epsilon_high < 0:
            raise ValueError("--beta, --epsilon and --epsilon-high must not be negative")
        if self.save_every % self.num_iterations:
            raise ValueError(
                f"--save-every {self.save_every} is not a multiple of --num-iterations {self.num_iterations}: "
                "checkpoints are taken between batches of rollouts"
            )
        if self.max_tokens or self.packing:
            raise ValueError("--max-tokens and --packing shape SFT batches; GRPO's are --batch-size prompts")
        if self.save_best:
            raise ValueError("--save-best keeps the lowest eval loss, which GRPO doesn't compute")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str, step_rewards: torch.Tensor):
    """Each answer's advantage: its reward minus the mean reward of its group (the answers to the same prompt),
    divided by the std of the group's rewards ("group": DeepSeekMath, Shao et al. 2024, §4.1.2, the advantage of
    every token of answer i is (r_i - mean(r)) / std(r)), by the std of every reward of the step on all ranks
    (step_rewards; "batch"), or by nothing ("none": Dr. GRPO, Liu et al. 2025, §3.1, as the std gives
    questions that are too easy or too hard more weight). rewards: (answers,), groups one after another."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred.flatten()
    std = groups.std(dim=1, keepdim=True) if scale_rewards == "group" else step_rewards.std()
    return (centred / (std + 1e-4)).flatten()  # 1e-4: a group whose answers all scored the same gets 0


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int = 1024):
    """log π(target) under softmax(logits / temperature), in fp32, `chunk` tokens at a time; each chunk's fp32
    logits are recomputed in backward rather than kept (as finetune.py's cross_entropy_sum does)."""

    def chunk_logps(chunk_logits, chunk_targets):
        return -F.cross_entropy(chunk_logits.float() / temperature, chunk_targets, reduction="none")

    pieces = zip(logits.split(chunk), targets.split(chunk))
    return torch.cat([checkpoint(chunk_logps, piece, target, use_reentrant=False) for piece, target in pieces])


def completion_logps(model, batch: dict, mask: torch.Tensor, temperature: float, autocast) -> torch.Tensor:
    """log π(token | prompt, the answer before it) of every answer token: (rows, answer length), 0 after the end.
    batch: prompts followed by answers (with_completions); mask: which answer positions hold the answer."""
    # Position t predicts token t + 1: the answer's tokens are predicted from the positions just before them,
    # and the output head runs on those alone (logits of (answer tokens, vocab)).
    predicting = F.pad(mask, (batch["input_ids"].shape[1] - mask.shape[1] - 1, 1), value=False)
    with autocast():
        logits = model(**batch, logits_to_keep=predicting, use_cache=False).logits
    answers = batch["input_ids"][:, -mask.shape[1] :]
    logps = torch.zeros(mask.shape, device=logits.device)
    logps[mask] = token_logps(logits, answers[mask], temperature)
    return logps


def rollouts(model, reference, window: list[dict], collator, rewards, cfg: GRPOConfig, dist: Dist, autocast, step: int):
    """Sample a group of answers to each prompt of the step's micro-batches, score them, and compute their
    advantages; with --num-iterations > 1 the log-probs of the policy that sampled them, with --beta those of the
    reference. Adds these to each micro-batch of `window`; returns the seconds spent generating."""
    model.eval()  # no dropout while sampling and scoring the old policy
    tokenizer = collator.processor.tokenizer
    generation_s = 0.0
    for i, rollout in enumerate(window):
        prompt = {key: value.to(dist.device) for key, value in rollout["prompt"].items()}
        began = time.perf_counter()
        with autocast():
            # Seeded by the step, rank and micro-batch alone: a resumed run samples the same answers.
            completion, mask = sample_completions(
                dist.unwrap(model), prompt, collator, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                seed=hash((cfg.seed, step, dist.rank, i)) % 2**63, synced_gpus=dist.fsdp,
            )  # fmt: skip
        generation_s += time.perf_counter() - began
        texts = tokenizer.batch_decode(completion.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True)
        scores = torch.tensor(score(rewards, texts, rollout["references"], rollout["samples"]), device=dist.device)
        weights = torch.tensor([reward.weight for reward in rewards], device=dist.device)
        rollout.update(batch=with_completions(prompt, completion, mask), mask=mask, texts=texts, scores=scores)
        rollout["reward"] = weights @ scores  # (answers,): the weighted sum of each answer's rewards
    # Groups never straddle ranks; a "batch" std is over every reward of the step, on every rank.
    local = torch.cat([rollout["reward"] for rollout in window])
    step_rewards = torch.cat([r.to(dist.device) for r in dist.all_gather_objects(local.cpu())])
    advantages = group_advantages(local, cfg.num_generations, cfg.scale_rewards, step_rewards)
    for rollout, rollout_advantages in zip(window, advantages.split([len(r["reward"]) for r in window])):
        rollout["advantages"] = rollout_advantages
    with torch.no_grad():
        for rollout in window:
            old = cfg.num_iterations > 1  # else the policy that sampled is the one trained: the ratio is 1
            rollout["old_logps"] = (
                completion_logps(model, rollout["batch"], rollout["mask"], cfg.temperature, autocast) if old else None
            )
            rollout["ref_logps"] = reference_logps(model, reference, rollout, cfg, dist, autocast) if cfg.beta else None
    model.train()
    return generation_s


def reference_logps(model, reference, rollout: dict, cfg: GRPOConfig, dist: Dist, autocast) -> torch.Tensor:
    """The answers' log-probs under the model as loaded: the frozen copy, or with LoRA the model with its
    adapters (and the copies of the parts they train in full) switched off."""
    if reference is not None:
        return completion_logps(reference, rollout["batch"], rollout["mask"], cfg.temperature, autocast)
    with dist.unwrap(model).disable_adapter():
        return completion_logps(model, rollout["batch"], rollout["mask"], cfg.temperature, autocast)


def policy_backward(model, window: list[dict], cfg: GRPOConfig, dist: Dist, autocast) -> dict:
    """Forward and backward of GRPO's objective over the step's rollouts; returns the loss, clip fraction and KL.

    Per answer token: -min(ρ·A, clip(ρ, 1 - ε, 1 + ε_high)·A) + β·KL, with ρ = π/π_old the probability ratio and
    KL = π_ref/π - log(π_ref/π) - 1, DeepSeekMath's unbiased estimator (Shao et al. 2024, eqs. 3 and 4; the
    separate ε_high is DAPO's Clip-Higher, Yu et al. 2025, §3.1). Averaged per --loss-type over the whole window
    on all ranks: grpo, each answer's mean, then the mean over answers (eq. 3); dr-grpo, the sum over answers x
    --max-new-tokens (Dr. GRPO, Liu et al. 2025, which drops the 1/|o_i| that favours short right answers and
    long wrong ones); dapo, the mean over every answer token (DAPO's token-level loss, §3.3).
    """
    masks = [rollout["mask"] for rollout in window]
    counts = torch.tensor([sum(len(m) for m in masks), sum(m.sum() for m in masks)], device=dist.device)
    answers, tokens = dist.all_reduce_sum(counts.float())
    normaliser = {"grpo": answers, "dr-grpo": answers * cfg.max_new_tokens, "dapo": tokens}[cfg.loss_type]
    totals = torch.zeros(3, device=dist.device)  # loss, clipped tokens, KL summed over tokens
    for i, rollout in enumerate(window):
        mask, advantages = rollout["mask"], rollout["advantages"].unsqueeze(1)
        with dist.no_sync(model, sync=i == len(window) - 1):
            logps = completion_logps(model, rollout["batch"], mask, cfg.temperature, autocast)
            old_logps = rollout["old_logps"] if rollout["old_logps"] is not None else logps.detach()
            ratio = torch.exp(logps - old_logps)
            clipped_ratio = ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_high)
            token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
            kl = torch.zeros_like(logps)
            if cfg.beta:
                log_ref_ratio = rollout["ref_logps"] - logps
                kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
                token_loss = token_loss + cfg.beta * kl
            token_loss = token_loss * mask
            if cfg.loss_type == "grpo":
                loss = (token_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
            else:
                loss = token_loss.sum()
            # DDP and FSDP average gradients over ranks; the loss is a share of the window's: undo the average.
            (loss * dist.world_size / normaliser).backward()
        # The tokens where the clip takes the gradient away: the ratio left the range on the side A pushes it.
        clipped = ((ratio < 1 - cfg.epsilon) & (advantages < 0)) | ((ratio > 1 + cfg.epsilon_high) & (advantages > 0))
        totals += torch.stack([loss.detach(), (clipped & mask).sum(), (kl.detach() * mask).sum()])
    loss_sum, clipped_tokens, kl_sum = dist.all_reduce_sum(totals).tolist()
    return {
        "loss": loss_sum / normaliser.item(),
        "clip_fraction": clipped_tokens / tokens.item(),
        "kl": kl_sum / tokens.item(),
    }


def rollout_metrics(window: list[dict], rewards, cfg: GRPOConfig, dist: Dist) -> dict:
    """What the step's rollouts scored, over all ranks: rewards, their spread, and the answers' lengths."""
    local = {
        "reward": torch.cat([r["reward"] for r in window]).tolist(),
        "scores": torch.cat([r["scores"] for r in window], dim=1).tolist(),
        "lengths": torch.cat([r["mask"].sum(dim=1) for r in window]).tolist(),
        "tokens": sum(real_tokens(r["batch"]) for r in window),  # prompts and answers, without padding
    }
    gathered = dist.all_gather_objects(local)
    reward = torch.tensor([value for rank in gathered for value in rank["reward"]])
    groups = reward.view(-1, cfg.num_generations)
    lengths = [length for rank in gathered for length in rank["lengths"]]
    record = {"reward": reward.mean().item(), "reward_std": reward.std().item()}
    for k, function in enumerate(rewards):
        values = [value for rank in gathered for value in rank["scores"][k]]
        record[f"reward_{function.name}"] = sum(values) / len(values)
    # A group whose answers all scored the same has advantages of 0: it teaches nothing.
    record["zero_std_groups"] = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()
    record["completion_length"] = sum(lengths) / len(lengths)
    record["completion_length_max"] = max(lengths)
    record["tokens"] = sum(rank["tokens"] for rank in gathered)
    record["trained_tokens"] = sum(lengths)
    return record


def write_rollouts(path: Path, window: list[dict], rewards, cfg: GRPOConfig, groups: int = 4) -> None:
    """The first groups of this rank's rollouts, a line each: the prompt's sample, its question and reference,
    and every answer with its rewards and advantage."""
    lines = []
    for rollout in window:
        for first in range(0, len(rollout["texts"]), cfg.num_generations):
            rows = range(first, first + cfg.num_generations)
            sample = rollout["samples"][first]
            answers = [
                {
                    "answer": rollout["texts"][row],
                    "reward": rollout["reward"][row].item(),
                    **{f"reward_{r.name}": rollout["scores"][k, row].item() for k, r in enumerate(rewards)},
                    "advantage": rollout["advantages"][row].item(),
                }
                for row in rows
            ]
            question = " ".join(p["text"] for p in sample.messages[-2]["content"] if p["type"] == "text")
            reference = rollout["references"][first]
            lines.append({"sample": sample.where, "question": question, "reference": reference, "answers": answers})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:groups]))


@torch.no_grad()
def evaluate(model, samples, collator: Collator, rewards, cfg: GRPOConfig, dist: Dist, autocast, step: int, out: Path):
    """Greedy answers to the eval samples (the first --eval-generate of them, or all), scored by the run's reward
    functions: {"step", "eval_reward", "eval_reward_<name>"}; the answers go to OUTPUT_DIR/eval/step-NNNNNNNN.jsonl.
    Every rank answers the same samples (under FSDP each forward is a collective); rank 0 writes."""
    model.eval()
    samples = samples[: cfg.eval_generate] if cfg.eval_generate else samples
    results, totals = [], torch.zeros(len(rewards))
    weights = torch.tensor([reward.weight for reward in rewards])
    for start in range(0, len(samples), cfg.batch_size):
        chunk = list(samples[start : start + cfg.batch_size])
        prompts, references = zip(*(prompt_and_reference(sample, collator) for sample in chunk))
        with autocast():
            answers = generate_answers(dist.unwrap(model), collator, list(prompts), cfg.max_new_tokens)
        scores = torch.tensor(score(rewards, answers, list(references), chunk))  # (functions, answers)
        totals += scores.sum(dim=1)
        for j, sample in enumerate(chunk):
            scored = {f"reward_{r.name}": scores[k, j].item() for k, r in enumerate(rewards)}
            results.append(
                {
                    "index": sample.index,
                    "prediction": answers[j],
                    "reference": references[j],
                    "reward": (weights @ scores[:, j]).item(),
                    **scored,
                }
            )
    means = totals / len(samples)
    record = {"step": step, "eval_reward": (weights @ means).item()}
    record.update({f"eval_reward_{r.name}": means[k].item() for k, r in enumerate(rewards)})
    if dist.is_main:
        (out / "eval").mkdir(parents=True, exist_ok=True)
        (out / "eval" / f"step-{step:08d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    model.train()
    return record


def train(cfg: GRPOConfig, dist: Dist):
    """GRPO as cfg says (in each process of a torchrun job): grpo below, with the output folder locked against a
    second run, and signals, a peer's death and a full disk stopping it cleanly."""
    with guarded_run(cfg.output_dir, dist) as stop:
        return grpo(cfg, dist, stop)


def grpo(cfg: GRPOConfig, dist: Dist, stop: StopSignal):
    out = Path(cfg.output_dir)
    resume_from = resume_point(cfg, dist)  # checked before anything loads
    seed_everything(cfg.seed)

    # Data: prompts and reference answers from SFT samples, checked before the model loads; the rewards too.
    processor = load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels, cfg.video_max_pixels, cfg.trust_remote_code)
    dist.print(json.dumps(dataclasses.asdict(cfg), indent=1))
    collator = Collator(processor, cfg.max_length, cfg.video(), blank_image=dist.world_size > 1)
    samples = checked_samples(cfg.data, cfg, collator, dist)
    check_prompts(samples)
    eval_samples = checked_samples(cfg.eval_data, cfg, collator, dist) if cfg.eval_data else None
    if eval_samples:
        check_prompts(eval_samples)
    rewards = parse_rewards(cfg.reward, cfg.format_regex, cfg.numeric_tolerance, collator)
    if measures_boxes(rewards) and not len(grounding.with_grounding(samples)):
        raise ConfigError(f"--reward iou: no sample of {cfg.data} has a box in its answer to measure answers against")

    # Model: finetune.py's, with its freezing or LoRA and precision. The reference, for the KL term alone: with
    # LoRA the model itself, adapters off; else a frozen copy.
    model = trainable_model(cfg, dist)
    reference = frozen_copy(cfg, dist) if cfg.beta and not cfg.lora else None
    model = dist.wrap(model, compute_dtype(cfg))  # DDP or FSDP in a distributed run; as it is in one process
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Optimizer and schedule: each batch of rollouts serves --num-iterations optimizer steps.
    plan = batch_plan(samples.lengths.tolist(), cfg, dist)
    optimizer, scheduler, total_steps = optimizer_and_schedule(model, plan, cfg, dist, cfg.num_iterations)

    # Resume. Checkpoints fall between batches of rollouts, so the data position is the rollouts taken times
    # grad_accum. Each prompt of a micro-batch becomes --num-generations rows.
    start_step, counters, best = restore(resume_from, model, optimizer, scheduler, cfg, dist)
    prompt_collator = PromptCollator(collator, cfg.num_generations)
    prompts = micro_batches(
        samples, plan, prompt_collator, cfg, start=start_step // cfg.num_iterations * cfg.grad_accum
    )

    # Loop: `step` counts optimizer steps; new rollouts every --num-iterations of them.
    autocast = autocast_of(cfg, dist)
    checkpoint = partial(save_checkpoint, out, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist,
                         cfg=cfg, counters=counters, processor=processor)  # fmt: skip

    def save(step: int, best: dict) -> Path:  # a checkpoint, and what the model answered just before it
        if dist.is_main and not cfg.log_rollouts:
            write_rollouts(out / "rollouts" / f"step-{step:08d}.jsonl", window, rewards, cfg)
        return checkpoint(step, best=best)

    evaluation = partial(evaluate, model, eval_samples, collator, rewards, cfg, dist, autocast, out=out)
    epoch_batches, step = len(plan.epoch(0)), start_step
    with RunLog(cfg, dist, model, total_steps, start_step, bool(resume_from), counters, "grpo") as run, \
            data_workers(prompts):  # fmt: skip
        try:
            if eval_samples and not resume_from:  # the baseline: step 0 is the model as loaded
                run.log(evaluation(0))
            model.train()
            # From here on SIGTERM or SIGINT lets the rollouts' last iteration finish, saves a checkpoint and
            # returns; a second one stops at once.
            stop.begin("stopping after this step, with a checkpoint" if cfg.num_iterations == 1 else
                       "stopping after the last step on these rollouts, with a checkpoint")  # fmt: skip
            for step in range(start_step + 1, total_steps + 1):
                generation_s = 0.0
                if (step - 1) % cfg.num_iterations == 0:  # new rollouts; the next num_iterations - 1 steps reuse them
                    window, _ = next_window(prompts, cfg)
                    generation_s = rollouts(model, reference, window, collator, rewards, cfg, dist, autocast, step)
                    scored = rollout_metrics(window, rewards, cfg, dist)
                train_began = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                objective = policy_backward(model, window, cfg, dist, autocast)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                finite = torch.isfinite(grad_norm).item()  # not finite (on every rank alike): no update
                if finite:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                run.counters["bad_steps"] += not finite
                run.counters["elapsed_s"] = run.elapsed()
                generated = sum(r["mask"].sum().item() for r in window) if generation_s else 0  # this rank's
                train_s = time.perf_counter() - train_began
                record = {
                    "step": step,
                    "epoch": round(math.ceil(step / cfg.num_iterations) * cfg.grad_accum / epoch_batches, 4),
                    "loss": objective["loss"],
                    **scored,
                    "clip_fraction": objective["clip_fraction"],
                    **({"kl": objective["kl"]} if cfg.beta else {}),
                    "generation_s": round(generation_s, 3),
                    "train_s": round(train_s, 3),
                    "generation_tokens_per_s": round(generated / generation_s, 1) if generation_s else None,
                    "tokens_per_s": round(scored["tokens"] / (generation_s + train_s), 1),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "peak_memory_gib": dist.peak_memory_gib(),
                    "skipped_step": not finite,
                    **run.counters,
                }
                run.log(record, reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.4f}")
                if dist.is_main and cfg.log_rollouts and step % cfg.log_rollouts == 0:
                    write_rollouts(out / "rollouts" / f"step-{step:08d}.jsonl", window, rewards, cfg)
                # A checkpoint falls between batches of rollouts: a signal waits for the rollouts' last iteration.
                boundary = step % cfg.num_iterations == 0
                best, stopping = after_step(step, finite, model, evaluation, best, save, stop, run, cfg, dist, boundary)
                if stopping:
                    return model
        except torch.OutOfMemoryError:
            raise out_of_memory(step) from None

    save_final(out, step, model, processor, stop, cfg, best, dist)
    return model


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0], config=GRPOConfig)
    # A reward function's failure is met on one rank's answers: that rank says it.
    run_alone_or_under_torchrun(train, cfg, "finetune_grpo.py", own_errors=(RewardError,))


if __name__ == "__main__":
    main()
