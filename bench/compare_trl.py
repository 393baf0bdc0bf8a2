"""finetune.py against TRL's SFTTrainer: seconds per step, tokens/s and memory on the same model, data and settings.

    pip install -e ".[bench]"        # TRL, for this benchmark only
    python bench/compare_trl.py [--modes lora,full] [--steps 3 --warmup 1 --repeats 2] [--precision auto]

Both sides train the same model directory (Qwen2-VL with the 2B model's widths and 151,936-token vocabulary,
random weights, 4 LLM layers unless --llm-layers says otherwise; nothing is downloaded) on the same samples
(one --image-side x --image-side image each, 256 image tokens at 448) in the same order, with the same
precision, trainable parameters, learning rate and schedule, batch size, gradient accumulation and max length:

- finetune.py: run as it is, through its main(), with --no-shuffle and --warmup-steps 0;
- TRL: SFTTrainer on a conversational prompt-completion dataset with an "images" column, completion-only
  loss, its own VLM collator (DataCollatorForVisionLanguageModeling), LoRA through peft_config, a cosine
  schedule without warm-up (the same curve as finetune.py's) and sequential sampling.

LoRA puts adapters on the LLM's q, k, v, o, gate, up and down projections (finetune.py's --lora); the merger
trains in full beside them on both sides (finetune.py's default; TRL: peft's modules_to_save=["merger"]),
or is frozen on both with --freeze-merger. Full fine-tuning trains the LLM and the merger and freezes the
vision tower on both sides (finetune.py's default). The benchmark checks before it measures that both
sides build identical batches (input ids, labels, pixels) and, after each run, that they trained the
same parameters (names, shapes, dtypes); it stops if not.

One difference in labels is removed on the TRL side: TRL's completion is the text the chat template adds
after the prompt, "answer<|im_end|>\\n", so its collator also trains the newline after <|im_end|>, which
finetune.py does not. A wrapper around TRL's collator masks that one token (--trl-stock-labels keeps it),
so the two losses can be compared step by step: they should agree to rounding.

Each run is its own subprocess (sides alternate: finetune.py, TRL, finetune.py, TRL, ... --repeats times
per mode), so its memory is its own:
- on a GPU: torch.cuda.max_memory_allocated over the whole run (model included);
- on the CPU: the peak RSS of the training process minus its RSS right after the model loaded. The peak
  (the kernel's VmHWM) is reset at that moment (writing 5 to /proc/self/clear_refs), so it is the peak
  of LoRA setup, optimizer and training alone; the loaded RSS (model, libraries) is printed beside it.
Seconds per step: finetune.py's metrics.jsonl gives each step's tokens and tokens_per_s (seconds = tokens /
tokens_per_s: the step from fetching its batches to its optimizer step and loss); for TRL a TrainerCallback
takes the time between consecutive optimizer steps (on_step_end; the batches are fetched inside it). The
median over the steps after --warmup of all repeats is reported, and tokens/s as the median step's tokens
over the median step's seconds (tokens: the batch's real, not padding, tokens). On a GPU, where steps are
short, ask for more of them (--steps 20 --warmup 5).

finetune.py's final save (a full checkpoint of several GB in fp32) is skipped: the benchmark replaces its
save_model with one that records the peak memory instead, and TRL runs with save_strategy="no".
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # finetune.py and qwen_ft from this checkout, installed or not

SIDES = ("finetune", "trl")
NAMES = {"finetune": "finetune.py", "trl": "TRL SFTTrainer"}
LLM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # qwen_ft.lora's
QUESTION = "Describe the image."
# Answers are drawn from these words (seeded), so samples differ but have about the same length.
WORDS = (
    "red green blue yellow purple orange white black grey circle square triangle star top left right bottom "
    "centre middle up down the first second one two three four five six seven eight nine ten shape image"
).split()
PIXELS_PER_TOKEN = 28  # one image token is a 2x2 group of 14-pixel patches


# ---------------------------------------------------------------------------------------------------------
# The model and the data, written once by the parent and read by both sides.


def build_model(work_dir: Path, size: str, llm_layers: int | None) -> Path:
    """A Qwen2-VL directory with random weights: the published shapes of `size` with llm_layers LLM layers
    (qwen_ft.tiny's builder; kept and reused while its recipe holds), or the tiny model."""
    from qwen_ft import tiny

    if size == "tiny":  # for trying the benchmark out: its own layer counts
        return tiny.build(work_dir / "qwen2-vl-tiny", reuse=True)
    out = work_dir / f"qwen2-vl-{size}-{llm_layers or 'all'}-llm-layers"
    print(f"qwen2-vl {size} with {llm_layers or 'all'} LLM layers, random weights, in {out} (built unless there)")
    return tiny.build(out, size=size, reuse=True, llm_layers=llm_layers)


def write_data(folder: Path, count: int, side: int, answer_words: int) -> tuple[Path, Path]:
    """count samples, each an image and a question with an answer, in finetune.py's messages format and in
    TRL's conversational prompt-completion format; the same images (files) and texts in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    finetune_samples, trl_samples = [], []
    for i in range(count):
        # An 8x8 grid of random colours, scaled up: distinct images that compress well.
        grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = folder / f"image-{i}.png"
        Image.fromarray(grid).resize((side, side), Image.NEAREST).save(image)
        answer = " ".join(rng.choice(WORDS, answer_words)).capitalize() + "."
        user = [{"type": "image", "image": image.name}, {"type": "text", "text": QUESTION}]
        finetune_samples.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        )
        trl_samples.append(
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                "images": [str(image)],
            }
        )
    finetune_data, trl_data = folder / "finetune.json", folder / "trl.json"
    finetune_data.write_text(json.dumps(finetune_samples, indent=1))
    trl_data.write_text(json.dumps(trl_samples, indent=1))
    return finetune_data, trl_data


# The real-shaped mix: prompts, images and answers of the sizes users' data has (seeded).
PROMPTS = (
    "Describe the image.",
    "What is in the picture?",
    "How many squares of each colour are there?",
    "Which colour covers most of the picture, and where is it?",
    "Write a detailed description of everything you can see, square by square, as for someone who can't see it.",
)
TWO_IMAGE_PROMPTS = ("Compare the two pictures.", "What changed from the first picture to the second?")


def mixed_answer(rng) -> str:
    """One word to a few hundred tokens: a third short answers, a third a few sentences, the rest long ones."""
    kind = rng.choice(3, p=[0.35, 0.4, 0.25])
    words = int(rng.integers(1, 4) if kind == 0 else rng.integers(8, 60) if kind == 1 else rng.integers(100, 260))
    return " ".join(rng.choice(WORDS, words)).capitalize() + "."


def write_mixed_data(folder: Path, count: int) -> tuple[Path, Path]:
    """count samples like users' data, in both formats (write_data's): images of 300x300 to 1280x960 pixels of
    any aspect, a quarter of the samples with two, prompts of a few words to a paragraph, answers of one word
    to a few hundred tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    finetune_samples, trl_samples = [], []
    for i in range(count):
        images = []
        for k in range(1 + int(rng.random() < 0.25)):
            width, height = int(rng.integers(300, 1281)), int(rng.integers(300, 961))
            grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            images.append(folder / f"image-{i}-{k}.png")
            Image.fromarray(grid).resize((width, height), Image.NEAREST).save(images[-1])
        prompt = str(rng.choice(TWO_IMAGE_PROMPTS if len(images) == 2 else PROMPTS))
        if rng.random() < 0.3:  # some prompts carry a paragraph of context
            prompt = " ".join(rng.choice(WORDS, int(rng.integers(20, 80)))).capitalize() + ". " + prompt
        answer = mixed_answer(rng)
        user = [*({"type": "image", "image": image.name} for image in images), {"type": "text", "text": prompt}]
        finetune_samples.append(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        )
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": prompt}]
        trl_samples.append(
            {
                "prompt": [{"role": "user", "content": content}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                "images": [str(image) for image in images],
            }
        )
    finetune_data, trl_data = folder / "finetune.json", folder / "trl.json"
    finetune_data.write_text(json.dumps(finetune_samples, indent=1))
    trl_data.write_text(json.dumps(trl_samples, indent=1))
    return finetune_data, trl_data


def add_lengths(spec: dict) -> list[int]:
    """Each sample's tokens as finetune.py measures them before training (equal to TRL's, which
    check_same_batches confirms), written into TRL's data as the `length` column its length grouping reads."""
    from qwen_ft.collate import Collator
    from qwen_ft.data.lengths import measure
    from qwen_ft.data.media_check import check_media
    from qwen_ft.data.read import read_samples
    from qwen_ft.model import load_processor

    collator = Collator(load_processor(spec["model"], spec["min_pixels"], spec["max_pixels"]), spec["max_length"])
    samples = read_samples(spec["finetune_data"], spec["work_dir"], collator.tokens.all_strings)
    check_media(samples)
    measure(collator, samples)
    lengths = samples.table["measure"][samples.order, 0].tolist()
    records = json.loads(Path(spec["trl_data"]).read_text())
    for record, length in zip(records, lengths):
        record["length"] = length
    Path(spec["trl_data"]).write_text(json.dumps(records, indent=1))
    return lengths


def packed_micro_batches(spec: dict) -> int:
    """The micro-batches of finetune.py's epoch with --recipe best, as its own batch plan forms them."""
    from qwen_ft.collate import Collator
    from qwen_ft.config import parse_config
    from qwen_ft.data.batching import BatchPlan
    from qwen_ft.data.checked import checked_samples
    from qwen_ft.dist import single_device
    from qwen_ft.model import load_processor

    cfg = parse_config(finetune_argv(dict(spec, mode="full", output_dir=str(Path(spec["work_dir"]) / "plan"))))
    collator = Collator(load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels), cfg.max_length, cfg.video())
    samples = checked_samples(cfg.data, cfg, collator, single_device())
    lengths = tuple(samples.lengths.tolist())
    return len(BatchPlan(lengths, cfg.batch_size, cfg.max_tokens, cfg.packing, cfg.shuffle, cfg.seed).epoch(0))


def trl_dataset(path: Path):
    """TRL's training set: the prompt-completion records, images decoded from their files on access."""
    import datasets

    dataset = datasets.Dataset.from_list(json.loads(Path(path).read_text()))
    return dataset.cast_column("images", datasets.List(datasets.Image()))


def load_trl_processor(model_dir: str, min_pixels: int, max_pixels: int):
    """The model's processor with images resized to between min_pixels and max_pixels pixels, as finetune.py's
    --min-pixels and --max-pixels set it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor


class AlignedLabels:
    """TRL's collator, with the label of every token right after <|im_end|> set to -100 (unless stock): finetune.py
    trains an answer and its <|im_end|>, TRL's completion also the template's newline after it. It counts each
    micro-batch's trained tokens, for the loss per trained token of an epoch (in the training process: TRL's
    default of no DataLoader workers)."""

    def __init__(self, collator, im_end: int, stock: bool = False):
        self.collator, self.im_end, self.stock = collator, im_end, stock
        self.trained = []

    def __call__(self, examples):
        batch = self.collator(examples)
        if not self.stock:
            after_im_end = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            after_im_end[:, 1:] = batch["input_ids"][:, :-1] == self.im_end
            batch["labels"][after_im_end] = -100
        self.trained.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch


def check_same_batches(spec: dict) -> int:
    """Stop unless finetune.py's collator and TRL's build the same batches from the two data files (the same
    samples, with --recipe best); returns the tokens of the first sample. Both read the same images and texts,
    so any difference is in the pipelines."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from qwen_ft.collate import Collator
    from qwen_ft.data.read import read_samples
    from qwen_ft.model import load_processor

    ours = Collator(load_processor(spec["model"], spec["min_pixels"], spec["max_pixels"]), spec["max_length"])
    samples = read_samples(spec["finetune_data"], spec["work_dir"], ours.tokens.all_strings)
    processor = load_trl_processor(spec["model"], spec["min_pixels"], spec["max_pixels"])
    theirs = DataCollatorForVisionLanguageModeling(processor, max_length=spec["max_length"], completion_only_loss=True)
    theirs = AlignedLabels(theirs, ours.tokens.im_end, stock=spec["trl_stock_labels"])
    dataset = trl_dataset(spec["trl_data"])
    size = spec["batch_size"] if spec["recipe"] == "equal" else 1  # the best recipes batch differently: per sample
    for start in range(0, len(samples), size):
        a = ours(samples[start : start + size])
        b = theirs([dataset[i] for i in range(start, min(start + size, len(samples)))])
        for key in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
            if a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
                differ = f"{key}: {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
                if key == "labels" and a[key].shape == b[key].shape:
                    differ += f", trained tokens {(a[key] != -100).sum()} vs {(b[key] != -100).sum()}"
                raise SystemExit(f"finetune.py and TRL batch samples {start}.. differently ({differ})")
    first = ours(samples[:1])
    return int(first["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------
# Memory and parameters, measured the same way inside both training subprocesses.


class Probe:
    """Memory of this process: its RSS once the model has loaded, then the peak from there on."""

    def __init__(self):
        self.loaded_rss, self.peak_reset = None, False

    @staticmethod
    def status(field: str) -> int:
        """A VmRSS/VmHWM line of /proc/self/status, in bytes (Linux)."""
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def model_loaded(self) -> None:
        self.loaded_rss = self.status("VmRSS")
        # Reset the peak RSS to the current RSS, so that what loading the weights took at its peak (a
        # bf16 copy converted to fp32, say) is not mistaken for what training takes.
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.peak_reset = True
        except OSError:  # not Linux, or not allowed: the peak then includes loading, which the report says
            pass

    def result(self, model) -> dict:
        return {
            "loaded_rss": self.loaded_rss,
            "peak_reset": self.peak_reset,
            "peak_rss": self.status("VmHWM"),
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "trainable": trainable_parameters(model),
        }


def trainable_parameters(model) -> list[str]:
    """'name shape dtype' of every trainable parameter, with peft's wrapper names taken out: finetune.py gives
    each merger module its own modules_to_save copy, TRL's config the merger as a whole, the same weights."""
    rows = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            rows.append(f"{name} {tuple(param.shape)} {str(param.dtype).removeprefix('torch.')}")
    return sorted(rows)


def child_finetune(spec: dict) -> dict:
    """Run finetune.py's main() in this process, recording the RSS after its model loads and the peak after
    its training loop, where its final save is skipped."""
    import finetune
    from qwen_ft import training

    probe, out = Probe(), {}
    for module, name in ((training, "load_model"), (finetune, "save_final"), (finetune, "main")):
        if not hasattr(module, name):
            raise SystemExit(f"{module.__name__} has no {name}() any more: update bench/compare_trl.py")
    load_model = training.load_model

    def load_and_measure(*args, **kwargs):
        model = load_model(*args, **kwargs)
        probe.model_loaded()
        return model

    def measure_instead_of_saving(folder, step, model, *args):
        out.update(probe.result(model))

    training.load_model, finetune.save_final = load_and_measure, measure_instead_of_saving
    finetune.main(finetune_argv(spec))
    rows = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    out["steps"] = [
        {
            "seconds": r["tokens"] / r["tokens_per_s"],
            "tokens": r["tokens"],
            "trained_tokens": r["trained_tokens"],
            "loss": r["loss"],
            "grad_norm": r["grad_norm"],
        }
        for r in rows
    ]
    return out


def finetune_argv(spec: dict) -> list[str]:
    """finetune.py's flags: those of TRL's run (--recipe equal), or what its README recommends for the speed of
    samples of mixed lengths with sdpa (--recipe best): packed rows of at most the longest sample, accumulated,
    the data shuffled and its default DataLoader workers; one epoch."""
    argv = [
        "--model", spec["model"], "--data", spec["finetune_data"], "--output-dir", spec["output_dir"],
        "--precision", spec["precision"], "--lr", str(spec["lr"]), "--warmup-steps", "0",
        "--weight-decay", "0", "--max-grad-norm", "1", "--max-length", str(spec["max_length"]),
        "--min-pixels", str(spec["min_pixels"]), "--max-pixels", str(spec["max_pixels"]),
        "--attn-implementation", "sdpa", "--no-gradient-checkpointing", "--save-every", "0",
        "--seed", str(spec["seed"]),
    ]  # fmt: skip
    if spec["recipe"] == "best":
        argv += ["--packing", "--max-tokens", str(spec["max_tokens"]), "--batch-size", "64", "--epochs", "1"]
        argv += ["--grad-accum", str(spec["packed_grad_accum"])]
    else:
        argv += ["--max-steps", str(spec["steps"]), "--batch-size", str(spec["batch_size"]), "--no-shuffle"]
        argv += ["--grad-accum", str(spec["grad_accum"]), "--num-workers", str(spec["num_workers"])]
    if spec["mode"] == "lora":
        argv += ["--lora", "--lora-r", str(spec["lora_r"]), "--lora-alpha", str(spec["lora_alpha"])]
        argv += ["--lora-dropout", str(spec["lora_dropout"]), "--lora-targets", "llm"]
    if spec["freeze_merger"]:
        argv.append("--freeze-merger")
    return argv


def child_trl(spec: dict) -> dict:
    """Train with TRL's SFTTrainer as a user would, on the settings finetune.py gets in finetune_argv()."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = True  # as finetune.py does: fp32 matmuls on tensor cores
    precision = spec["precision"]
    probe = Probe()
    processor = load_trl_processor(spec["model"], spec["min_pixels"], spec["max_pixels"])
    # As finetune.py loads it: fp32 weights for fp32, else bf16 (and, for bf16-mixed, fp32 copies of what
    # trains, below); the same attention kernel.
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
            lora_dropout=spec["lora_dropout"],
            target_modules=LLM_PROJECTIONS,  # suffixes: only the LLM's layers have these names
            modules_to_save=None if spec["freeze_merger"] else ["merger"],
        )
    else:  # full: what finetune.py trains by default, the LLM and the merger; the vision tower stays frozen
        for name, param in model.named_parameters():
            in_vision = ".visual." in f".{name}."
            in_merger = ".visual.merger." in f".{name}."
            param.requires_grad_(not in_vision or (in_merger and not spec["freeze_merger"]))

    class StepClock(TrainerCallback):
        """Seconds between consecutive optimizer steps, and each step's logged loss, grad norm and tokens."""

        def __init__(self):
            self.seconds, self.logs = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()  # the step's kernels end within its own time
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(logs)

    if spec["recipe"] == "best":
        # What TRL offers vision-language data for speed: it refuses packing and padding-free batches for them, so
        # samples of similar length share a micro-batch (transformers' length grouping, from the `length` column
        # add_lengths wrote, which SFTTrainer would drop as no input of a vision dataset without
        # remove_unused_columns=False); its default batch and DataLoader; one epoch.
        schedule = dict(num_train_epochs=1, per_device_train_batch_size=spec["trl_batch_size"])
        schedule.update(gradient_accumulation_steps=1, train_sampling_strategy="group_by_length")
        schedule.update(remove_unused_columns=False)
    else:  # finetune.py --no-shuffle: samples in file order
        schedule = dict(max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"])
        schedule.update(gradient_accumulation_steps=spec["grad_accum"], train_sampling_strategy="sequential")
        schedule.update(dataloader_num_workers=spec["num_workers"])
    config = SFTConfig(
        output_dir=spec["output_dir"],
        **schedule,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",  # without warm-up: 0.5 * (1 + cos(pi * step / steps)), finetune.py's curve
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # TRL's default, and finetune.py's optimizer: torch's fused AdamW
        bf16=precision != "fp32",  # autocast to bf16 (SFTConfig's default is True: fp32 must turn it off)
        activation_checkpointing=False,  # SFTConfig's default is True (as gradient_checkpointing); finetune.py's False
        max_length=spec["max_length"],
        completion_only_loss=True,
        dataloader_pin_memory=cuda,
        seed=spec["seed"],
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(spec["trl_data"]),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=[clock],
    )
    labels = AlignedLabels(
        trainer.data_collator, processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), spec["trl_stock_labels"]
    )
    trainer.data_collator = labels
    if precision == "bf16-mixed":  # fp32 master weights for what trains, as finetune.py's cast_trainable
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    trainer.train()
    out = probe.result(trainer.model)
    tokens = [log["num_tokens"] for log in clock.logs]  # running total
    accumulated = config.gradient_accumulation_steps
    trained = [sum(labels.trained[i : i + accumulated]) for i in range(0, len(labels.trained), accumulated)]
    out["steps"] = [
        {"seconds": s, "tokens": t - previous, "trained_tokens": n, "loss": log["loss"], "grad_norm": log["grad_norm"]}
        for s, t, previous, n, log in zip(clock.seconds, tokens, [0, *tokens], trained, clock.logs)
    ]
    return out


# ---------------------------------------------------------------------------------------------------------
# The parent: data, alternating runs, report.


def run_side(side: str, spec: dict, run_dir: Path) -> dict:
    """One training run in a subprocess of its own; its result."""
    spec = dict(spec, output_dir=str(run_dir / "out"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    result = run_dir / "result.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--child", side, str(run_dir)]
    with open(run_dir / "log.txt", "w") as log:
        began = time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not result.exists():
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"{NAMES[side]} run failed (exit code {code}); the end of {run_dir / 'log.txt'}:\n{tail}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - began
    if spec["recipe"] == "equal" and len(out["steps"]) != spec["steps"]:
        raise SystemExit(f"{NAMES[side]} ran {len(out['steps'])} steps, not {spec['steps']}")
    return out


def child_main(side: str, run_dir: Path) -> None:
    spec = json.loads((run_dir / "spec.json").read_text())
    out = (child_finetune if side == "finetune" else child_trl)(spec)
    (run_dir / "result.json").write_text(json.dumps(out, indent=1))


def summary(runs: list[dict], warmup: int) -> dict:
    steps = [step for run in runs for step in run["steps"][warmup:]]
    cuda = runs[0]["cuda_peak"] is not None
    memory = [run["cuda_peak"] if cuda else run["peak_rss"] - run["loaded_rss"] for run in runs]
    first = runs[0]["steps"]
    return {
        "s_per_step": statistics.median(s["seconds"] for s in steps),
        # The median step's: its tokens over its seconds (the samples are about the same length).
        "tokens_per_s": statistics.median(s["tokens"] for s in steps) / statistics.median(s["seconds"] for s in steps),
        # Steps of unequal sizes (--recipe best): all their real tokens over all their seconds.
        "total_tokens_per_s": sum(s["tokens"] for s in steps) / sum(s["seconds"] for s in steps),
        "memory_gib": statistics.median(memory) / 2**30,
        "loaded_gib": statistics.median(run["loaded_rss"] for run in runs) / 2**30,
        "steps": len(steps),
        "steps_per_run": len(first),
        # The first run's epoch: each step's mean loss per trained token, weighted by its trained tokens.
        "loss_per_token": sum(s["loss"] * s["trained_tokens"] for s in first) / sum(s["trained_tokens"] for s in first),
        "trained_tokens": sum(s["trained_tokens"] for s in first),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, no GPU"


def source_state() -> str:
    """The commit this checkout is at, and whether finetune.py or qwen_ft/ differ from it (read-only git)."""
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        changed = subprocess.run([*git, "status", "--porcelain", "finetune.py", "qwen_ft"], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit.stdout.strip()}" + (" with uncommitted changes" if changed.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--modes", default="lora,full", help="comma list of lora and full")
    parser.add_argument("--size", choices=["tiny", "2b", "7b"], default="2b", help="published widths (or tiny)")
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM layers (0: as published; not for tiny)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16-mixed", "bf16"], default="auto",
                        help="auto: fp32 on the CPU, bf16-mixed on a GPU (TRL: bf16=True)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (on a GPU: more, say 20)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the medians")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and mode, alternating the sides")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (cosine decay, no warm-up)")
    parser.add_argument("--data", choices=["uniform", "mixed"], default="uniform",
                        help="uniform: one --image-side image and --answer-words words a sample; mixed: shaped like "
                        "users' data (images of 300x300 to 1280x960, some samples with two, answers of 1 to ~300 "
                        "tokens, prompts of varied length), seeded")  # fmt: skip
    parser.add_argument("--recipe", choices=["equal", "best"], default="equal",
                        help="equal: the same settings on both sides, the same batches in the same order; best: "
                        "each side's recommended settings for speed on such data, over one epoch")  # fmt: skip
    parser.add_argument("--samples", type=int, default=32, help="samples of the epoch (--recipe best)")
    parser.add_argument("--image-side", type=int, default=448, help="image width and height (a multiple of 28)")
    parser.add_argument("--image-max-pixels", type=int, default=448 * 448,
                        help="--data mixed: images larger than this are scaled down (Qwen's smart resize), on both "
                        "sides (1003520, finetune.py's default, on a GPU)")  # fmt: skip
    parser.add_argument("--trl-batch-size", type=int, default=8,
                        help="--recipe best: TRL's samples per micro-batch (its default)")  # fmt: skip
    parser.add_argument("--packed-grad-accum", type=int, default=4,
                        help="--recipe best: finetune.py's packed micro-batches (of the longest sample's tokens) "
                        "per step")  # fmt: skip
    parser.add_argument("--answer-words", type=int, default=24, help="words per answer")
    parser.add_argument("--max-length", type=int, default=2048, help="longest sample in tokens (none is cut)")
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (finetune.py's default)")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (finetune.py's default)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (finetune.py's default)")
    parser.add_argument("--freeze-merger", action="store_true", help="freeze the merger on both sides")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers on both sides (their memory is not in the CPU figure)")  # fmt: skip
    parser.add_argument("--trl-stock-labels", action="store_true",
                        help="let TRL also train the newline after <|im_end|> (the losses then differ)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="seed on both sides")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen-ft-compare-trl",
                        help="where the model (built once), the data and the runs go")  # fmt: skip
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], Path(args.child[1]))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("lora", "full") for m in modes):
        parser.error("--modes takes lora and/or full")
    if args.image_side % PIXELS_PER_TOKEN or (args.recipe == "equal" and args.warmup >= args.steps):
        parser.error("--image-side must be a multiple of 28, and --warmup less than --steps")
    precision = args.precision if args.precision != "auto" else "bf16-mixed" if torch.cuda.is_available() else "fp32"
    if precision != "fp32" and not torch.cuda.is_available():
        parser.error("bf16 on the CPU is not what this benchmark compares: use --precision fp32")

    model = build_model(args.work_dir, args.size, args.llm_layers or None)
    count = args.samples if args.recipe == "best" else args.steps * args.batch_size * args.grad_accum
    if args.data == "mixed":
        finetune_data, trl_data = write_mixed_data(args.work_dir / f"mixed-{count}", count)
        min_pixels, max_pixels = 56 * 56, args.image_max_pixels  # finetune.py's default smallest size
    else:  # each sample once per run
        finetune_data, trl_data = write_data(args.work_dir / "data", count, args.image_side, args.answer_words)
        min_pixels = max_pixels = args.image_side**2
    spec = {
        "model": str(model), "finetune_data": str(finetune_data), "trl_data": str(trl_data),
        "work_dir": str(args.work_dir), "precision": precision, "steps": args.steps, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "lr": args.lr, "max_length": args.max_length, "min_pixels": min_pixels,
        "max_pixels": max_pixels, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout, "freeze_merger": args.freeze_merger, "num_workers": args.num_workers,
        "seed": args.seed, "trl_stock_labels": args.trl_stock_labels, "recipe": args.recipe,
        "trl_batch_size": args.trl_batch_size, "packed_grad_accum": args.packed_grad_accum,
    }  # fmt: skip
    lengths = add_lengths(spec)
    spec["max_tokens"] = max(lengths)  # finetune.py's README: packed rows of about the longest sample with sdpa
    if args.recipe == "best":
        # One epoch, no more: finetune.py's steps take whole accumulation windows, so its grad-accum divides the
        # epoch's micro-batches (the largest divisor up to --packed-grad-accum).
        micro = packed_micro_batches(spec)
        spec["packed_grad_accum"] = max(d for d in range(1, args.packed_grad_accum + 1) if micro % d == 0)
        print(f"finetune.py packs the epoch into {micro} micro-batches, {spec['packed_grad_accum']} a step")
    check_same_batches(spec)
    print(f"both sides build identical batches; {len(lengths)} samples of {min(lengths)} to {max(lengths)} tokens, "
          f"{sum(lengths) / len(lengths):.0f} on average")  # fmt: skip

    results, loads = {}, []
    for mode in modes:
        for repeat in range(args.repeats):
            for side in SIDES:
                loads.append(os.getloadavg()[0])  # the machine may be shared: say how busy it was
                run_dir = args.work_dir / "runs" / f"{args.data}-{args.recipe}-{mode}-{side}-{repeat}"
                run = run_side(side, dict(spec, mode=mode), run_dir)
                first = results.get((mode, "finetune"), [run])[0]
                if run["trainable"] != first["trainable"]:
                    differ = sorted(set(run["trainable"]) ^ set(first["trainable"]))[:5]
                    raise SystemExit(f"{mode}: the two sides trained different parameters, e.g. {differ}")
                results.setdefault((mode, side), []).append(run)
                s = summary([run], args.warmup)
                print(f"{mode} {NAMES[side]:<15} run {repeat + 1}/{args.repeats}: {s['steps_per_run']} steps, "
                      f"{s['s_per_step']:.2f} s/step (median), {s['total_tokens_per_s']:.1f} tokens/s, memory "
                      f"{s['memory_gib']:.2f} GiB, loss per trained token {s['loss_per_token']:.4f}, "
                      f"{len(run['trainable'])} trainable tensors ({run['wall_s']:.0f} s)", flush=True)  # fmt: skip
    loads.append(os.getloadavg()[0])
    report(args, modes, results, precision, lengths, loads, spec)


def report(args, modes, results, precision, lengths, loads, spec) -> None:
    cuda = torch.cuda.is_available()
    if args.recipe == "equal":
        print("\nLosses and gradient norms of the first run of each side (the same samples in the same order):")
        for mode in modes:
            ours, theirs = results[(mode, "finetune")][0]["steps"], results[(mode, "trl")][0]["steps"]
            print(f"{mode}: step | finetune.py loss | TRL loss | difference | finetune.py grad norm | TRL grad norm")
            for i, (a, b) in enumerate(zip(ours, theirs), start=1):
                print(f"  {i} | {a['loss']:.6f} | {b['loss']:.6f} | {b['loss'] - a['loss']:+.1e} "
                      f"| {a['grad_norm']:.4f} | {b['grad_norm']:.4f}")  # fmt: skip
            worst = max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(ours, theirs))
            print(f"  largest relative loss difference: {worst:.1e}")

    memory_how = "max_memory_allocated" if cuda else "peak RSS - RSS with the model loaded"
    layers = f"{args.llm_layers} LLM layers" if args.llm_layers else "all LLM layers"
    model = f"{args.size} widths, {layers}" if args.size != "tiny" else "tiny"
    if args.data == "mixed":
        data = f"mixed: {len(lengths)} samples of {min(lengths)}-{max(lengths)} tokens"
        data += f", images to {args.image_max_pixels} px"
    else:
        data = f"~{lengths[0]} tokens a sample ({(args.image_side // PIXELS_PER_TOKEN) ** 2} image)"
    recipes = {
        "finetune": f"--packing --max-tokens {spec['max_tokens']} --batch-size 64 "
        f"--grad-accum {spec['packed_grad_accum']}",
        "trl": f"group_by_length, batch {args.trl_batch_size}",
    }
    if args.recipe == "equal":
        print(f"\n| device | date | config | trainer | s/step | tokens/s | memory ({memory_how}) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    else:
        print(f"\n| device | date | config | trainer | recipe | steps | tokens/s (real) | memory ({memory_how}) "
              "| loss per trained token (epoch) |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    for mode in modes:
        trained = f"LoRA r{args.lora_r}" if mode == "lora" else "full"
        trained += ", merger frozen" if args.freeze_merger else " + merger"
        batch = f"batch {args.batch_size}x{args.grad_accum}" if args.recipe == "equal" else "one epoch"
        config = f"{model}; {trained}; {precision}; {batch}; {data}"
        s = {side: summary(results[(mode, side)], args.warmup) for side in SIDES}
        for side in SIDES:
            memory = f"{s[side]['memory_gib']:.2f} GiB"
            if not cuda:
                memory += f" (loaded: {s[side]['loaded_gib']:.2f} GiB)"
            if args.recipe == "equal":
                print(f"| {device_name()} | {datetime.date.today()} | {config} | {NAMES[side]} | "
                      f"{s[side]['s_per_step']:.2f} | {s[side]['tokens_per_s']:.1f} | {memory} |")  # fmt: skip
            else:
                print(f"| {device_name()} | {datetime.date.today()} | {config} | {NAMES[side]} | {recipes[side]} | "
                      f"{s[side]['steps_per_run']} | {s[side]['total_tokens_per_s']:.1f} | {memory} | "
                      f"{s[side]['loss_per_token']:.4f} ({s[side]['trained_tokens']} tokens) |")  # fmt: skip
        if args.recipe == "equal":
            speed = s["trl"]["s_per_step"] / s["finetune"]["s_per_step"]
        else:
            speed = s["finetune"]["total_tokens_per_s"] / s["trl"]["total_tokens_per_s"]
        memory_ratio = s["finetune"]["memory_gib"] / s["trl"]["memory_gib"]
        ratios.append(f"{mode}: finetune.py has {speed:.2f}x TRL's speed and {memory_ratio:.2f}x its memory")
    print("\n" + "; ".join(ratios) + ".")
    resets = all(run["peak_reset"] for runs in results.values() for run in runs)
    what = "Medians" if args.recipe == "equal" else "Tokens over seconds of the steps"
    print(
        f"{what} of {args.repeats} run(s) per side, the first {args.warmup} step(s) of each left out; load "
        f"average (1 min) {min(loads):.1f} to {max(loads):.1f} during the runs"
        + ("" if cuda or resets else "; the peak RSS could not be reset after loading: it includes loading")
        + "."
    )
    print(f"finetune.py: {source_state()}.")
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("trl", "transformers", "torch", "peft")
    )
    print(f"{versions}.\nCommand: {shlex.join(['python', f'bench/{Path(__file__).name}', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
