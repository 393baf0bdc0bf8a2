"""Fine-tune a Qwen2-VL-family model on images, video and text: the whole training loop, in one file.

Read train() top to bottom: config -> seed -> data (checked before the model loads) -> model ->
freezing or LoRA -> optimizer and schedule -> resume -> loop -> save. The step itself is the loop
with forward_backward just above it. finetune_distributed.py runs this same train() in every
process of a torchrun job.

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
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from qwen_ft.checkpoint import (
    check_resume_config,
    find_checkpoint,
    load_checkpoint,
    open_metrics,
    save_checkpoint,
    save_model,
)
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import Config, ConfigError, parse_config
from qwen_ft.data import BadSample, DataError, check_media, read_samples
from qwen_ft.dist import Dist, single_device
from qwen_ft.lora import add_lora, quantization_config
from qwen_ft.model import (
    ModelUnavailable,
    cast_trainable,
    load_model,
    load_processor,
    set_trainable,
    trainable_table,
)
from qwen_ft.optim import make_optimizer, make_scheduler
from qwen_ft.stop import RunStopped, StopSignal, ignore_signals, out_of_memory


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
        labels = batch.pop("labels")
        with dist.no_sync(model, sync=i == len(window) - 1):
            with autocast():
                logits = model(**batch).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            if loss.requires_grad:  # false for a text-only micro-batch when only vision parts train
                # DDP and FSDP average gradients over ranks; the loss is already a share of the
                # whole window's, so multiply the average back into a sum.
                (loss * dist.world_size / trained_tokens).backward()
        loss_sum += loss.detach()
    return loss_sum, trained_tokens


def micro_batches(samples, sampler: DistributedSampler, collator: Collator, cfg: Config, start: int):
    """Micro-batches without end, from the start-th on (a resumed run skips what it already took),
    in a new order each epoch, fixed by the seed and the epoch."""
    per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * cfg.batch_size :]  # skipping indices loads nothing
        skip = 0
        yield from DataLoader(
            samples,
            batch_size=cfg.batch_size,
            sampler=order,
            collate_fn=collator,
            num_workers=cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_signals,
            # Its own generator: drawing worker seeds from the global one would make a resumed run's
            # random numbers differ from those of a run never interrupted.
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )


def train(cfg: Config, dist: Dist):
    out = Path(cfg.output_dir)
    resume_from = find_checkpoint(cfg.resume, out) if cfg.resume else None
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
    collator = Collator(processor, cfg.max_length, cfg.video(), blank_image=dist.world_size > 1)
    samples = read_samples(cfg.data, cfg.media_root, collator.tokens.all_strings)
    check_media(samples, cfg.video(), collator.video_factor, dist=dist)  # each process checks a share
    samples = collator.drop_overlong(samples, quiet=not dist.is_main)
    if not samples:
        raise DataError(f"{cfg.data}: no sample fits in --max-length {cfg.max_length}")

    # Model: weights load in bf16 (4-bit for QLoRA) unless --precision fp32
    frozen = {"vision": cfg.freeze_vision, "merger": cfg.freeze_merger, "llm": cfg.freeze_llm}
    quantization = quantization_config(frozen) if cfg.qlora else None
    model = load_model(
        cfg.model, cfg.precision, cfg.attn_implementation, dist.load_device, quantization, cfg.trust_remote_code
    )
    model.config.use_cache = False  # the KV cache only serves generation
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
    # DDP or FSDP in a distributed run; as it is in one process.
    model = dist.wrap(model, torch.float32 if cfg.precision == "fp32" else torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Optimizer and schedule; the sampler deals the samples to the ranks (all of them, with one).
    part_lr = {"vision": cfg.vision_lr, "merger": cfg.merger_lr}
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, dist.device, part_lr)
    sampler = DistributedSampler(samples, dist.world_size, dist.rank, shuffle=cfg.shuffle, seed=cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, total_steps)

    # Resume: weights, optimizer, schedule, random state and data position of the checkpoint.
    start_step, counters = 0, {"bad_steps": 0, "skipped_samples": 0}
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, dist)
        start_step, counters = state["step"], {name: state[name] for name in counters}
    batches = micro_batches(samples, sampler, collator, cfg, start=start_step * cfg.grad_accum)

    # Loop: `step` counts optimizer steps; each takes grad_accum micro-batches.
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        cfg.save(out / "train_config.json")
    metrics = open_metrics(out / "metrics.jsonl", start_step if resume_from else None) if dist.is_main else None
    autocast = partial(torch.autocast, dist.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")
    progress = tqdm(total=total_steps, initial=start_step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    stop, bad_in_a_row = StopSignal(), 0  # SIGTERM or SIGINT: finish the step, save a checkpoint, exit
    model.train()
    try:
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
            counts = torch.tensor([sum(int(b["attention_mask"].sum()) for b in window), len(bad_samples)])
            tokens, skipped = dist.all_reduce_sum(counts.to(dist.device)).tolist()
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            counters["bad_steps"] += not finite
            counters["skipped_samples"] += skipped
            record = {
                "step": step,
                "epoch": round(step * cfg.grad_accum / batches_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "trained_tokens": int(trained_tokens.item()),
                "tokens": tokens,
                "tokens_per_s": round(tokens / (time.perf_counter() - began), 1),
                "peak_memory_gib": dist.peak_memory_gib(),
                "skipped_step": not finite,
                **counters,
            }
            if dist.is_main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                progress.update()
            if bad_in_a_row >= cfg.max_bad_steps:
                raise RunStopped(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (up to step "
                    f"{step}); the last checkpoint holds the last good weights. Try a lower --lr"
                )
            stopping = stop.requested(dist)
            if stopping or (cfg.save_every and step % cfg.save_every == 0):
                folder = save_checkpoint(out, step, model, optimizer, scheduler, dist, cfg, counters, processor)
            if stopping:
                dist.print(f"stopped after step {step}, saved {folder}; run the same command with --resume to go on")
                return model
    except torch.OutOfMemoryError:
        raise out_of_memory(step) from None
    finally:
        stop.restore()
        progress.close()
        if metrics:
            metrics.close()

    # Save: a transformers checkpoint (fp32 under bf16-mixed: see one_dtype), or with LoRA a peft
    # adapter (plus modules trained in full), that from_pretrained loads as it is.
    state_dict = dist.full_state_dict(model)  # FSDP gathers the shards (all ranks); else None
    if dist.is_main:
        save_model(out, dist.unwrap(model), state_dict)
        processor.save_pretrained(out)
        summary = f"{counters['bad_steps']} non-finite steps skipped, {counters['skipped_samples']} bad samples skipped"
        dist.print(f"saved the fine-tuned model to {out} ({summary})")
    return model


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    if cfg.fsdp:
        sys.exit("error: --fsdp shards the model over several processes: run finetune_distributed.py with torchrun")
    try:
        train(cfg, single_device())
    except (DataError, ModelUnavailable, ConfigError, RunStopped) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
