"""Fine-tune a Qwen vision-language model on images, video and text: the whole training loop, in one file.

Read fine_tune() top to bottom: config -> seed -> data (checked before the model loads) -> model ->
freezing or LoRA -> optimizer and schedule -> resume -> loop -> save. The step itself is the loop
with forward_backward just above it. train() runs it with the output folder locked and signals
handled (qwen_ft/run.py); finetune_distributed.py runs this same train() in every process of a
torchrun job.

    python finetune.py --model Qwen/Qwen2-VL-2B-Instruct --data train_data/data.json --output-dir output
"""

import dataclasses
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qwen_ft.checkpoint import save_checkpoint
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import Config, parse_config
from qwen_ft.data.batching import check_token_budget
from qwen_ft.data.checked import checked_samples
from qwen_ft.dist import Dist, single_device
from qwen_ft.generate import answer_samples
from qwen_ft.model import load_processor
from qwen_ft.packing import rope_index_of
from qwen_ft.plan import run_prediction, summary_line
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
    launch,
    micro_batches,
    next_window,
    optimizer_and_schedule,
    restore,
    resume_point,
    save_final,
    seed_everything,
    step_numbers,
    trainable_model,
)

EVAL_MAX_NEW_TOKENS = 128  # longest answer generated at an evaluation


def forward_backward(model, window: list[dict], dist: Dist, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over one accumulation window of micro-batches.

    Each micro-batch's summed loss is divided by the trained tokens of the whole window (all
    ranks), so every trained token weighs the same wherever it lands: 2 micro-batches of 1
    give the gradients of 1 batch of 2. Returns that sum and count, still on the device.
    """
    # Position t predicts token t+1, so the labels that count are those from position 1 on.
    trained_tokens = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in window)
    trained_tokens = dist.all_reduce_sum(trained_tokens.to(dist.device))
    loss_sum = torch.zeros((), device=dist.device)
    for i, batch in enumerate(window):
        batch = {key: value.to(dist.device, non_blocking=True) for key, value in batch.items()}
        with dist.no_sync(model, sync=i == len(window) - 1):
            loss, _ = summed_loss(model, batch, autocast)
            if loss.requires_grad:  # false for a text-only micro-batch when only vision parts train
                # DDP and FSDP average gradients over ranks; the loss is already a share of the
                # whole window's, so multiply the average back into a sum.
                (loss * dist.world_size / trained_tokens).backward()
        loss_sum += loss.detach()
    return loss_sum, trained_tokens


def summed_loss(model, batch: dict, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy summed over a micro-batch's trained tokens (on the device), and their count."""
    labels = batch.pop("labels")
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # the token each position predicts
    trained = targets != IGNORE_INDEX
    with autocast():
        # The output head runs on the trained positions alone, inside the model's forward (so
        # DDP and FSDP see it): logits of (trained tokens, vocab), not (batch, length, vocab).
        # No KV cache: it only serves generation, and it would hide packed samples' boundaries.
        logits = model(**batch, logits_to_keep=trained, use_cache=False).logits
    return cross_entropy_sum(logits, targets[trained]), trained.sum()


@torch.no_grad()
def evaluate(model, samples, collator: Collator, cfg: Config, dist: Dist, autocast, step: int, out: Path) -> dict:
    """The eval record of a step: the mean loss per trained token over the eval samples, computed as in
    training, each rank on its share and the sums added; with --eval-generate, the mean scores of greedy
    answers to the first eval samples, whose answers go to OUTPUT_DIR/eval/step-NNNNNNNN.jsonl."""
    model.eval()  # no dropout
    totals = torch.zeros(2, device=dist.device)
    for batch in eval_batches(samples, collator, cfg, dist):
        batch = {key: value.to(dist.device) for key, value in batch.items()}
        totals += torch.stack(summed_loss(model, batch, autocast)).float()
    loss_sum, tokens = dist.all_reduce_sum(totals).tolist()
    record = {"step": step, "eval_loss": loss_sum / tokens, "eval_tokens": int(tokens)}
    if cfg.eval_generate:
        # Every rank answers the same samples: under FSDP each forward is a collective.
        with autocast():
            answers, means = answer_samples(
                dist.unwrap(model), collator, samples[: cfg.eval_generate], cfg.batch_size, EVAL_MAX_NEW_TOKENS
            )
        record.update({f"eval_{key}": mean for key, mean in means.items()})
        if dist.is_main:
            (out / "eval").mkdir(parents=True, exist_ok=True)
            (out / "eval" / f"step-{step:08d}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    model.train()
    return record


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy in fp32, `chunk` tokens at a time. Each chunk's fp32 logits and softmax are
    recomputed in backward rather than kept, so memory holds one chunk of them, however long the answers."""

    def chunk_loss(chunk_logits, chunk_targets):
        return F.cross_entropy(chunk_logits.float(), chunk_targets, reduction="sum")

    pieces = zip(logits.split(chunk), targets.split(chunk))
    return sum(checkpoint(chunk_loss, piece, target, use_reentrant=False) for piece, target in pieces)


def train(cfg: Config, dist: Dist):
    """Fine-tune as cfg says (in each process of a torchrun job): fine_tune below, with the output folder
    locked against a second run, and signals, a peer's death and a full disk stopping it cleanly."""
    with guarded_run(cfg.output_dir, dist) as stop:
        return fine_tune(cfg, dist, stop)


def fine_tune(cfg: Config, dist: Dist, stop: StopSignal):
    out = Path(cfg.output_dir)
    resume_from = resume_point(cfg, dist)  # checked before anything loads
    seed_everything(cfg.seed)

    # Data: every sample is read and checked (structure, media, length) before the model loads,
    # so bad input stops the run in seconds rather than after minutes of loading weights.
    processor = load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels, cfg.video_max_pixels, cfg.trust_remote_code)
    dist.print(json.dumps(dataclasses.asdict(cfg), indent=1))  # once the model is known to be there
    rope_index = rope_index_of(cfg.model, cfg.trust_remote_code) if cfg.packing else None
    collator = Collator(processor, cfg.max_length, cfg.video(), blank_image=dist.world_size > 1, rope_index=rope_index)
    samples = checked_samples(cfg.data, cfg, collator, dist)
    eval_samples = checked_samples(cfg.eval_data, cfg, collator, dist) if cfg.eval_data else None
    if cfg.max_tokens:
        check_token_budget(samples, cfg.max_tokens)

    # Model: loaded in bf16 (4-bit for QLoRA) unless --precision fp32, with freezing or LoRA adapters.
    model = trainable_model(cfg, dist)
    dist.print(summary_line(run_prediction(model, cfg, samples, collator, dist.world_size)))  # python -m qwen_ft.plan
    model = dist.wrap(model, compute_dtype(cfg))  # DDP or FSDP in a distributed run; as it is in one process
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Optimizer and schedule; the plan deals the micro-batches to the ranks (all of them, with one).
    plan = batch_plan(samples.lengths.tolist(), cfg, dist)
    optimizer, scheduler, total_steps = optimizer_and_schedule(model, plan, cfg, dist)

    # Resume: weights, optimizer, schedule, random state and data position of the checkpoint.
    start_step, counters, best = restore(resume_from, model, optimizer, scheduler, cfg, dist)
    batches = micro_batches(samples, plan, collator, cfg, start=start_step * cfg.grad_accum)

    # Loop: `step` counts optimizer steps; each takes grad_accum micro-batches.
    autocast = autocast_of(cfg, dist)
    save = partial(save_checkpoint, out, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist, cfg=cfg,
                   counters=counters, processor=processor)  # fmt: skip
    evaluation = partial(evaluate, model, eval_samples, collator, cfg, dist, autocast, out=out)
    epoch_batches, step = len(plan.epoch(0)), start_step  # with --max-tokens it varies a little by epoch
    with RunLog(cfg, dist, model, total_steps, start_step, bool(resume_from), counters, "train") as run, \
            data_workers(batches):  # fmt: skip
        try:
            if eval_samples and not resume_from:  # the baseline: step 0 is the model as loaded
                run.log(evaluation(0))
            model.train()
            # From here on SIGTERM or SIGINT lets the step finish, saves a checkpoint and returns; a second one
            # stops at once. Before, they stop the run at once: nothing would be lost.
            stop.begin("stopping after this step, with a checkpoint")
            for step in range(start_step + 1, total_steps + 1):
                began = time.perf_counter()
                window, bad_samples = next_window(batches, cfg)
                lr = optimizer.param_groups[0]["lr"]  # the LLM's (or LoRA's): the one this step uses
                loss_sum, trained_tokens = forward_backward(model, window, dist, autocast)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                # A non-finite gradient norm (the same on every rank) skips the update. .item() and the
                # logging below are the step's only waits on the device.
                finite = torch.isfinite(grad_norm).item()
                if finite:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                loss = (dist.all_reduce_sum(loss_sum) / trained_tokens).item()
                record = {
                    "step": step,
                    "epoch": round(step * cfg.grad_accum / epoch_batches, 4),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "trained_tokens": int(trained_tokens.item()),
                    **step_numbers(step, window, bad_samples, finite, began, run, dist),
                }
                run.log(record, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                best, stopping = after_step(step, finite, model, evaluation, best, save, stop, run, cfg, dist)
                if stopping:
                    return model
        except torch.OutOfMemoryError:
            raise out_of_memory(step) from None

    save_final(out, step, model, processor, stop, cfg, best, dist)
    return model


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    if cfg.fsdp:
        sys.exit("error: --fsdp shards the model over several processes: run finetune_distributed.py with torchrun")
    launch(train, cfg, single_device(), distributed=False)


if __name__ == "__main__":
    main()
