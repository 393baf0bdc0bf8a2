"""Checkpoints for exact resume, written so that a crash never leaves one that looks complete.

OUTPUT_DIR/checkpoints/step-00000500/ holds
  - the weights, in one dtype that holds every value as it is in memory (the fp32 master weights
    too): model.safetensors and config.json, which from_pretrained loads as a model; or with LoRA the
    peft adapter with the modules trained in full, which PeftModel.from_pretrained loads;
  - the processor, so that the checkpoint serves for inference as it is;
  - state.pt: optimizer, scheduler, step, data position, counters and the config (rank 0);
  - rng-<rank>.pt: each process's python, numpy, torch and CUDA random states.
It is written as .tmp-step-00000500 and renamed when every file is on disk; a folder without the
final name is never read, and the next save removes it.
"""

import json
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qwen_ft.config import Config, ConfigError
from qwen_ft.dist import Dist

PREFIX = "step-"
BEST_FILE = "best.json"  # beside the checkpoints: the step and eval loss of the one --save-best keeps


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"{PREFIX}{step:08d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first; half-written ones (.tmp-*) are not among them."""
    root = checkpoints_dir(output_dir)
    found = [p for p in root.glob(f"{PREFIX}*") if (p / "state.pt").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def rng_state() -> dict:
    state = random.getstate()
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": state,
        # As plain lists, so that torch.load(weights_only=True) reads them back.
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def fsync_tree(folder: Path) -> None:
    """Flush every file of the folder to disk, so that the rename below publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, dist: Dist, cfg: Config, counters: dict, processor, best=None
) -> Path:
    """Write checkpoint `step` (every rank takes part); keep the newest cfg.keep_last, and the best one:
    best is {"step", "eval_loss"} of the checkpoint --save-best keeps, which is this one when its step is
    this step (then recorded in BEST_FILE). Returns its path."""
    root, final = checkpoints_dir(out), checkpoint_folder(out, step)
    partial = root / f".tmp-{final.name}"
    if dist.is_main:
        for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale)
        partial.mkdir(parents=True)
    barrier(dist)
    # Under FSDP, gathering the weights and optimizer state is a collective: every rank calls it.
    weights = dist.full_state_dict(model)
    optimizer_state = (
        get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.fsdp
        else optimizer.state_dict()
    )
    torch.save(rng_state(), partial / f"rng-{dist.rank}.pt")
    if dist.is_main:
        save_weights(partial, dist.unwrap(model), weights)
        processor.save_pretrained(partial)
        resume = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **counters}
        torch.save(resume, partial / "state.pt")
        cfg.save(partial / "train_config.json")
    barrier(dist)
    if dist.is_main:
        fsync_tree(partial)
        if final.exists():  # left by an earlier run in this folder that was not resumed: replaced, not kept
            final.rename(root / f".tmp-{final.name}.old")
        partial.rename(final)
        shutil.rmtree(root / f".tmp-{final.name}.old", ignore_errors=True)
        if best and best["step"] == step:
            written = root / f".tmp-{BEST_FILE}"
            written.write_text(json.dumps(best) + "\n")
            written.rename(root / BEST_FILE)
        for old in complete_checkpoints(out)[: -cfg.keep_last]:
            if not best or old != checkpoint_folder(out, best["step"]):
                shutil.rmtree(old)
    barrier(dist)
    return final


def best_checkpoint(out: Path, resumed_step: int | None = None) -> dict:
    """{"step", "eval_loss"} of the checkpoint --save-best keeps; step 0 and an infinite loss if there is none.
    A run that starts at resumed_step ignores a best one written later, by a run it doesn't continue."""
    try:
        best = json.loads((checkpoints_dir(out) / BEST_FILE).read_text())
    except (OSError, ValueError):
        best = None
    if best is None or (resumed_step is not None and best["step"] > resumed_step):
        return {"step": 0, "eval_loss": math.inf}
    return best


def one_dtype(weights: dict) -> tuple[dict, torch.dtype]:
    """The weights in one floating dtype, the widest among them, and that dtype.

    Under bf16-mixed what trained is fp32 (the master weights) and what stayed frozen is bf16. Every
    bf16 value is exact in fp32, so the fp32 copy loses nothing, while rounding to bf16 would undo the
    updates smaller than bf16's precision, which many fine-tuning updates are. The copies are made in
    CPU memory, which the save needs anyway: on the GPU they could run out of memory mid-run.
    """
    dtype = max((t.dtype for t in weights.values() if t.is_floating_point()), key=lambda d: d.itemsize)
    cast = {name: t.to("cpu", dtype) for name, t in weights.items() if t.is_floating_point() and t.dtype != dtype}
    return {**weights, **cast}, dtype


def save_config(folder: Path, inner, dtype: torch.dtype) -> None:
    """config.json naming the dtype the weights were written in, so that from_pretrained(dtype="auto")
    loads them as they are (save_pretrained records the dtype of the model's first parameter)."""
    inner.config.dtype = dtype
    for key in inner.config.sub_configs:
        if getattr(inner.config, key, None) is not None:
            getattr(inner.config, key).dtype = dtype
    inner.config.save_pretrained(folder)


def save_model(folder: Path, inner, weights: dict | None) -> None:
    """The fine-tuned model as from_pretrained loads it: a transformers checkpoint in the hub's layout,
    in one dtype (one_dtype); with LoRA a peft adapter with the modules trained in full.
    weights: the gathered FSDP state dict, or None to take them from the model."""
    if isinstance(inner, PeftModel):
        inner.save_pretrained(folder)
        return
    weights, dtype = one_dtype(weights if weights is not None else inner.state_dict())
    inner.save_pretrained(folder, state_dict=weights)
    save_config(folder, inner, dtype)


def save_weights(folder: Path, inner, weights: dict | None) -> None:
    """The model's weights under their names in memory (which load_weights maps back one to one), in
    one dtype (one_dtype); weights: the gathered FSDP state dict, or None to take them from the model."""
    if isinstance(inner, PeftModel):
        inner.save_pretrained(folder)
        return
    weights, dtype = one_dtype(weights if weights is not None else inner.state_dict())
    unique, seen = {}, set()
    for name, tensor in weights.items():  # tied weights share storage: safetensors stores it once
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor.contiguous()
    save_file(unique, folder / "model.safetensors", metadata={"format": "pt"})
    save_config(folder, inner, dtype)
    inner.generation_config.save_pretrained(folder)


def load_weights(folder: Path, model, dist: Dist) -> None:
    """Put a checkpoint's weights into the (wrapped) model, the trained ones bit for bit."""
    inner = dist.unwrap(model)
    if isinstance(inner, PeftModel):
        unexpected = set_peft_model_state_dict(inner, load_file(folder / "adapter_model.safetensors")).unexpected_keys
        absent = []
    else:
        weights = load_file(folder / "model.safetensors")
        if dist.fsdp:
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            unexpected = []
        else:
            unexpected = inner.load_state_dict(weights, strict=False).unexpected_keys
        absent = [name for name, p in inner.named_parameters() if p.requires_grad and name not in weights]
    if unexpected or absent:
        raise ValueError(f"{folder} does not hold the weights this run trains: was it written by another config?")


def load_checkpoint(folder: Path, model, optimizer, scheduler, dist: Dist) -> dict:
    """Restore weights, optimizer, scheduler and this rank's random state; return state.pt's contents."""
    state = torch.load(folder / "state.pt", weights_only=True)
    load_weights(folder, model, dist)
    if dist.fsdp:
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=options)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The optimizer restored the lr of the schedule that was running. A resume with another length
    # (--max-steps, --epochs) has another schedule: the next step takes its lr at this step, which
    # for an unchanged length is the same number, computed as LambdaLR computes it.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    rng = folder / f"rng-{dist.rank}.pt"
    if not rng.is_file():
        raise ValueError(f"{folder} was written by fewer processes: it has no {rng.name}")
    set_rng_state(torch.load(rng, weights_only=True))
    return state


# What may differ between the run that wrote a checkpoint and the one that resumes from it: these
# change how long the run goes and what it writes, not the steps it takes.
MAY_CHANGE = {
    "output_dir", "resume", "max_steps", "epochs", "save_every", "keep_last", "num_workers",
    "max_bad_steps", "skip_bad_samples", "media_root", "check_media",
    "eval_data", "eval_every", "eval_generate", "save_best", "report_to",
}  # fmt: skip


def config_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changes a resume allows, changes that would break it), as 'flag: old -> new' lines."""
    allowed, refused = [], []
    for name, value in asdict(cfg).items():
        if name in saved and saved[name] != value and name != "resume":  # resuming is no change to report
            line = f"--{name.replace('_', '-')}: {saved[name]} -> {value}"
            (allowed if name in MAY_CHANGE else refused).append(line)
    return allowed, refused


def find_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """The folder --resume names: the newest complete checkpoint of output_dir for "latest"."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"--resume: {checkpoints_dir(output_dir)} holds no complete checkpoint")
        return found[-1]
    if not (Path(resume) / "state.pt").is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (it has no state.pt)")
    return Path(resume)


def check_resume_config(folder: Path, cfg: Config) -> list[str]:
    """The settings this run changes from the checkpoint's, if a resume allows them; ConfigError if not."""
    allowed, refused = config_changes(json.loads((folder / "train_config.json").read_text()), cfg)
    if refused:
        raise ConfigError(
            f"{folder} was written with other settings, and these would change the steps themselves: "
            f"{'; '.join(refused)}. Resume with the checkpoint's settings, or start a new run"
        )
    return allowed


def open_metrics(path: Path, resume_step: int | None):
    """metrics.jsonl to append to; on resume, first without the steps after the checkpoint, which
    the resumed run takes again, so that the file keeps one line per step."""
    kept = []
    if resume_step is not None and path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):  # a line cut short by a crash
                continue
    path.write_text("".join(kept))
    return open(path, "a")
