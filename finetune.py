"""Fine-tune a Qwen vision-language model on images, video and text: the whole training loop, in one file.

Read fine_tune() top to bottom: config -> seed -> data (checked before the model loads) -> model ->
freezing or LoRA -> optimizer and schedule -> resume -> loop -> save. The step itself is the loop
with forward_backward just above it. train() runs it with the output folder locked and signals
handled (qwen_ft/run.py); finetune_distributed.py runs this same train() in every process of a
torchrun job.

    python finetune.py --model Qwen/Qwen2-VL-2B-Instruct --data train_data/data.json --output-dir output
"""

import dataclasses
import itertools
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm import tqdm

from qwen_ft.batching import BatchPlan, check_token_budget
from qwen_ft.checked_data import checked_samples
from qwen_ft.checkpoint import (
    best_checkpoint,
    check_resume_config,
    check_space,
    checkpoint_folder,
    find_checkpoint,
    load_checkpoint,
    open_metrics,
    save_checkpoint,
    save_final_model,
    too_many_bad_steps,
)
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import Config, ConfigError, parse_config
from qwen_ft.data import BadSample, DataError
from qwen_ft.dist import Dist, single_device
from qwen_ft.generate import answer_samples
from qwen_ft.lora import add_lora, quantization_config
from qwen_ft.model import (
    ModelUnavailable,
    cast_trainable,
    load_model,
    load_processor,
    set_trainable,
    trainable_table,
)
from qwen_ft.optim import check_optimizer, make_optimizer, make_scheduler
from qwen_ft.packing import real_tokens, rope_index_of
from qwen_ft.plan import run_prediction, summary_line
from qwen_ft.report import run_summary, write_report
from qwen_ft.run import guarded_run
from qwen_ft.stop import RunStopped, StopSignal, ignore_signals, out_of_memory, signals_deferred
from qwen_ft.trackers import open_trackers

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
    batches = [samples[i : i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
    mine = batches[dist.rank :: dist.world_size]
    # Every rank runs as many forwards (FSDP gathers the weights in each): one short of batches runs an
    # empty one, a padding token without labels (and the blank image of distributed runs).
    mine += [[]] * (math.ceil(len(batches) / dist.world_size) - len(mine))
    totals = torch.zeros(2, device=dist.device)
    loader = DataLoader(
        mine, batch_size=None, collate_fn=collator, num_workers=cfg.num_workers, worker_init_fn=ignore_signals
    )
    for batch in loader:
        bad_samples = batch.pop("bad_samples")
        if bad_samples and not cfg.skip_bad_samples:
            raise BadSample(f"{bad_samples[0]} (--skip-bad-samples skips such samples)")
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


def micro_batches(samples, plan: BatchPlan, collator: Collator, cfg: Config, start: int):
    """Micro-batches without end, from the start-th on (a resumed run skips what it already took),
    in a new order each epoch, fixed by the seed and the epoch."""

    def indices():
        skip = start
        for epoch in itertools.count():
            batches = plan.epoch(epoch)
            yield from batches[skip:]  # skipping sample indices loads nothing
            skip = max(0, skip - len(batches))

    # One DataLoader for the whole run: its workers load across epoch boundaries instead of
    # starting anew every epoch. They start here, where a signal waits until they have started.
    with signals_deferred():
        return iter(
            DataLoader(
                samples,
                batch_sampler=indices(),
                collate_fn=collator,
                num_workers=cfg.num_workers,
                pin_memory=torch.cuda.is_available(),
                worker_init_fn=ignore_signals,
                # Its own generator: drawing worker seeds from the global one would make a resumed run's
                # random numbers differ from those of a run never interrupted.
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        )


def train(cfg: Config, dist: Dist):
    """Fine-tune as cfg says (in each process of a torchrun job): fine_tune below, with the output folder
    locked against a second run, and signals, a peer's death and a full disk stopping it cleanly."""
    with guarded_run(cfg.output_dir, dist) as stop:
        return fine_tune(cfg, dist, stop)


def fine_tune(cfg: Config, dist: Dist, stop: StopSignal):
    out = Path(cfg.output_dir)
    check_optimizer(cfg.optim, dist.device)
    # Each checkpoint is checked (every file there, none cut short) before anything loads.
    resume_from = find_checkpoint(cfg.resume, out, dist, cfg.lora) if cfg.resume else None
    if resume_from:  # before anything loads: a config that can't resume exactly stops here
        changes = check_resume_config(resume_from, cfg)
        dist.print(f"resuming from {resume_from}" + (f", with changes: {'; '.join(changes)}" if changes else ""))

    # Seed: the same seed gives the same data order and dropout.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores; no effect on the CPU

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

    # Model: weights load in bf16 (4-bit for QLoRA) unless --precision fp32
    frozen = {"vision": cfg.freeze_vision, "merger": cfg.freeze_merger, "llm": cfg.freeze_llm}
    quantization = quantization_config(frozen) if cfg.qlora else None
    model = load_model(
        cfg.model, cfg.precision, cfg.attn_implementation, dist.load_device, quantization, cfg.trust_remote_code
    )
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no inputs that require grad, so it also works when the
        # embeddings are frozen (LoRA, QLoRA).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # Freezing, or LoRA adapters (whose wrapper trains only them and the parts not frozen);
    # under bf16-mixed what trains gets fp32 master weights.
    if cfg.lora:
        model = add_lora(model, frozen, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.dora)
    else:
        set_trainable(model, frozen)
    if cfg.precision == "bf16-mixed":
        cast_trainable(model, torch.float32)
    dist.print(trainable_table(model))
    dist.print(summary_line(run_prediction(model, cfg, samples, collator, dist.world_size)))  # python -m qwen_ft.plan
    # DDP or FSDP in a distributed run; as it is in one process.
    model = dist.wrap(model, torch.float32 if cfg.precision == "fp32" else torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Optimizer and schedule; the plan deals the micro-batches to the ranks (all of them, with one).
    part_lr = {"vision": cfg.vision_lr, "merger": cfg.merger_lr}
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, dist.device, part_lr, cfg.optim)
    lengths = tuple(samples.lengths.tolist())
    plan = BatchPlan(
        lengths, cfg.batch_size, cfg.max_tokens, cfg.packing, cfg.shuffle, cfg.seed, dist.rank, dist.world_size
    )
    batches_per_epoch = len(plan.epoch(0))  # with --max-tokens it varies a little from epoch to epoch
    total_steps = cfg.max_steps or math.ceil(plan.micro_batches_in(cfg.epochs) / cfg.grad_accum)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, total_steps)

    # Resume: weights, optimizer, schedule, random state and data position of the checkpoint.
    start_step, counters = 0, {"bad_steps": 0, "skipped_samples": 0, "elapsed_s": 0.0}
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, dist)
        start_step, counters = state["step"], {name: state.get(name, 0) for name in counters}
    best = best_checkpoint(out, start_step)  # with --save-best: {"step", "eval_loss"} of the best so far
    batches = micro_batches(samples, plan, collator, cfg, start=start_step * cfg.grad_accum)

    # Loop: `step` counts optimizer steps; each takes grad_accum micro-batches.
    out.mkdir(parents=True, exist_ok=True)
    check_space(out, model, dist, cfg)  # a warning now if the disk can't hold the checkpoints and the model
    if dist.is_main:
        cfg.save(out / "train_config.json")
    metrics = open_metrics(out / "metrics.jsonl", start_step if resume_from else None) if dist.is_main else None
    trackers = open_trackers(
        cfg.trackers() if dist.is_main else [], out, dataclasses.asdict(cfg), start_step if resume_from else None
    )
    autocast = partial(torch.autocast, dist.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")
    progress = tqdm(total=total_steps, initial=start_step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    bad_in_a_row = 0
    save = partial(save_checkpoint, out, model=model, optimizer=optimizer, scheduler=scheduler, dist=dist, cfg=cfg,
                   counters=counters, processor=processor)  # fmt: skip
    run_began, elapsed_before = time.perf_counter(), counters["elapsed_s"]

    def elapsed() -> float:  # seconds of the run so far, across resumes
        return round(elapsed_before + time.perf_counter() - run_began, 1)

    step = start_step  # as an out-of-memory error names it, also in the first evaluation
    try:
        if eval_samples and not resume_from:  # the baseline: step 0 is the model as loaded
            record = evaluate(model, eval_samples, collator, cfg, dist, autocast, 0, out)
            if dist.is_main:
                log({**record, "elapsed_s": elapsed()}, metrics, trackers)
        model.train()
        # From here on SIGTERM or SIGINT lets the step finish, saves a checkpoint and returns; a second one
        # stops at once. Before, they stop the run at once: nothing would be lost.
        stop.begin("stopping after this step, with a checkpoint")
        for step in range(start_step + 1, total_steps + 1):
            began = time.perf_counter()
            window = [next(batches) for _ in range(cfg.grad_accum)]
            bad_samples = [problem for batch in window for problem in batch.pop("bad_samples")]
            if bad_samples and not cfg.skip_bad_samples:
                raise BadSample(f"{bad_samples[0]} (--skip-bad-samples skips such samples)")
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
            real = sum(real_tokens(b) for b in window)
            computed = sum(b["input_ids"].numel() for b in window)  # padding included
            counts = torch.tensor([real, computed - real, len(bad_samples)])
            tokens, padded_tokens, skipped = dist.all_reduce_sum(counts.to(dist.device)).tolist()
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            counters["bad_steps"] += not finite
            counters["skipped_samples"] += skipped
            counters["elapsed_s"] = elapsed()
            record = {
                "step": step,
                "epoch": round(step * cfg.grad_accum / batches_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "trained_tokens": int(trained_tokens.item()),
                "tokens": tokens,
                "padded_tokens": padded_tokens,
                "tokens_per_s": round(tokens / (time.perf_counter() - began), 1),
                "peak_memory_gib": dist.peak_memory_gib(),
                "skipped_step": not finite,
                **counters,
            }
            if dist.is_main:
                log(record, metrics, trackers)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update()
            if bad_in_a_row >= cfg.max_bad_steps:
                raise too_many_bad_steps(bad_in_a_row, step, model, dist, out)
            folder = None
            if eval_samples and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                record = evaluate(model, eval_samples, collator, cfg, dist, autocast, step, out)
                if dist.is_main:
                    log({**record, "elapsed_s": elapsed()}, metrics, trackers)
                if cfg.save_best and record["eval_loss"] < best["eval_loss"]:
                    best = {"step": step, "eval_loss": record["eval_loss"]}
                    folder = save(step, best=best)
            stopping = stop.requested(dist)  # a signal during the evaluation counts too
            if not folder and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
                folder = save(step, best=best)
            if stopping:
                dist.print(f"stopped after step {step}, saved {folder}; run the same command with --resume to go on")
                return model
    except torch.OutOfMemoryError:
        raise out_of_memory(step) from None
    finally:
        progress.close()
        if metrics:
            metrics.close()
        trackers.close()
        # The DataLoader's workers ignore SIGTERM (ignore_signals), so the interpreter's exit could not end
        # them: dropping their iterator here shuts them down, whatever else still holds this frame.
        del batches

    # Save: a transformers checkpoint (fp32 under bf16-mixed: see one_dtype), or with LoRA a peft
    # adapter (plus modules trained in full), that from_pretrained loads as it is; written beside, then
    # moved in, so that a folder that looks like a model holds one.
    stop.begin("stopping once the model is saved")
    save_final_model(out, step, model, processor, dist, stop, cfg.full_disk_wait)
    if dist.is_main:
        dist.print(f"saved the fine-tuned model to {out}\n{run_summary(out / 'metrics.jsonl')}")
        if cfg.save_best and best["step"]:
            kept = checkpoint_folder(out, best["step"])
            dist.print(f"lowest eval loss {best['eval_loss']:.4f} at step {best['step']}, kept in {kept}")
        write_report(out)  # report.png and summary.json; a failure is a warning, never the run's end
    return model


def log(record: dict, metrics, trackers) -> None:
    """One record to metrics.jsonl, flushed (a crash keeps every line written), and to each --report-to tracker."""
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    trackers.log(record)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    if cfg.fsdp:
        sys.exit("error: --fsdp shards the model over several processes: run finetune_distributed.py with torchrun")
    try:
        train(cfg, single_device())
    except (DataError, ModelUnavailable, ConfigError, RunStopped) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before training began: one line, no traceback
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))


if __name__ == "__main__":
    main()
