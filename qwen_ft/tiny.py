"""Build a tiny random Qwen2-VL checkpoint offline: `python -m qwen_ft.tiny OUT_DIR`.

The result is a complete model directory (config, safetensors weights, tokenizer with
Qwen's special tokens and chat template, image and video processor configs, generation
config), loaded by the same `from_pretrained` code that loads a real Qwen2-VL model.
It is small enough for a training step to take a fraction of a second on the CPU.

`--reuse` keeps a directory that already holds this very build (same seed, family, size and builder
code) instead of writing it again: `MODEL=tiny ./finetune.sh` builds its model once, in a cache folder,
so that tiny runs can be resumed and their outputs name a model that still exists.

`--size 2b` or `--size 7b` writes the published Qwen2-VL shapes instead, with random weights and
the same tiny tokenizer: for benchmarks of speed and memory (bench/train_throughput.py), which
depend on the shapes and not on what the weights hold.
"""

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen2-VL's special tokens, in the order the real tokenizer numbers them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template, unchanged.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tokenizer's merges are learned from. Any text still tokenizes (byte-level BPE);
# these words just get short encodings.
CORPUS = """
system user assistant You are a helpful assistant.
What colour is the shape? What shape is in the image? Where is the shape? Describe the image.
What colour is the shape in the first image? Which image shows the larger shape?
How many shapes are there? Is the shape moving? Which way does the shape move?
red green blue yellow purple orange white black grey circle square triangle star
top left top right bottom left bottom right centre center middle up down left right
the first the second one two three four five six seven eight nine ten zero yes no
a an of in on at to and or is are was it this that image picture video frame shape
The quick brown fox jumps over the lazy dog. Hello world! 0123456789 ,.;:?!'"()[]{}<>-_/
"""


def build_tokenizer(vocab_size: int = 640) -> Qwen2Tokenizer:
    trainer_model = Tokenizer(models.BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainer_model.train_from_iterator(CORPUS.splitlines() * 8, trainer=trainer)
    learned = json.loads(trainer_model.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=learned["vocab"], merges=merges, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


# The tiny vision tower of each architecture: 2 blocks, 128 wide, output 128 wide (the LLM's width).
VISION_CONFIGS = {
    "qwen2-vl": dict(depth=2, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=2),
    "qwen2.5-vl": dict(
        depth=2,
        hidden_size=128,
        out_hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    ),
}
TINY_TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    # M-RoPE gives time, height and width a block of rotary frequencies each ([4, 6, 6] of 16).
    # Qwen's theta of 1e6 (made for 32k-token contexts) leaves the width block of a 32-dim head
    # with angles too small to tell image columns apart; a theta of 10 suits ~100-token samples.
    rope_parameters={"rope_type": "default", "rope_theta": 10.0, "mrope_section": [4, 6, 6]},
)
ARCHITECTURES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
}

# The published Qwen2-VL sizes (the config.json of Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct), for
# measuring speed and memory, which depend on the shapes and not on the weights' values. Their
# tokenizer is still the tiny one: only the embedding's and output head's shapes matter.
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
FULL_SIZES = {
    "2b": dict(
        text=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
        ),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        tie_word_embeddings=True,
    ),
    "7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        tie_word_embeddings=False,
    ),
}


def make_config(tokenizer, arch: str = "qwen2-vl", size: str = "tiny", llm_layers: int | None = None):
    """The model config for this tokenizer's special tokens: tiny, or the published shapes of a size
    (with llm_layers decoder layers instead of its own, for benchmarks that need the widths only)."""
    if size != "tiny" and arch != "qwen2-vl":
        raise ValueError(f"size {size!r} exists for qwen2-vl only")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if size == "tiny":
        text = dict(TINY_TEXT_CONFIG, vocab_size=(len(tokenizer) + 63) // 64 * 64)
        vision, tie_word_embeddings = VISION_CONFIGS[arch], False
    else:
        full = FULL_SIZES[size]
        text = dict(full["text"], max_position_embeddings=32768, rope_parameters=QWEN_ROPE)
        vision, tie_word_embeddings = full["vision"], full["tie_word_embeddings"]
    if llm_layers:
        text["num_hidden_layers"] = llm_layers
    return ARCHITECTURES[arch][0](
        text_config=dict(
            **text,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(**vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


# Written last into a built directory: what it was built from, so that --reuse can tell a complete build
# of the same recipe from a partial or outdated one.
RECIPE_FILE = "qwen_ft_tiny.json"


def recipe(seed: int, arch: str, size: str, llm_layers: int | None) -> dict:
    """Everything the written files depend on; the builder's own code and the library versions included."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {"seed": seed, "arch": arch, "size": size, "llm_layers": llm_layers, "builder": code,
            "transformers": transformers.__version__, "torch": torch.__version__}  # fmt: skip


def build(
    out_dir: str | Path,
    seed: int = 0,
    arch: str = "qwen2-vl",
    size: str = "tiny",
    reuse: bool = False,
    llm_layers: int | None = None,
) -> Path:
    """Write the checkpoint; size "2b" or "7b" gives the published Qwen2-VL shapes instead (bf16 weights,
    initialised on the GPU when there is one: 7B in fp32 on the CPU would take 33 GB).

    With reuse, a directory that already holds this recipe's build is kept as it is; otherwise the
    build is written beside it and renamed into place, so that a build cut short is never reused and
    two processes building at once both end with a complete one.
    """
    out_dir = Path(out_dir)
    if not reuse:
        write(out_dir, seed, arch, size, llm_layers)
        return out_dir
    try:
        if json.loads((out_dir / RECIPE_FILE).read_text()) == recipe(seed, arch, size, llm_layers):
            return out_dir
    except (OSError, ValueError):  # not built yet, or cut short
        pass
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging, seed, arch, size, llm_layers)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        staging.rename(out_dir)
    except OSError:  # another process renamed its build into place first: the same files
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def write(out_dir: Path, seed: int, arch: str, size: str, llm_layers: int | None) -> None:
    """The checkpoint's files, RECIPE_FILE last."""
    _, model_class, processor_class = ARCHITECTURES[arch]
    tokenizer = build_tokenizer()
    config = make_config(tokenizer, arch, size, llm_layers)
    torch.manual_seed(seed)
    if size == "tiny":
        model = model_class(config)
        # At the usual init std of 0.02 the output head caps every logit near |h| * |w| = 11 * 0.23, so
        # a model whose head stays frozen (LoRA) could never grow confident. A trained head has a far
        # wider margin; give the tiny one enough to learn with.
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    else:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = model_class._from_config(config, dtype=torch.bfloat16)
    end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text], pad_token_id=end_of_text
    )
    model.save_pretrained(out_dir)
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe(seed, arch, size, llm_layers), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="qwen2-vl", help="model family")
    parser.add_argument(
        "--size", choices=["tiny", *FULL_SIZES], default="tiny", help="tiny, or a published Qwen2-VL size"
    )
    parser.add_argument("--llm-layers", type=int, help="decoder layers instead of the size's own")
    parser.add_argument(
        "--reuse", action="store_true", help="keep out_dir as it is if it already holds this exact build"
    )
    args = parser.parse_args()
    if args.size != "tiny" and args.arch != "qwen2-vl":
        parser.error(f"--size {args.size} exists for qwen2-vl only")
    print(build(args.out_dir, args.seed, args.arch, args.size, args.reuse, args.llm_layers))


if __name__ == "__main__":
    main()
