"""The one training config: a dataclass whose fields become hyphenated command-line flags."""

import argparse
import dataclasses
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path

from qwen_ft.data.formats import FORMATS
from qwen_ft.data.media_check import CHECKS
from qwen_ft.data.read import DataError, parse_columns
from qwen_ft.trackers import TRACKERS
from qwen_ft.video import VideoSettings

PRECISIONS = ("bf16-mixed", "bf16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw8bit")


class ConfigError(Exception):
    """Flags that don't fit the model or each other; str() says which and what to do."""


def option(default, help: str, **argparse_kwargs):
    """A config field: its default, its --help text and any extra argparse keywords (choices)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    # Model and data
    model: str = option("Qwen/Qwen2-VL-2B-Instruct", "hub name or local directory of a model of a supported family")
    data: str = option(
        "train_data/data.json",
        "training data: a JSON list or JSONL file, or a dataset folder or parquet file (several: a.json,b.parquet; "
        "weighted: a.json:2,b.jsonl:0.5)",
    )
    data_format: str = option(
        "auto", "format of the data files; auto: detected per file from its samples", choices=("auto", *FORMATS)
    )
    columns: str = option(
        "", "comma list KEY=COLUMN naming a dataset's columns (or a file's keys) by what they hold: question=query"
    )
    check_media: str = option(
        "header", "before training, read each image's header (size, orientation), or decode it in full", choices=CHECKS
    )
    media_root: str = option(
        ".", "folder that relative media paths are looked up in when not found beside the data file"
    )
    output_dir: str = option("output", "where the fine-tuned model, config.json and metrics.jsonl are written")
    min_pixels: int = option(56 * 56, "an image smaller than this many pixels is scaled up (Qwen's smart resize)")
    max_pixels: int = option(
        1280 * 28 * 28, "an image larger than this many pixels is scaled down (Qwen's smart resize)"
    )
    video_fps: float = option(2.0, 'frames per second taken from a video (a video part\'s "fps" overrides)')
    video_max_frames: int = option(768, 'most frames taken from one video (a video part\'s "max_frames" overrides)')
    video_max_pixels: int = option(
        768 * 28 * 28, 'largest video frame in pixels (a video part\'s "max_pixels" overrides)'
    )
    video_total_pixels: int = option(
        2048 * 28 * 28,
        'pixel budget of all frames of one video, at most budget / 784 tokens (a video part\'s "total_pixels")',
    )
    max_length: int = option(
        4096, "longest sample in tokens; text after the last image is cut, a longer image sample skipped"
    )
    attn_implementation: str = option("sdpa", "attention kernel: sdpa, eager or flash_attention_2")

    # Schedule
    epochs: int = option(1, "passes over the data (ignored when --max-steps is set)")
    max_steps: int | None = option(None, "stop after this many optimizer steps, cycling through the data as needed")
    batch_size: int = option(2, "samples per micro-batch (with --max-tokens: the most samples in one)")
    max_tokens: int | None = option(
        None,
        "form micro-batches of at most this many tokens (padding included, unless --packing), grouping samples "
        "of similar length",
    )
    packing: bool = option(
        False, "put each micro-batch's samples in one row without padding; attention stays within each sample"
    )
    grad_accum: int = option(4, "micro-batches per optimizer step")
    lr: float = option(1e-5, "peak learning rate of the LLM and of LoRA adapters; warm-up, then cosine decay to 0")
    vision_lr: float | None = option(None, "peak learning rate of the vision tower trained in full (default: --lr)")
    merger_lr: float | None = option(None, "peak learning rate of the merger trained in full (default: --lr)")
    warmup_steps: int = option(10, "optimizer steps of linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to biases and norms)")
    optim: str = option(
        "adamw",
        "adamw: torch's AdamW; adamw8bit: bitsandbytes' AdamW with 8-bit states (a quarter of the memory); "
        "paged-adamw8bit: the same, paged to CPU memory when the GPU's runs short (CUDA only)",
        choices=OPTIMIZERS,
    )
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 turns clipping off)")

    # What trains and how
    precision: str = option(
        "bf16-mixed", "bf16-mixed: fp32 weights under bf16 autocast; bf16: weights in bf16; fp32", choices=PRECISIONS
    )
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    freeze_vision: bool = option(True, "keep the vision tower's weights fixed")
    freeze_merger: bool = option(False, "keep the vision-to-language merger's weights fixed")
    freeze_llm: bool = option(False, "keep the language model's weights fixed")

    # LoRA and QLoRA (peft): adapters train, the base weights of the parts they sit in stay fixed
    lora: bool = option(False, "train LoRA adapters instead of full weights where --lora-targets puts them")
    qlora: bool = option(False, "LoRA on a base model loaded in 4-bit NF4 with double quantization (bitsandbytes)")
    lora_r: int = option(64, "rank of the adapters")
    lora_alpha: int = option(16, "adapter scale numerator: the update is scaled by alpha / r")
    lora_dropout: float = option(0.05, "dropout on the adapters' input")
    lora_targets: str = option(
        "llm",
        "comma list of what gets adapters: parts (llm: its attention and MLP projections; vision; merger) "
        "and/or layer names (q_proj, qkv, ...)",
    )
    dora: bool = option(False, "weight-decomposed LoRA (DoRA) adapters")

    # Distributed (finetune_distributed.py)
    fsdp: bool = option(
        False, "shard weights, gradients and optimizer state over the GPUs (FSDP2), for full fine-tuning"
    )

    # Checkpoints and faults
    save_every: int = option(500, "write a checkpoint every this many optimizer steps (0: only on SIGTERM/SIGINT)")
    keep_last: int = option(2, "checkpoints kept; older ones are removed once a newer one is complete")
    resume: str | None = option(
        None,
        "resume from the latest checkpoint in --output-dir, or from the checkpoint folder given",
        nargs="?",
        const="latest",
        metavar="PATH",
    )
    full_disk_wait: float = option(
        60.0,
        "when the disk is full at the final save, minutes to wait for room (trying again every 30 s, the trained "
        "weights kept in memory) before giving up",
    )
    max_bad_steps: int = option(5, "stop after this many steps in a row with a non-finite loss or gradient")
    skip_bad_samples: bool = option(False, "skip a sample whose media fails to load during training (else stop)")
    trust_remote_code: bool = option(False, "let transformers run code that comes with the model (off: only its own)")

    # Evaluation and reports
    eval_data: str | None = option(
        None, "held-out data in --data's format; its mean loss per trained token is logged as eval_loss"
    )
    eval_every: int = option(
        0, "evaluate every this many optimizer steps, besides before the first and after the last (0: only those)"
    )
    eval_generate: int = option(
        0, "at each evaluation, answer the first N eval samples greedily; scores and answers go to OUTPUT_DIR/eval/"
    )
    save_best: bool = option(
        False, "at each evaluation that lowers the eval loss, save a checkpoint and keep it besides --keep-last"
    )
    report_to: str = option("", f"comma list of trackers that get every metrics.jsonl record: {', '.join(TRACKERS)}")

    # Run
    seed: int = option(42, "seed for weights init of new modules, data order and dropout")
    shuffle: bool = option(True, "shuffle the data each epoch")
    num_workers: int = option(2, "DataLoader worker processes that load images and tokenize")

    def __post_init__(self):
        positive = ["epochs", "batch_size", "grad_accum", "max_length", "min_pixels", "max_pixels", "video_max_frames"]
        positive += ["keep_last", "max_bad_steps"]
        optional = [name for name in ("max_steps", "max_tokens") if getattr(self, name) is not None]
        for name in positive + optional:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"--min-pixels {self.min_pixels} is larger than --max-pixels {self.max_pixels}")
        if self.video_fps <= 0 or self.video_max_pixels < self.min_pixels:
            raise ValueError("--video-fps must be positive and --video-max-pixels at least --min-pixels")
        try:
            parse_columns(self.columns)
        except DataError as e:
            raise ValueError(str(e)) from None
        if self.eval_every < 0 or self.eval_generate < 0:
            raise ValueError("--eval-every and --eval-generate must not be negative")
        if not self.eval_data and (self.eval_every or self.eval_generate or self.save_best):
            raise ValueError("--eval-every, --eval-generate and --save-best need --eval-data")
        unknown = set(self.trackers()) - set(TRACKERS)
        if unknown:
            raise ValueError(
                f"--report-to: unknown tracker {', '.join(sorted(unknown))} (known: {', '.join(TRACKERS)})"
            )
        if self.qlora:
            self.lora = True  # QLoRA is LoRA on a 4-bit base
        if self.fsdp and self.lora:
            raise ValueError("--fsdp is for full fine-tuning; LoRA and QLoRA runs fit one GPU each and use DDP")
        self.check_numbers()

    def check_numbers(self) -> None:
        """Numbers out of range are usage errors here, not a traceback or non-finite weights hours later."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # argparse takes "nan", "inf" and 1e999
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("lr", "vision_lr", "merger_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                # AdamW moves each weight by up to about lr a step: above 1, it steps past anything pretrained
                # (and past fp32's range from about 3e38).
                raise ValueError(f"--{name.replace('_', '-')} must be above 0 and at most 1, got {value}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be at least 0 and below 1, got {self.lora_dropout}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "save_every", "full_disk_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")

    def video(self) -> VideoSettings:
        """The defaults for a sample's video parts."""
        return VideoSettings(
            fps=self.video_fps,
            max_frames=self.video_max_frames,
            min_pixels=self.min_pixels,
            max_pixels=self.video_max_pixels,
            total_pixels=self.video_total_pixels,
        )

    def frozen(self) -> dict[str, bool]:
        """Which parts --freeze-vision, --freeze-merger and --freeze-llm keep as loaded."""
        return {"vision": self.freeze_vision, "merger": self.freeze_merger, "llm": self.freeze_llm}

    def reading(self) -> dict:
        """read_samples' keywords for this run's data and eval data."""
        data_format = None if self.data_format == "auto" else self.data_format
        return {"media_root": self.media_root, "data_format": data_format, "columns": parse_columns(self.columns)}

    def trackers(self) -> list[str]:
        return [name.strip() for name in self.report_to.split(",") if name.strip()]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def _value_type(annotation):
    """The argparse type of a field: `int | None` parses as int."""
    if isinstance(annotation, types.UnionType):
        return next(t for t in annotation.__args__ if t is not type(None))
    return annotation


def build_parser(
    description: str | None = None, only: tuple[str, ...] | None = None, config: type = Config
) -> argparse.ArgumentParser:
    """The flags of every field of config (Config, or a loop's subclass with its own fields), or of the fields
    named in `only` (the tools that use a few)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {k: v for k, v in f.metadata.items()}
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **kwargs)
        else:
            parser.add_argument(flag, type=_value_type(f.type), default=f.default, **kwargs)
    return parser


def parse_config(argv: list[str] | None = None, description: str | None = None, config: type = Config) -> Config:
    parser = build_parser(description, config=config)
    args = parser.parse_args(argv)
    if args.lora and args.qlora:
        parser.error("--lora and --qlora: pass one (--qlora is LoRA on a 4-bit base)")
    try:
        return config(**vars(args))
    except ValueError as e:
        parser.error(str(e))
