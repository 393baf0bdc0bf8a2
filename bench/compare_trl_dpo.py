"""finetune_dpo.py against TRL's DPOTrainer: per-step losses and rewards, seconds per step and memory, side by side.

    pip install -e ".[bench]"        # TRL, for this benchmark only
    python bench/compare_trl_dpo.py [--modes lora,full] [--steps 3 --warmup 1 --repeats 1] [--precision auto]

Both sides train the same model directory (compare_trl.py's: Qwen2-VL with the 2B model's widths and vocabulary,
random weights, 4 LLM layers unless --llm-layers says otherwise; nothing is downloaded) on the same preference
pairs (an --image-side image and a question each, a chosen and a rejected answer of about --answer-words words)
in the same order, with the same β, sigmoid loss, precision, trainable parameters, learning rate and schedule
(cosine, no warm-up), batch size (pairs), gradient accumulation and max length:

- finetune_dpo.py: run as it is, through its main(), with --no-shuffle and --warmup-steps 0;
- TRL: DPOTrainer on a conversational dataset with "images", "prompt", "chosen" and "rejected" columns, its own
  vision collator (DataCollatorForVisionPreference), LoRA through peft_config (its reference: the model with
  the adapters disabled), or in full fine-tuning its own frozen copy of the model (ref_model=None), and
  sequential sampling.

LoRA puts adapters on the LLM's q, k, v, o, gate, up and down projections with dropout 0 on both sides (TRL's
DPOConfig disables dropout by default, so finetune_dpo.py runs with --lora-dropout 0); the merger trains in full
beside them (TRL: peft's modules_to_save=["merger"]). Full fine-tuning trains the LLM and the merger, with the
vision tower frozen. Before it measures, the benchmark checks that both collators build the same batches (input
ids, attention mask, answer tokens, pixels) and, after each run, that both trained the same parameters.

One difference in labels is removed on the TRL side, as compare_trl.py does for SFT: TRL's completion is the
text the chat template adds after the prompt, "answer<|im_end|>\\n", so the newline after <|im_end|> counts in
each answer's log-probability, which finetune_dpo.py leaves out (SFT's label rule: the answer and its
<|im_end|>). A wrapper around TRL's collator takes that token out of its completion mask (--trl-stock-labels
keeps it); the losses and rewards then agree to fp32 rounding.

Memory and time are measured as compare_trl.py measures them (its Probe: on the CPU the peak RSS of the training
process minus its RSS once the model has loaded; on a GPU max_memory_allocated), each run in a subprocess of its
own, sides alternating. finetune_dpo.py's final save is skipped; TRL runs with save_strategy="no".
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from compare_trl import (
    LLM_PROJECTIONS,
    QUESTION,
    REPO,
    WORDS,
    Probe,
    build_model,
    device_name,
    load_trl_processor,
    source_state,
)
from PIL import Image

SIDES = ("finetune", "trl")
NAMES = {"finetune": "finetune_dpo.py", "trl": "TRL DPOTrainer"}
COMPARED = ("loss", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected")
TRL_LOGS = {
    "loss": "loss",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
}


def write_pairs(folder: Path, count: int, side: int, answer_words: int) -> tuple[Path, Path]:
    """count pairs, each an image and a question with two answers, in qwen-ft's pair form and in TRL's
    conversational preference form; the same images (files) and texts in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for i in range(count):
        grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = folder / f"image-{i}.png"
        Image.fromarray(grid).resize((side, side), Image.NEAREST).save(image)
        chosen, rejected = (" ".join(rng.choice(WORDS, answer_words)).capitalize() + "." for _ in range(2))
        user = [{"type": "image", "image": image.name}, {"type": "text", "text": QUESTION}]
        ours.append({"messages": [{"role": "user", "content": user}], "chosen": chosen, "rejected": rejected})
        theirs.append(
            {
                "images": [str(image)],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    our_data, trl_data = folder / "pairs.json", folder / "trl-pairs.json"
    our_data.write_text(json.dumps(ours, indent=1))
    trl_data.write_text(json.dumps(theirs, indent=1))
    return our_data, trl_data


def trl_dataset(path: Path):
    import datasets

    dataset = datasets.Dataset.from_list(json.loads(Path(path).read_text()))
    return dataset.cast_column("images", datasets.List(datasets.Image()))


class AlignedCompletion:
    """TRL's collator, with the token right after each <|im_end|> out of the completion mask."""

    def __init__(self, collator, im_end: int):
        self.collator, self.im_end = collator, im_end

    def __call__(self, examples):
        batch = self.collator(examples)
        after_im_end = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        after_im_end[:, 1:] = batch["input_ids"][:, :-1] == self.im_end
        batch["completion_mask"][after_im_end] = 0
        return batch


def check_same_batches(spec: dict) -> int:
    """Stop unless finetune_dpo.py's collator and TRL's build the same batches; returns the first row's tokens."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from qwen_ft.collate import Collator
    from qwen_ft.config import parse_config
    from qwen_ft.data.pairs import PairCollator, Pairs, read_pairs
    from qwen_ft.model import load_processor

    pixels = spec["pixels"]
    ours = Collator(load_processor(spec["model"], pixels, pixels), spec["max_length"])
    config = parse_config(["--data", spec["finetune_data"], "--media-root", spec["work_dir"]])
    sides = read_pairs(spec["finetune_data"], config, ours.tokens.all_strings)
    pairs = Pairs(sides, np.arange(len(sides) // 2))
    theirs = DataCollatorForVisionPreference(
        load_trl_processor(spec["model"], pixels, pixels), max_length=spec["max_length"]
    )
    if not spec["trl_stock_labels"]:
        theirs = AlignedCompletion(theirs, ours.tokens.im_end)
    dataset, size = trl_dataset(spec["trl_data"]), spec["batch_size"]
    for start in range(0, len(pairs), size):
        a = PairCollator(ours)(list(pairs[start : start + size]))
        b = theirs([dataset[i] for i in range(start, min(start + size, len(pairs)))])
        b["labels"] = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        for key in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
            if a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
                differ = f"{key}: {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
                if key == "labels" and a[key].shape == b[key].shape:
                    differ += f", answer tokens {(a[key] != -100).sum()} vs {(b[key] != -100).sum()}"
                raise SystemExit(f"finetune_dpo.py and TRL batch pairs {start}.. differently ({differ})")
    return int(PairCollator(ours)(list(pairs[:1]))["attention_mask"][0].sum())


def child_finetune(spec: dict) -> dict:
    """Run finetune_dpo.py's main() here, measuring memory from its first load_model (the policy) on."""
    import finetune_dpo
    from qwen_ft import training

    probe, out, loads = Probe(), {}, []
    load_model = training.load_model  # the policy's (training.trainable_model); finetune_dpo's frozen copy's

    def load_and_measure(*args, **kwargs):
        model = load_model(*args, **kwargs)
        if not loads:  # the policy; full fine-tuning's frozen reference copy loads after it and counts as training's
            probe.model_loaded()
        loads.append(model)
        return model

    def measure_instead_of_saving(folder, step, model, *args):
        out.update(probe.result(model))

    training.load_model = finetune_dpo.load_model = load_and_measure
    finetune_dpo.save_final = measure_instead_of_saving
    finetune_dpo.main(finetune_argv(spec))
    rows = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    out["steps"] = [
        {"seconds": r["tokens"] / r["tokens_per_s"], "tokens": r["tokens"], **{k: r[k] for k in COMPARED}} for r in rows
    ]
    return out


def finetune_argv(spec: dict) -> list[str]:
    argv = [
        "--model", spec["model"], "--data", spec["finetune_data"], "--output-dir", spec["output_dir"],
        "--precision", spec["precision"], "--max-steps", str(spec["steps"]), "--batch-size", str(spec["batch_size"]),
        "--grad-accum", str(spec["grad_accum"]), "--lr", str(spec["lr"]), "--warmup-steps", "0",
        "--weight-decay", "0", "--max-grad-norm", "1", "--max-length", str(spec["max_length"]),
        "--min-pixels", str(spec["pixels"]), "--max-pixels", str(spec["pixels"]), "--attn-implementation", "sdpa",
        "--no-gradient-checkpointing", "--no-shuffle", "--save-every", "0", "--num-workers", str(spec["num_workers"]),
        "--seed", str(spec["seed"]), "--beta", str(spec["beta"]), "--loss", "sigmoid",
    ]  # fmt: skip
    if spec["mode"] == "lora":
        argv += ["--lora", "--lora-r", str(spec["lora_r"]), "--lora-alpha", str(spec["lora_alpha"])]
        argv += ["--lora-dropout", "0", "--lora-targets", "llm"]
    return argv


def child_trl(spec: dict) -> dict:
    """Train with TRL's DPOTrainer as a user would, on the settings finetune_dpo.py gets in finetune_argv()."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = True
    precision = spec["precision"]
    probe = Probe()
    processor = load_trl_processor(spec["model"], spec["pixels"], spec["pixels"])
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model"],
        dtype=torch.float32 if precision == "fp32" else torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": "cuda" if cuda else "cpu"},
    )
    model.config.use_cache = False
    probe.model_loaded()
    peft_config = None
    if spec["mode"] == "lora":
        peft_config = LoraConfig(
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=0.0,
            target_modules=LLM_PROJECTIONS,
            modules_to_save=["merger"],
        )
    else:  # what finetune_dpo.py trains by default: the LLM and the merger
        for name, param in model.named_parameters():
            in_vision, in_merger = ".visual." in f".{name}.", ".visual.merger." in f".{name}."
            param.requires_grad_(not in_vision or in_merger)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.logs = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(logs)

    config = DPOConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=precision != "fp32",
        gradient_checkpointing=False,
        max_length=spec["max_length"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        train_sampling_strategy="sequential",
        dataloader_num_workers=spec["num_workers"],
        dataloader_pin_memory=cuda,
        seed=spec["seed"],
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(spec["trl_data"]),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[clock],
    )
    if not spec["trl_stock_labels"]:
        im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        trainer.data_collator = AlignedCompletion(trainer.data_collator, im_end)
    if precision == "bf16-mixed":  # fp32 master weights for what trains, as finetune_dpo.py's
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    trainer.train()
    out = probe.result(trainer.model)
    out["steps"] = [
        {"seconds": s, "tokens": None, **{k: log[TRL_LOGS[k]] for k in COMPARED}}
        for s, log in zip(clock.seconds, clock.logs)
    ]
    return out


def run_side(side: str, spec: dict, run_dir: Path) -> dict:
    spec = dict(spec, output_dir=str(run_dir / "out"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "bench"), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--child", side, str(run_dir)]
    with open(run_dir / "log.txt", "w") as log:
        began = time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result.exists():
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"{NAMES[side]} run failed (exit code {code}); the end of {run_dir / 'log.txt'}:\n{tail}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - began
    if len(out["steps"]) != spec["steps"]:
        raise SystemExit(f"{NAMES[side]} ran {len(out['steps'])} steps, not {spec['steps']}")
    return out


def child_main(side: str, run_dir: Path) -> None:
    spec = json.loads((run_dir / "spec.json").read_text())
    out = (child_finetune if side == "finetune" else child_trl)(spec)
    (run_dir / "result.json").write_text(json.dumps(out, indent=1))


def summary(runs: list[dict], warmup: int) -> dict:
    seconds = [step["seconds"] for run in runs for step in run["steps"][warmup:]]
    cuda = runs[0]["cuda_peak"] is not None
    memory = [run["cuda_peak"] if cuda else run["peak_rss"] - run["loaded_rss"] for run in runs]
    return {
        "s_per_step": statistics.median(seconds),
        "memory_gib": statistics.median(memory) / 2**30,
        "loaded_gib": statistics.median(run["loaded_rss"] for run in runs) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--modes", default="lora", help="comma list of lora and full")
    parser.add_argument("--size", choices=["tiny", "2b", "7b"], default="2b", help="published widths (or tiny)")
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM layers (0: as published; not for tiny)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16-mixed", "bf16"], default="auto",
                        help="auto: fp32 on the CPU, bf16-mixed on a GPU (TRL: bf16=True)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the medians")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side and mode, alternating the sides")
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (cosine decay, no warm-up)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's β on both sides")
    parser.add_argument("--image-side", type=int, default=448, help="image width and height (a multiple of 28)")
    parser.add_argument("--answer-words", type=int, default=24, help="words per answer")
    parser.add_argument("--max-length", type=int, default=2048, help="longest row in tokens (none is cut)")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (finetune.py's default)")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (finetune.py's default)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers on both sides")
    parser.add_argument("--trl-stock-labels", action="store_true",
                        help="let TRL also count the newline after <|im_end|> (the losses then differ)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="seed on both sides")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen-ft-compare-trl",
                        help="where the model (built once, as compare_trl.py's), the data and the runs go")  # fmt: skip
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], Path(args.child[1]))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("lora", "full") for m in modes):
        parser.error("--modes takes lora and/or full")
    if args.image_side % 28 or args.warmup >= args.steps:
        parser.error("--image-side must be a multiple of 28, and --warmup less than --steps")
    precision = args.precision if args.precision != "auto" else "bf16-mixed" if torch.cuda.is_available() else "fp32"
    if precision != "fp32" and not torch.cuda.is_available():
        parser.error("bf16 on the CPU is not what this benchmark compares: use --precision fp32")

    model = build_model(args.work_dir, args.size, args.llm_layers or None)
    count = args.steps * args.batch_size * args.grad_accum  # each pair once per run
    our_data, trl_data = write_pairs(args.work_dir / "dpo-data", count, args.image_side, args.answer_words)
    spec = {
        "model": str(model), "finetune_data": str(our_data), "trl_data": str(trl_data),
        "work_dir": str(args.work_dir / "dpo-data"), "precision": precision, "steps": args.steps,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr, "beta": args.beta,
        "max_length": args.max_length, "pixels": args.image_side**2, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "num_workers": args.num_workers, "seed": args.seed,
        "trl_stock_labels": args.trl_stock_labels,
    }  # fmt: skip
    tokens = check_same_batches(spec)
    print(f"both sides build identical batches; a row is about {tokens} tokens")

    results, loads = {}, []
    for mode in modes:
        for repeat in range(args.repeats):
            for side in SIDES:
                loads.append(os.getloadavg()[0])
                run = run_side(side, dict(spec, mode=mode), args.work_dir / "dpo-runs" / f"{mode}-{side}-{repeat}")
                first = results.get((mode, "finetune"), [run])[0]
                if run["trainable"] != first["trainable"]:
                    differ = sorted(set(run["trainable"]) ^ set(first["trainable"]))[:5]
                    raise SystemExit(f"{mode}: the two sides trained different parameters, e.g. {differ}")
                results.setdefault((mode, side), []).append(run)
                s = summary([run], args.warmup)
                print(f"{mode} {NAMES[side]:<16} run {repeat + 1}/{args.repeats}: {s['s_per_step']:.2f} s/step, "
                      f"memory {s['memory_gib']:.2f} GiB ({run['wall_s']:.0f} s)", flush=True)  # fmt: skip
    loads.append(os.getloadavg()[0])
    report(args, modes, results, precision, tokens, loads)


def report(args, modes, results, precision, tokens, loads) -> None:
    cuda = torch.cuda.is_available()
    print("\nPer step, first run of each side (the same pairs in the same order):")
    for mode in modes:
        ours, theirs = results[(mode, "finetune")][0]["steps"], results[(mode, "trl")][0]["steps"]
        print(f"{mode}: step | " + " | ".join(f"{k} (finetune_dpo.py, TRL)" for k in COMPARED))
        relative, rewards = 0.0, 0.0
        for i, (a, b) in enumerate(zip(ours, theirs), start=1):
            print(f"  {i} | " + " | ".join(f"{a[k]:.7g}, {b[k]:.7g}" for k in COMPARED))
            relative = max([relative, *(abs(b[k] - a[k]) / abs(a[k]) for k in COMPARED[:3])])
            # A reward is β times a difference of two summed log-probabilities (policy and reference), each
            # rounded at its own size: its difference is measured against β·|log π|, not against itself (0 at first).
            scale = args.beta * max(abs(a["logps_chosen"]), abs(a["logps_rejected"]))
            rewards = max([rewards, *(abs(b[k] - a[k]) / scale for k in COMPARED[3:])])
        print(f"  largest relative difference of the losses and log-probabilities: {relative:.1e}; of the rewards, "
              f"against β·|log π|: {rewards:.1e}")  # fmt: skip

    memory_how = "max_memory_allocated" if cuda else "peak RSS - RSS with the model loaded"
    print(f"\n| device | date | config | trainer | s/step | memory ({memory_how}) |")
    print("| --- | --- | --- | --- | --- | --- |")
    layers = f"{args.llm_layers} LLM layers" if args.llm_layers else "all LLM layers"
    model = f"{args.size} widths, {layers}" if args.size != "tiny" else "tiny"
    ratios = []
    for mode in modes:
        trained = f"LoRA r{args.lora_r} + merger" if mode == "lora" else "full + merger"
        config = (f"{model}; {trained}; {precision}; β {args.beta}; {args.batch_size}x{args.grad_accum} pairs; "
                  f"~{tokens} tokens a row")  # fmt: skip
        s = {side: summary(results[(mode, side)], args.warmup) for side in SIDES}
        for side in SIDES:
            memory = f"{s[side]['memory_gib']:.2f} GiB" + (
                "" if cuda else f" (loaded: {s[side]['loaded_gib']:.2f} GiB)"
            )
            print(f"| {device_name()} | {datetime.date.today()} | {config} | {NAMES[side]} | "
                  f"{s[side]['s_per_step']:.2f} | {memory} |")  # fmt: skip
        time_ratio = s["trl"]["s_per_step"] / s["finetune"]["s_per_step"]
        memory_ratio = s["finetune"]["memory_gib"] / s["trl"]["memory_gib"]
        ratios.append(
            f"{mode}: TRL takes {time_ratio:.2f}x finetune_dpo.py's time per step; finetune_dpo.py holds "
            f"{memory_ratio:.2f}x TRL's training memory"
        )
    print("\n" + "; ".join(ratios) + ".")
    print(
        f"Medians over {args.repeats} run(s) per side and {args.steps - args.warmup} step(s) per run after "
        f"{args.warmup} warm-up step(s); load average (1 min) {min(loads):.1f} to {max(loads):.1f} during the runs."
    )
    print(f"finetune_dpo.py: {source_state()}.")
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in ("trl", "transformers", "torch", "peft"))
    print(f"{versions}.\nCommand: {shlex.join(['python', f'bench/{Path(__file__).name}', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
