"""Checkpoints for exact resume, written so that a crash never leaves one that looks complete.

OUTPUT_DIR/checkpoints/step-00000500/ holds
  - the weights, in one dtype that holds every value as it is in memory (the fp32 master weights
    too): model.safetensors and config.json, which from_pretrained loads as a model; or with LoRA the
    peft adapter with the modules trained in full, which PeftModel.from_pretrained loads;
  - the processor, so that the checkpoint serves for inference as it is;
  - state.pt: optimizer, scheduler, step, data position, counters and the config (rank 0);
  - rng-<rank>.pt: each process's python, numpy, torch and CUDA random states.
It is written as .tmp-step-00000500 and renamed when every file is on disk; a folder without the
final name is never read, and the next save removes it. A save that fails (a full disk) removes it at
once and stops the run with one line (disk.py); weights that are no longer finite are never saved.
--resume checks the checkpoint it picks before anything loads, and passes over a damaged one.

The final model is written the same way: into OUTPUT_DIR/.tmp-model, then moved into OUTPUT_DIR.
"""

import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qwen_ft.config import Config, ConfigError
from qwen_ft.disk import (
    WRITE_ERRORS,
    SaveFailed,
    disk_full,
    failed_write,
    free_space,
    fsync_tree,
    publish,
    size,
    torch_save,
)
from qwen_ft.dist import Dist
from qwen_ft.stop import RunStopped

PREFIX = "step-"
RETRY_S = 30  # between tries of a final save that found the disk full
BEST_FILE = "best.json"  # beside the checkpoints: the step and eval loss of the one --save-best keeps


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"{PREFIX}{step:08d}"


def step_of(folder: Path) -> int:
    return int(folder.name[len(PREFIX) :])


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder with its final name, oldest first (half-written ones, .tmp-*, are not)."""
    root = checkpoints_dir(output_dir)
    found = [p for p in root.glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", p.name)] if root.is_dir() else []
    return sorted(found, key=step_of)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first: those whose state.pt, written last, is there."""
    return [p for p in step_folders(output_dir) if (p / "state.pt").is_file()]


def kept(output_dir: str | Path, resume: bool = True) -> str:
    """What a run that stops now keeps, for the line that says why it stopped (with how to go on from it)."""
    found = complete_checkpoints(output_dir)
    if not found:
        return "no checkpoint had been written"
    resume = ": run the same command with --resume to go on from it" if resume else ""
    return f"the newest complete checkpoint is {found[-1]}{resume}"


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


def finite_weights(model, dist: Dist) -> bool:
    """Whether every trained weight is finite. Every rank takes part (under FSDP each holds a shard)."""
    trained = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    flags = torch.stack([torch.isfinite(p).all() for p in trained]).logical_not().sum() if trained else 0
    return not dist.all_reduce_sum(torch.as_tensor(flags, dtype=torch.float32, device=dist.device)).item()


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def check_finite(model, dist: Dist, step: int, out: Path, what: str) -> None:
    """Stop, rather than save `what`, when a trained weight is no longer finite (an update that overflowed):
    a checkpoint always holds finite weights."""
    if not finite_weights(model, dist):
        raise RunStopped(
            f"at step {step} some trained weights are no longer finite (an update overflowed: try a lower --lr), "
            f"so {what} was not saved; {kept(out)}"
        )


def too_many_bad_steps(bad_in_a_row: int, step: int, model, dist: Dist, out: Path) -> RunStopped:
    """The stop after --max-bad-steps non-finite steps in a row, saying where finite weights are."""
    if finite_weights(model, dist):
        weights = "so the weights are those of the last good step"
    else:
        weights = "but the weights were no longer finite already (an update overflowed)"
    found = complete_checkpoints(out)
    newest = f"the newest checkpoint, {found[-1]}, holds finite weights" if found else "no checkpoint had been written"
    return RunStopped(
        f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (up to step {step}), and their updates "
        f"were skipped, {weights}; {newest}. Try a lower --lr"
    )


def weights_bytes(inner, weights: dict | None) -> int:
    """Roughly what save_weights and save_model write: every tensor in the widest dtype (one_dtype), or
    with LoRA the adapter and the modules trained in full."""
    if isinstance(inner, PeftModel):
        return tensor_bytes(get_peft_model_state_dict(inner))
    tensors = list((weights if weights is not None else inner.state_dict()).values())
    width = max(t.element_size() for t in tensors if t.is_floating_point())
    return sum(t.numel() * (width if t.is_floating_point() else t.element_size()) for t in tensors)


def check_space(out: Path, model, dist: Dist, cfg: Config) -> None:
    """Warn before training when the disk of the output folder can't hold what the run will write there:
    --keep-last checkpoints, one more while a new one is written, and the model. (A full disk stops the
    run cleanly whenever it comes; this says so hours earlier.)"""
    if not dist.is_main:
        return
    model_bytes = weights_bytes(dist.unwrap(model), None)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint = model_bytes + 2 * trained  # AdamW keeps two tensors the size of each trained weight
    needed = model_bytes + ((cfg.keep_last + 1) * checkpoint if cfg.save_every else 0)
    free = free_space(out)
    if free < needed:
        print(
            f"warning: {out} has {size(free)} free, and this run may write up to {size(needed)} there "
            f"({cfg.keep_last + 1 if cfg.save_every else 0} checkpoints of {size(checkpoint)} at once, the model's "
            f"{size(model_bytes)}): it will stop when the disk is full",
            file=sys.stderr,
        )


def tensor_bytes(state) -> int:
    """The bytes of every tensor in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def together(dist: Dist, work, what: str, folder: Path, needed: int) -> None:
    """Run this rank's part of a save (work may be None: nothing to do on this rank). If a write failed on
    any rank, every rank raises SaveFailed with the first one's reason; all ranks wait here for the rest."""
    problem = None
    try:
        if work:
            work()
    except WRITE_ERRORS as e:
        problem = failed_write(what, folder, e, needed)
    problems = [p for p in dist.all_gather_objects(problem) if p]
    if problems:
        raise SaveFailed(problems[0])


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, dist: Dist, cfg: Config, counters: dict, processor, best=None
) -> Path:
    """Write checkpoint `step` (every rank takes part); keep the newest cfg.keep_last, and the best one:
    best is {"step", "eval_loss"} of the checkpoint --save-best keeps, which is this one when its step is
    this step (then recorded in BEST_FILE). Returns its path. SaveFailed (removing what was written) if
    a write fails; RunStopped if the weights are not finite."""
    root, final = checkpoints_dir(out), checkpoint_folder(out, step)
    partial = root / f".tmp-{final.name}"
    check_finite(model, dist, step, out, f"checkpoint {final.name}")
    # Under FSDP, gathering the weights and optimizer state is a collective: every rank calls it.
    weights = dist.full_state_dict(model)
    optimizer_state = (
        get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.fsdp
        else optimizer.state_dict()
    )
    needed = weights_bytes(dist.unwrap(model), weights) + tensor_bytes(optimizer_state)

    def prepare() -> None:
        for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale)
        partial.mkdir(parents=True)

    def write() -> None:
        torch_save(rng_state(), partial / f"rng-{dist.rank}.pt")
        if dist.is_main:
            save_weights(partial, dist.unwrap(model), weights)
            processor.save_pretrained(partial)
            resume = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **counters}
            torch_save(resume, partial / "state.pt")
            cfg.save(partial / "train_config.json")

    def rename() -> None:
        fsync_tree(partial)
        if final.exists():  # left by an earlier run in this folder that was not resumed: replaced, not kept
            final.rename(root / f".tmp-{final.name}.old")
        partial.rename(final)
        shutil.rmtree(root / f".tmp-{final.name}.old", ignore_errors=True)

    try:
        for work in (prepare if dist.is_main else None, write, rename if dist.is_main else None):
            together(dist, work, f"checkpoint {final.name}", root, needed)
    except SaveFailed as e:
        if dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # frees what it took: nothing half written stays
        raise SaveFailed(f"{e}; {kept(out)}") from None
    if dist.is_main:
        if best and best["step"] == step:
            written = root / f".tmp-{BEST_FILE}"
            written.write_text(json.dumps(best) + "\n")
            written.rename(root / BEST_FILE)
        for old in step_folders(out):
            # Later steps than this one belong to no run that goes on: an earlier run's in this folder, or
            # those after the checkpoint this run resumed from (a damaged one, say).
            if step_of(old) > step:
                shutil.rmtree(old)
        for old in complete_checkpoints(out)[: -cfg.keep_last]:
            if not best or old != checkpoint_folder(out, best["step"]):
                shutil.rmtree(old)
    barrier(dist)  # no rank goes on before the checkpoint is complete
    return final


def save_final_model(out: Path, step: int, model, processor, dist: Dist, stop, wait_minutes: float) -> None:
    """The fine-tuned model in OUTPUT_DIR, as from_pretrained loads it (save_model), with its processor:
    written into OUTPUT_DIR/.tmp-model, then moved in (disk.publish). On a full disk the trained weights
    are still in memory: the save is tried again every 30 s for up to wait_minutes, for the user to make
    room, unless a signal asks to stop. Every rank calls it (FSDP gathers the weights); rank 0 writes."""
    check_finite(model, dist, step, out, "the fine-tuned model")
    weights = dist.full_state_dict(model)  # FSDP gathers the shards (all ranks); else None
    if not dist.is_main:
        return
    inner, partial = dist.unwrap(model), out / ".tmp-model"
    needed, deadline, said = weights_bytes(inner, weights), time.monotonic() + 60 * wait_minutes, False
    while True:
        shutil.rmtree(partial, ignore_errors=True)  # a crash's, or the last try's
        try:
            partial.mkdir(parents=True)
            save_model(partial, inner, weights)
            processor.save_pretrained(partial)
            publish(partial, out)
            return
        except WRITE_ERRORS as e:
            shutil.rmtree(partial, ignore_errors=True)
            problem = failed_write("the fine-tuned model", out, e, needed)
            if not disk_full(e) or stop.received or time.monotonic() > deadline:
                lost = "the trained weights are lost with this process"
                raise SaveFailed(f"{problem}; {lost}, and {kept(out)}") from None
            if not said:
                print(
                    f"warning: {problem}. The trained weights are still in memory: make room there, and the save "
                    f"is tried again every {RETRY_S} s for up to {wait_minutes:g} minutes (Ctrl-C gives up)",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
        for _ in range(RETRY_S):  # a second at a time, to see a signal soon
            if stop.received:
                break
            time.sleep(1)


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
    set_rng_state(torch.load(folder / f"rng-{dist.rank}.pt", weights_only=True))  # find_checkpoint saw it
    return state


# What may differ between the run that wrote a checkpoint and the one that resumes from it: these
# change how long the run goes and what it writes, not the steps it takes.
MAY_CHANGE = {
    "output_dir", "resume", "max_steps", "epochs", "save_every", "keep_last", "num_workers",
    "max_bad_steps", "skip_bad_samples", "media_root", "check_media", "full_disk_wait",
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


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (cut short, a header that doesn't parse), or None. Reads the header alone."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        data_size = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "has no readable header"
    expected, actual = 8 + header_size + data_size, path.stat().st_size
    return None if actual == expected else f"is cut short ({actual:,} of {expected:,} bytes)"


def checkpoint_problem(folder: Path, world_size: int, lora: bool) -> str | None:
    """What makes a checkpoint unusable for this run's resume, or None: a file missing, cut short or unreadable.
    Reads headers and metadata, not the tensors (state.pt is mapped, not loaded)."""
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    for name in ("train_config.json", "state.pt", weights):
        if not (folder / name).is_file():
            return f"it has no {name}"
    problem = safetensors_problem(folder / weights)
    if problem:
        return f"its {weights} {problem}"
    try:
        json.loads((folder / "train_config.json").read_text())
    except (OSError, ValueError):
        return "its train_config.json is not readable JSON"
    written_by = {int(p.name[4:-3]) for p in folder.glob("rng-*.pt") if re.fullmatch(r"rng-\d+\.pt", p.name)}
    missing = [rank for rank in range(world_size) if rank not in written_by]
    if missing:
        processes = max(written_by, default=-1) + 1
        if processes and missing[0] == processes and set(range(processes)) <= written_by:  # another world size
            raise ConfigError(
                f"--resume: {folder} was written by {processes} process{'es' if processes > 1 else ''} and this "
                f"run has {world_size}: resume it with as many"
            )
        return f"it has no rng-{missing[0]}.pt"
    for name in ["state.pt", *(f"rng-{rank}.pt" for rank in range(world_size))]:
        try:
            torch.load(folder / name, weights_only=True, mmap=True)
        except Exception as e:  # whatever torch finds wrong with it (a cut-short zip, an unreadable record)
            return f"its {name} is not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def find_checkpoint(resume: str, output_dir: str | Path, dist: Dist, lora: bool) -> Path:
    """The checkpoint --resume names, checked (checkpoint_problem) before anything loads: for "latest" the
    newest complete one in output_dir, passing over damaged ones with a warning; ConfigError if none will do.
    Rank 0 checks (every rank's files), and every rank gets its answer."""
    found, refused = None, None
    if dist.is_main:
        try:
            found = str(pick_checkpoint(resume, output_dir, dist.world_size, lora))
        except ConfigError as e:
            refused = str(e)
    found, refused = dist.all_gather_objects((found, refused))[0]
    if refused:
        raise ConfigError(refused)
    return Path(found)


def pick_checkpoint(resume: str, output_dir: str | Path, world_size: int, lora: bool) -> Path:
    if resume != "latest":
        problem = checkpoint_problem(Path(resume), world_size, lora)
        if problem:
            raise ConfigError(f"--resume {resume}: not a complete checkpoint: {problem}")
        return Path(resume)
    damaged = []
    for folder in reversed(step_folders(output_dir)):
        problem = checkpoint_problem(folder, world_size, lora)
        if not problem:
            return folder
        print(f"warning: checkpoint {folder} is damaged ({problem}): trying the one before it", file=sys.stderr)
        damaged.append(f"{folder.name}: {problem}")
    found = f" ({'; '.join(damaged)})" if damaged else ""
    raise ConfigError(f"--resume: {checkpoints_dir(output_dir)} holds no complete checkpoint{found}")


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
