"""Preference fine-tuning (DPO) of a Qwen vision-language model on chosen and rejected answers, in one file.

Read train() top to bottom: config -> seed -> pairs (checked before the model loads) -> model ->
freezing or LoRA -> reference model -> optimizer and schedule -> resume -> loop -> save. The step is
the loop with forward_backward and dpo_loss just above it. One process, or one per GPU under torchrun
(the same file: distributed differs only in setup):

    python finetune_dpo.py --model output --data train_data/pairs.json --output-dir output-dpo
    torchrun --nproc-per-node 4 finetune_dpo.py --model output --data pairs.json --lora
"""

import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from qwen_ft.checkpoint import save_checkpoint
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import Config, option, parse_config
from qwen_ft.data.index import files_of, index_folder, index_settings
from qwen_ft.data.pairs import PairCollator, Pairs, check_pair_budget, checked_pairs
from qwen_ft.data.samples import Source
from qwen_ft.dist import Dist
from qwen_ft.model import load_processor
from qwen_ft.run import guarded_run
from qwen_ft.stop import StopSignal, out_of_memory
from qwen_ft.training import (
    RunLog,
    after_step,
    autocast_of,
    batch_plan,
    compute_dtype,
    data_workers,
    eval_batches,
    frozen_copy,
    micro_batches,
    next_window,
    optimizer_and_schedule,
    restore,
    resume_point,
    run_alone_or_under_torchrun,
    save_final,
    seed_everything,
    step_numbers,
    trainable_model,
)

LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(Config):
    """finetune.py's flags, with the same meanings (--batch-size counts pairs), and DPO's own."""

    data: str = option(
        "train_data/pairs.json",
        "preference pairs: a JSON list or JSONL file, or a dataset folder or parquet file, in qwen-ft's, TRL's or "
        "LLaMA-Factory's pair form (several: a.json,b.parquet; weighted: a.json:2,b.jsonl:0.5)",
    )
    output_dir: str = option("output-dpo", "where the fine-tuned model, config.json and metrics.jsonl are written")
    beta: float = option(0.1, "β: how far the policy may move from the reference (smaller: further)")
    loss: str = option("sigmoid", "sigmoid: DPO's loss; ipo: IPO's squared loss", choices=LOSSES)
    rpo_alpha: float = option(0.0, "weight of an NLL term on the chosen answers' tokens, added to the loss (RPO)")
    precompute_ref: bool = option(
        False, "compute every pair's reference log-probabilities in one pass before training, then free the copy"
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0 or not self.rpo_alpha >= 0:
            raise ValueError("--beta must be positive and --rpo-alpha not negative")
        if self.packing:
            raise ValueError("--packing is not supported by finetune_dpo.py: use --max-tokens to bound micro-batches")


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float, loss_type: str):
    """Each pair's loss, and the implicit rewards β·(log π − log π_ref) of its two answers, from the summed
    log-probabilities of the answers under the policy and under the reference.

    sigmoid, DPO (Rafailov et al. 2023, eq. 7): −log σ(β·((log πc − log rc) − (log πr − log rr)))
    ipo, IPO (Azar et al. 2023, eq. 17, its τ our β): ((log πc − log rc) − (log πr − log rr) − 1/(2β))²
    """
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    margin = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# What forward_backward sums over a window, in this order (rewards per answer, log-probs per answer).
STATS = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "logps_chosen", "logps_rejected", "pairs")


def forward_backward(model, reference, window: list[dict], cfg, dist: Dist, autocast) -> torch.Tensor:
    """Forward and backward over one accumulation window of micro-batches of pairs; returns the sums of STATS.

    A micro-batch of B pairs is one forward of 2B rows, the B chosen conversations then the B rejected ones.
    Each pair's loss is divided by the pairs of the whole window (all ranks), and RPO's NLL by the chosen
    answers' tokens of the window, so 2 micro-batches of 1 pair give the gradients of 1 batch of 2.
    """
    pairs = dist.all_reduce_sum(torch.tensor(float(sum(batch["pairs"] for batch in window)), device=dist.device))
    chosen_tokens = sum((batch["labels"][: batch["pairs"], 1:] != IGNORE_INDEX).sum() for batch in window)
    chosen_tokens = dist.all_reduce_sum(chosen_tokens.to(dist.device)).clamp(min=1)
    sums = torch.zeros(len(STATS), device=dist.device)
    for i, batch in enumerate(window):
        n, numbers = batch.pop("pairs"), batch.pop("pair_numbers")
        batch = {key: value.to(dist.device, non_blocking=True) for key, value in batch.items()}
        reference_logps = reference_answer_logps(reference, batch, numbers, autocast)
        with dist.no_sync(model, sync=i == len(window) - 1):
            logps = answer_logps(model, batch, autocast)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                logps[:n], logps[n:], reference_logps[:n], reference_logps[n:], cfg.beta, cfg.loss
            )
            # RPO (Pang et al. 2024): the chosen answers' NLL per token beside the pairs' loss, weighted by rpo_alpha.
            loss = losses.sum() / pairs + cfg.rpo_alpha * -logps[:n].sum() / chosen_tokens
            if loss.requires_grad:
                # DDP and FSDP average gradients over ranks; the loss is already a share of the whole
                # window's, so multiply the average back into a sum.
                (loss * dist.world_size).backward()
        sums += torch.stack(
            [
                losses.sum(),
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).sum().float(),
                logps[:n].sum(),
                logps[n:].sum(),
                torch.tensor(float(n), device=dist.device),
            ]
        ).detach()
    return sums


def answer_logps(model, batch: dict, autocast) -> torch.Tensor:
    """The summed log-probability of each row's answer (its trained labels: the answer and its <|im_end|>)."""
    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # the token each position predicts
    trained = targets != IGNORE_INDEX
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with autocast():
        # The output head runs on the answers' positions alone: logits of (answer tokens, vocab).
        logits = model(**inputs, logits_to_keep=trained, use_cache=False).logits
    token_logps = -token_cross_entropy(logits, targets[trained])
    rows = trained.nonzero()[:, 0]
    return torch.zeros(len(labels), device=token_logps.device).index_add(0, rows, token_logps)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each token's cross-entropy in fp32, `chunk` tokens at a time, each chunk's fp32 logits recomputed in
    backward rather than kept."""

    def chunk_loss(chunk_logits, chunk_targets):
        return F.cross_entropy(chunk_logits.float(), chunk_targets, reduction="none")

    pieces = [
        checkpoint(chunk_loss, a, b, use_reentrant=False) for a, b in zip(logits.split(chunk), targets.split(chunk))
    ]
    return torch.cat(pieces) if pieces else logits.sum(-1).float()


@torch.no_grad()
def reference_answer_logps(reference, batch: dict, numbers: torch.Tensor, autocast) -> torch.Tensor:
    """The reference model's summed answer log-probabilities of each row: looked up where --precompute-ref
    computed them before training (a (pairs, 2) tensor); with LoRA, the policy itself with its adapters
    switched off, which peft's disable_adapter also does to the modules trained in full beside them (they run
    their original, frozen weights), so that it is the base model; in full fine-tuning, the frozen copy."""
    if isinstance(reference, torch.Tensor):
        return torch.cat([reference[numbers, 0], reference[numbers, 1]]).to(batch["input_ids"].device)
    if isinstance(reference, PeftModel):
        with reference.disable_adapter():
            return answer_logps(reference, batch, autocast)
    return answer_logps(reference, batch, autocast)


@torch.no_grad()
def evaluate(model, reference, pairs: Pairs, collator, cfg, dist: Dist, autocast, step: int) -> dict:
    """The eval record of a step: the mean loss, reward accuracy and reward margin over the eval pairs,
    computed as in training, each rank on its share and the sums added."""
    model.eval()  # no dropout
    totals = torch.zeros(3, device=dist.device)
    for batch in eval_batches(pairs, collator, cfg, dist):
        n, numbers = batch.pop("pairs"), batch.pop("pair_numbers")
        batch = {key: value.to(dist.device) for key, value in batch.items()}
        logps = answer_logps(model, batch, autocast)
        reference_logps = reference_answer_logps(reference, batch, numbers, autocast)
        losses, chosen, rejected = dpo_loss(
            logps[:n], logps[n:], reference_logps[:n], reference_logps[n:], cfg.beta, cfg.loss
        )
        totals += torch.stack([losses.sum(), (chosen > rejected).sum().float(), (chosen - rejected).sum()])
    loss_sum, correct, margin = dist.all_reduce_sum(totals).tolist()
    model.train()
    return {
        "step": step,
        "eval_loss": loss_sum / len(pairs),
        "eval_reward_accuracy": correct / len(pairs),
        "eval_reward_margin": margin / len(pairs),
        "eval_pairs": len(pairs),
    }


def precomputed_reference(reference, pairs: Pairs, collator, cfg, dist: Dist, autocast, name: str) -> torch.Tensor:
    """Every pair's reference log-probabilities, (pairs as read, 2): read from the file a run on the same
    reference, data and settings wrote beside the data index, or computed now (each rank a share) and saved."""
    key = json.dumps(
        {
            "model": [str(Path(cfg.model).resolve()), *files_of(Source(cfg.model))]
            if Path(cfg.model).exists()
            else cfg.model,
            "data": [files_of(source) for source in pairs.sides.sources],
            "settings": index_settings(cfg, collator.collator),
            "run": [cfg.precision, cfg.attn_implementation, cfg.qlora, cfg.max_length],
        },
        sort_keys=True,
        default=str,
    )
    path = index_folder(cfg.output_dir) / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        dist.print(f"reference log-probabilities of the {name} pairs: {path}")
        return torch.load(path, weights_only=True)
    table = torch.zeros(len(pairs.sides) // 2, 2, device=dist.device)
    every_pair = Pairs(pairs.sides, np.sort(pairs.order))
    batches = eval_batches(every_pair, collator, cfg, dist)
    for batch in tqdm(batches, desc=f"reference log-probabilities, {name} pairs", disable=not dist.is_main):
        n, numbers = batch.pop("pairs"), batch.pop("pair_numbers")
        logps = reference_answer_logps(reference, {k: v.to(dist.device) for k, v in batch.items()}, numbers, autocast)
        table[numbers.to(dist.device)] = torch.stack([logps[:n], logps[n:]], dim=1)
    table = dist.all_reduce_sum(table).cpu()  # each pair computed by one rank, zeros elsewhere
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(table, path.with_suffix(f".{os.getpid()}.tmp"))
        path.with_suffix(f".{os.getpid()}.tmp").replace(path)
    return table


def train(cfg: DPOConfig, dist: Dist):
    """Preference fine-tuning as cfg says (in each process of a torchrun job): fine_tune below, with the output
    folder locked against a second run, and signals, a peer's death and a full disk stopping it cleanly."""
    with guarded_run(cfg.output_dir, dist) as stop:
        return fine_tune(cfg, dist, stop)


def fine_tune(cfg: DPOConfig, dist: Dist, stop: StopSignal):
    out = Path(cfg.output_dir)
    resume_from = resume_point(cfg, dist)  # checked before anything loads
    seed_everything(cfg.seed)

    # Pairs: every pair is read and checked (structure, media, length) before the model loads.
    processor = load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels, cfg.video_max_pixels, cfg.trust_remote_code)
    dist.print(json.dumps(dataclasses.asdict(cfg), indent=1))
    collator = PairCollator(Collator(processor, cfg.max_length, cfg.video(), blank_image=dist.world_size > 1))
    pairs = checked_pairs(cfg.data, cfg, collator.collator, dist)
    eval_pairs = checked_pairs(cfg.eval_data, cfg, collator.collator, dist) if cfg.eval_data else None
    if cfg.max_tokens:
        check_pair_budget(pairs, cfg.max_tokens)

    # Model: finetune.py's, with its freezing or LoRA and precision.
    model = trainable_model(cfg, dist)
    autocast = autocast_of(cfg, dist)

    # Reference: with LoRA the model itself, adapters off; else a frozen copy, or its log-probabilities
    # computed once before training (--precompute-ref), after which the copy is freed.
    reference = model if cfg.lora else frozen_copy(cfg, dist)
    eval_reference = reference
    if cfg.precompute_ref:
        precompute = partial(precomputed_reference, reference, collator=collator, cfg=cfg, dist=dist, autocast=autocast)
        eval_reference = precompute(eval_pairs, name="eval") if eval_pairs else None
        reference = precompute(pairs, name="training")
        del precompute  # with it the last hold on a frozen copy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    model = dist.wrap(model, compute_dtype(cfg))  # DDP or FSDP in a distributed run; as it is in one process
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Optimizer and schedule; the plan deals the micro-batches of pairs to the ranks.
    plan = batch_plan(pairs.lengths, cfg, dist)
    optimizer, scheduler, total_steps = optimizer_and_schedule(model, plan, cfg, dist)

    # Resume: weights, optimizer, schedule, random state and data position of the checkpoint.
    start_step, counters, best = restore(resume_from, model, optimizer, scheduler, cfg, dist)
    batches = micro_batches(pairs, plan, collator, cfg, start=start_step * cfg.grad_accum)

    # Loop: `step` counts optimizer steps; each takes grad_accum micro-batches of pairs.
    save = partial(save_checkpoint, out, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist, cfg=cfg,
                   counters=counters, processor=processor)  # fmt: skip
    evaluation = partial(evaluate, model, eval_reference, eval_pairs, collator, cfg, dist, autocast)
    epoch_batches, step = len(plan.epoch(0)), start_step
    with RunLog(cfg, dist, model, total_steps, start_step, bool(resume_from), counters, "dpo") as run, \
            data_workers(batches):  # fmt: skip
        try:
            if eval_pairs and not resume_from:  # the baseline: step 0 is the model as loaded
                run.log(evaluation(0))
            model.train()
            # From here on SIGTERM or SIGINT lets the step finish, saves a checkpoint and returns; a second one
            # stops at once. Before, they stop the run at once: nothing would be lost.
            stop.begin("stopping after this step, with a checkpoint")
            for step in range(start_step + 1, total_steps + 1):
                began = time.perf_counter()
                window, bad_samples = next_window(batches, cfg)
                lr = optimizer.param_groups[0]["lr"]  # the LLM's (or LoRA's): the one this step uses
                trained = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in window)
                sums = forward_backward(model, reference, window, cfg, dist, autocast)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                finite = torch.isfinite(grad_norm).item()  # not finite (on every rank alike): no update
                if finite:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                stats = dict(zip(STATS, dist.all_reduce_sum(sums).tolist()))
                pair_count = stats.pop("pairs")
                stats = {name: value / max(pair_count, 1) for name, value in stats.items()}  # means over the pairs
                record = {
                    "step": step,
                    "epoch": round(step * cfg.grad_accum / epoch_batches, 4),
                    **stats,
                    "reward_margin": stats["rewards_chosen"] - stats["rewards_rejected"],
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "pairs": int(pair_count),
                    "trained_tokens": int(dist.all_reduce_sum(trained.to(dist.device)).item()),
                    **step_numbers(step, window, bad_samples, finite, began, run, dist),
                }
                run.log(record, loss=f"{record['loss']:.4f}", acc=f"{record['reward_accuracy']:.2f}")
                best, stopping = after_step(step, finite, model, evaluation, best, save, stop, run, cfg, dist)
                if stopping:
                    return model
        except torch.OutOfMemoryError:
            raise out_of_memory(step) from None

    save_final(out, step, model, processor, stop, cfg, best, dist)
    return model


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0], config=DPOConfig)
    run_alone_or_under_torchrun(train, cfg, "finetune_dpo.py")


if __name__ == "__main__":
    main()
