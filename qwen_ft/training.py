"""What every training loop (finetune.py, finetune_dpo.py, finetune_grpo.py) does around its own step, written once.

Each loop file reads top to bottom as a few calls to these, named for what they do, with its step in
between: where a resumed run starts, the seeds, the model that trains (freezing or LoRA, precision),
the batch plan, optimizer and schedule, the restored state, the micro-batches, the run's records
(train_config.json, metrics.jsonl, trackers, progress bar), the step's common numbers, the evaluations
and checkpoints that fall due after a step, the final save, and how a loop's main() ends on an error.
None of them decides what a loop does.
"""

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from qwen_ft.checkpoint import (
    best_checkpoint,
    check_resume_config,
    check_space,
    checkpoint_folder,
    find_checkpoint,
    load_checkpoint,
    open_metrics,
    save_final_model,
    too_many_bad_steps,
)
from qwen_ft.config import ConfigError
from qwen_ft.data.batching import BatchPlan
from qwen_ft.data.read import BadSample, DataError
from qwen_ft.dist import Dist, init_distributed, single_device
from qwen_ft.lora import as_trained, quantization_config
from qwen_ft.model import ModelUnavailable, load_model, trainable_table
from qwen_ft.optim import check_optimizer, make_optimizer, make_scheduler
from qwen_ft.packing import real_tokens
from qwen_ft.report import run_summary, write_report
from qwen_ft.stop import PeerDied, RunStopped, ignore_signals, signals_deferred
from qwen_ft.trackers import open_trackers


def resume_point(cfg, dist: Dist) -> Path | None:
    """The checkpoint --resume names, checked before anything loads: an --optim this device lacks, a damaged
    checkpoint (every file there, none cut short; --resume latest passes over it) and a config that can't resume
    exactly stop here."""
    check_optimizer(cfg.optim, dist.device)
    if not cfg.resume:
        return None
    folder = find_checkpoint(cfg.resume, Path(cfg.output_dir), dist, cfg.lora)
    changes = check_resume_config(folder, cfg)
    dist.print(f"resuming from {folder}" + (f", with changes: {'; '.join(changes)}" if changes else ""))
    return folder


def seed_everything(seed: int) -> None:
    """The same seed gives the same data order and dropout."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores; no effect on the CPU


def trainable_model(cfg, dist: Dist):
    """The model as it trains, before DDP or FSDP wraps it: loaded in bf16 (4-bit for QLoRA) unless --precision
    fp32, with frozen parts, or LoRA adapters (whose wrapper trains only them and the parts not frozen); under
    bf16-mixed what trains gets fp32 master weights. Prints the table of what trains."""
    quantization = quantization_config(cfg.frozen()) if cfg.qlora else None
    model = load_model(
        cfg.model, cfg.precision, cfg.attn_implementation, dist.load_device, quantization, cfg.trust_remote_code
    )
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no inputs that require grad, so it also works when the
        # embeddings are frozen (LoRA, QLoRA).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = as_trained(model, cfg)
    dist.print(trainable_table(model))
    return model


def frozen_copy(cfg, dist: Dist):
    """A reference model (DPO's in full fine-tuning, GRPO's KL term): the model as loaded, frozen, in bf16 unless
    --precision fp32 (sharded like the policy under FSDP)."""
    reference = load_model(
        cfg.model, cfg.precision, cfg.attn_implementation, dist.load_device, None, cfg.trust_remote_code
    )
    reference.requires_grad_(False)
    reference.eval()
    if dist.fsdp:
        reference = dist.wrap(reference, compute_dtype(cfg))
    return reference


def compute_dtype(cfg) -> torch.dtype:
    """What DDP and FSDP compute in."""
    return torch.float32 if cfg.precision == "fp32" else torch.bfloat16


def autocast_of(cfg, dist: Dist):
    """torch.autocast to bf16 under bf16-mixed; a context that changes nothing otherwise."""
    return partial(torch.autocast, dist.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")


def batch_plan(lengths, cfg, dist: Dist) -> BatchPlan:
    """Which samples (or pairs) go into each micro-batch of each rank, epoch by epoch (all of them, with one)."""
    lengths = tuple(int(n) for n in lengths)
    return BatchPlan(
        lengths, cfg.batch_size, cfg.max_tokens, cfg.packing, cfg.shuffle, cfg.seed, dist.rank, dist.world_size
    )


def optimizer_and_schedule(model, plan: BatchPlan, cfg, dist: Dist, steps_per_window: int = 1):
    """AdamW (--optim: 32- or 8-bit states; each part at its own lr) and its warm-up and cosine schedule over the
    run's optimizer steps (steps_per_window of them for each --grad-accum micro-batches: GRPO's --num-iterations);
    returns them and that number of steps."""
    part_lr = {"vision": cfg.vision_lr, "merger": cfg.merger_lr}
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, dist.device, part_lr, cfg.optim)
    total_steps = cfg.max_steps or math.ceil(plan.micro_batches_in(cfg.epochs) / cfg.grad_accum) * steps_per_window
    return optimizer, make_scheduler(optimizer, cfg.warmup_steps, total_steps), total_steps


def restore(resume_from: Path | None, model, optimizer, scheduler, cfg, dist: Dist) -> tuple[int, dict, dict]:
    """The step a run starts after, its running counts and, for --save-best, {"step", "eval_loss"} of the best
    checkpoint so far: the checkpoint's, with its weights, optimizer, schedule and random state restored, or 0,
    nothing counted and no best yet."""
    counters = {"bad_steps": 0, "skipped_samples": 0, "elapsed_s": 0.0}
    start_step = 0
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, dist)
        start_step, counters = state["step"], {name: state.get(name, 0) for name in counters}
    return start_step, counters, best_checkpoint(Path(cfg.output_dir), start_step)


def micro_batches(samples, plan: BatchPlan, collator, cfg, start: int):
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


def next_window(batches, cfg) -> tuple[list[dict], list[str]]:
    """The grad_accum micro-batches of the next step, and a line for each sample whose media failed to load:
    BadSample unless --skip-bad-samples."""
    window = [next(batches) for _ in range(cfg.grad_accum)]
    bad_samples = [problem for batch in window for problem in batch.pop("bad_samples")]
    if bad_samples and not cfg.skip_bad_samples:
        raise BadSample(f"{bad_samples[0]} (--skip-bad-samples skips such samples)")
    return window, bad_samples


def eval_batches(samples, collator, cfg, dist: Dist):
    """This rank's share of the batches of samples (or pairs), --batch-size each, collated by DataLoader workers;
    a sample whose media fail to load stops the run unless --skip-bad-samples. Every rank runs as many forwards
    (FSDP gathers the weights in each): one short of batches runs an empty one, a padding token without labels
    (and the blank image of distributed runs)."""
    batches = [samples[i : i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
    mine = batches[dist.rank :: dist.world_size]
    mine += [[]] * (math.ceil(len(batches) / dist.world_size) - len(mine))
    loader = DataLoader(
        mine, batch_size=None, collate_fn=collator, num_workers=cfg.num_workers, worker_init_fn=ignore_signals
    )
    for batch in loader:
        bad_samples = batch.pop("bad_samples")
        if bad_samples and not cfg.skip_bad_samples:
            raise BadSample(f"{bad_samples[0]} (--skip-bad-samples skips such samples)")
        yield batch


class RunLog:
    """Where a run's records go, rank 0's: train_config.json, metrics.jsonl (one line per step across resumes),
    the --report-to trackers and the progress bar; and the run's seconds, across resumes. Opening it warns if the
    disk can't hold the checkpoints and the model."""

    def __init__(self, cfg, dist: Dist, model, total_steps: int, start_step: int, resumed: bool, counters: dict,
                 name: str):  # fmt: skip
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        check_space(out, model, dist, cfg)
        self.main, self.counters = dist.is_main, counters
        if self.main:
            cfg.save(out / "train_config.json")
        self.metrics = open_metrics(out / "metrics.jsonl", start_step if resumed else None) if self.main else None
        self.trackers = open_trackers(
            cfg.trackers() if self.main else [], out, dataclasses.asdict(cfg), start_step if resumed else None
        )
        self.progress = tqdm(
            total=total_steps, initial=start_step, disable=not self.main, desc=name, dynamic_ncols=True
        )
        self.began, self.elapsed_before = time.perf_counter(), counters["elapsed_s"]
        self.total_steps, self.bad_in_a_row = total_steps, 0  # bad_in_a_row: non-finite steps in a row (after_step)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def elapsed(self) -> float:
        """Seconds of the run so far, across resumes."""
        return round(self.elapsed_before + time.perf_counter() - self.began, 1)

    def log(self, record: dict, **shown) -> None:
        """One record to metrics.jsonl, flushed (a crash keeps every line written), and to each tracker; with
        shown (a step's), the progress bar moves on showing them. An eval record gets the run's seconds."""
        if not self.main:
            return
        record = record if "elapsed_s" in record else {**record, "elapsed_s": self.elapsed()}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.trackers.log(record)
        if shown:
            self.progress.set_postfix(shown)
            self.progress.update()

    def close(self) -> None:
        self.progress.close()
        if self.metrics:
            self.metrics.close()
        self.trackers.close()


def step_numbers(step: int, window: list[dict], bad_samples: list[str], finite: bool, began: float, run: RunLog,
                 dist: Dist) -> dict:  # fmt: skip
    """What every loop's step record holds besides its loss: the tokens computed (real and padding, all ranks),
    tokens/s, peak memory, whether the update was skipped, and the run's running counts (updated here)."""
    real = sum(real_tokens(batch) for batch in window)
    computed = sum(batch["input_ids"].numel() for batch in window)  # padding included
    counts = torch.tensor([real, computed - real, len(bad_samples)])
    tokens, padded_tokens, skipped = dist.all_reduce_sum(counts.to(dist.device)).tolist()
    run.counters["bad_steps"] += not finite
    run.counters["skipped_samples"] += skipped
    run.counters["elapsed_s"] = run.elapsed()
    return {
        "tokens": tokens,
        "padded_tokens": padded_tokens,
        "tokens_per_s": round(tokens / (time.perf_counter() - began), 1),
        "peak_memory_gib": dist.peak_memory_gib(),
        "skipped_step": not finite,
        **run.counters,
    }


def after_step(step: int, finite: bool, model, evaluation, best: dict, save, stop, run: "RunLog", cfg, dist: Dist,
               can_stop: bool = True):  # fmt: skip
    """What may follow a step, in this order: the run stops if --max-bad-steps steps in a row were not finite;
    after the last step and every --eval-every steps, evaluation(step) is logged; with --save-best a checkpoint
    is written if its eval loss is the lowest so far (which becomes the best); else one every --save-every steps,
    and one when a signal asks the run to stop (every rank sees it at the same step; with can_stop false, on a
    step a checkpoint can't follow, it waits for a later one), which then says how to go on. Returns the best
    checkpoint so far ({"step", "eval_loss"}) and whether to stop."""
    run.bad_in_a_row = 0 if finite else run.bad_in_a_row + 1
    if run.bad_in_a_row >= cfg.max_bad_steps:
        raise too_many_bad_steps(run.bad_in_a_row, step, model, dist, Path(cfg.output_dir))
    folder = None
    if cfg.eval_data and (step == run.total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
        record = evaluation(step)
        run.log(record)
        if cfg.save_best and record["eval_loss"] < best["eval_loss"]:
            best = {"step": step, "eval_loss": record["eval_loss"]}
            folder = save(step, best=best)
    stopping = stop.requested(dist) and can_stop  # a signal during the evaluation counts too
    if not folder and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
        folder = save(step, best=best)
    if stopping:
        dist.print(f"stopped after step {step}, saved {folder}; run the same command with --resume to go on")
    return best, stopping


@contextlib.contextmanager
def data_workers(batches):
    """The DataLoader's workers of micro_batches, shut down when the block ends, however it ends: they ignore
    SIGTERM (ignore_signals), so the interpreter's exit could not end them."""
    try:
        yield batches
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()  # none to shut down with --num-workers 0


def save_final(out: Path, step: int, model, processor, stop, cfg, best: dict, dist: Dist) -> None:
    """The fine-tuned model as from_pretrained loads it (fp32 under bf16-mixed: see one_dtype), or with LoRA a
    peft adapter (plus modules trained in full), with the processor, written beside and then moved in, so that a
    folder that looks like a model holds one (every rank takes part); the run's summary, report.png and
    summary.json."""
    stop.begin("stopping once the model is saved")
    save_final_model(out, step, model, processor, dist, stop, cfg.full_disk_wait)
    if not dist.is_main:
        return
    dist.print(f"saved the fine-tuned model to {out}\n{run_summary(out / 'metrics.jsonl')}")
    if cfg.save_best and best["step"]:
        kept = checkpoint_folder(out, best["step"])
        dist.print(f"lowest eval loss {best['eval_loss']:.4f} at step {best['step']}, kept in {kept}")
    write_report(out)  # report.png and summary.json; a failure is a warning, never the run's end


def launch(train, cfg, dist: Dist, distributed: bool, own_errors: tuple = ()) -> None:
    """A loop's main(): train(cfg, dist), and an error that ends the run said in one line, without a traceback.
    Under torchrun every rank meets the same bad input and the same stop, so rank 0 alone says it; but a sample
    that fails to load while training fails on one rank only, and a peer's death is seen by every rank left
    (rank 0 may be the one that died): each says so, as each rank says the loop's own_errors it meets."""
    try:
        train(cfg, dist)
    except (DataError, ModelUnavailable, ConfigError, RunStopped, *own_errors) as e:
        if not distributed:
            sys.exit(f"error: {e}")
        if dist.is_main or isinstance(e, (BadSample, PeerDied, *own_errors)):
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # a second signal, or one before training began: one line, no traceback
        if dist.is_main:
            print(f"\n{e or 'interrupted'}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 130))


def run_alone_or_under_torchrun(train, cfg, script: str, own_errors: tuple = ()) -> None:
    """main() of a loop file that runs alone or in every process of a torchrun job (`torchrun SCRIPT`): the set-up
    is the only difference, a process group and DDP, or FSDP2 with --fsdp."""
    distributed = "RANK" in os.environ  # started by torchrun: one process per GPU (or CPU process)
    if cfg.fsdp and not distributed:
        sys.exit(f"error: --fsdp shards the model over several processes: run {script} with torchrun")
    dist = init_distributed(fsdp=cfg.fsdp) if distributed else single_device()
    try:
        launch(train, cfg, dist, distributed, own_errors)
    finally:
        if distributed:
            torch_dist.destroy_process_group()
