"""Build a tiny random Qwen vision-language checkpoint offline: `python -m qwen_ft.tiny OUT_DIR [--family F]`.

The families: qwen2-vl (the default), qwen2.5-vl, qwen3-vl, qwen3-vl-moe and qwen3.5. The result is a
complete model directory (config, safetensors weights, tokenizer with Qwen's special tokens and the
family's chat template, image and video processor configs, generation config), loaded by the same
`from_pretrained` code that loads a real model of that family. It is small enough for a training step
to take a fraction of a second on the CPU.

`--reuse` keeps a directory that already holds this very build (same seed, family, size and builder
code) instead of writing it again: `MODEL=tiny ./finetune.sh` builds its model once, in a cache folder,
so that tiny runs can be resumed and their outputs name a model that still exists.

`--size` (2b, 3b, 4b, 7b, 8b, as the family publishes them) writes a published model's shapes instead,
with random weights and the same tiny tokenizer: for benchmarks of speed and memory
(bench/train_throughput.py), which depend on the shapes and not on what the weights hold.
"""

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
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
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen's special tokens, in the order the real tokenizers number them (Qwen3.5 adds more we don't use).
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
# Qwen3's reasoning markers: ordinary added tokens (not special, so decoding keeps them).
THINK_TOKENS = ["<think>", "</think>"]

# A message's content parts, as every Qwen chat template renders them.
CONTENT_PARTS = (
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
)
COUNTERS = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"

# Qwen2-VL-Instruct's chat template, unchanged (Qwen2.5-VL's is the same): a default system prompt.
CHAT_TEMPLATE = (
    COUNTERS + "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}" + CONTENT_PARTS + "<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Renders a message's content, a string or a list of parts, as Qwen3's templates do (with a macro).
RENDER_MACRO = (
    "{% macro render(parts) %}{% if parts is string %}{{ parts }}{% else %}"
    + CONTENT_PARTS.replace("message['content']", "parts")
    + "{% endif %}{% endmacro %}"
)

# What Qwen3-VL-Instruct's template renders for conversations without tools: no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    COUNTERS + RENDER_MACRO + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ render(message['content']) }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What Qwen3.5's template renders for conversations without tools: contents trimmed, and the assistant
# turns after the last user turn open with a (here empty) thinking block, as does the generation prompt
# (left open unless enable_thinking=False).
QWEN3_5_CHAT_TEMPLATE = (
    COUNTERS + RENDER_MACRO + "{% set last = namespace(user=-1) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set last.user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and loop.index0 > last.user %}<think>\n\n</think>\n\n{% endif %}"
    "{{ render(message['content']) | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
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


@dataclass(frozen=True)
class Recipe:
    """How one family's checkpoint is put together: its transformers classes, chat template, the
    processors' patch size and normalisation, and its tiny and published shapes."""

    config: type
    model: type
    processor: type
    video_processor: type
    chat_template: str
    tiny_text: dict
    tiny_vision: dict
    sizes: dict = field(default_factory=dict)  # published shapes: {"2b": {"text": ..., "vision": ..., "tie": ...}}
    patch_size: int = 14
    image_mean: tuple | None = None  # None: the processor's default (OpenAI CLIP's)
    tokenizer: type = Qwen2Tokenizer
    think_tokens: bool = False


TINY_TEXT = dict(
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
# Qwen3's text models interleave the three M-RoPE blocks and name their head size.
TINY_QWEN3_TEXT = dict(
    TINY_TEXT,
    head_dim=32,
    rope_parameters=dict(TINY_TEXT["rope_parameters"], mrope_interleaved=True),
)
# The tiny vision towers: 2 blocks, 128 wide, output 128 wide (the LLM's width).
TINY_QWEN3_VISION = dict(
    depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, num_position_embeddings=256
)
QWEN2_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
QWEN3_ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}


def qwen3_vl_size(hidden, intermediate, layers, tie, vision_depth, vision_hidden, vision_intermediate, deepstack):
    """A published Qwen3-VL shape: 32 query and 8 key-value heads of 128 (16 for the 2B), 16 vision heads."""
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, head_dim=128,
                num_attention_heads=16 if hidden == 2048 else 32, num_key_value_heads=8, vocab_size=151936,
                rope_parameters=QWEN3_ROPE, max_position_embeddings=262144)  # fmt: skip
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_heads=16,
                  out_hidden_size=hidden, num_position_embeddings=2304, deepstack_visual_indexes=deepstack)  # fmt: skip
    return dict(text=text, vision=vision, tie=tie)


def qwen2_5_vl_size(hidden, intermediate, layers, heads, kv_heads, vocab, tie):
    """A published Qwen2.5-VL shape; every size has the same 32-block vision tower."""
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rope_parameters=QWEN2_ROPE,
                max_position_embeddings=128000)  # fmt: skip
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=hidden,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)  # fmt: skip
    return dict(text=text, vision=vision, tie=tie)


# The published shapes come from the config.json of each Qwen/*-Instruct model (2b: Qwen2-VL-2B, ...).
QWEN2_VL_SIZES = {
    "2b": dict(
        text=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_parameters=QWEN2_ROPE,
        ),  # fmt: skip
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        tie=True,
    ),
    "7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_parameters=QWEN2_ROPE,
        ),  # fmt: skip
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        tie=False,
    ),
}
FAMILIES = {
    "qwen2-vl": Recipe(
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        CHAT_TEMPLATE,
        tiny_text=TINY_TEXT,
        tiny_vision=dict(depth=2, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=2),
        sizes=QWEN2_VL_SIZES,
    ),
    "qwen2.5-vl": Recipe(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
        CHAT_TEMPLATE,
        tiny_text=TINY_TEXT,
        # Window attention in the first block, full attention in the second, as in the real tower.
        tiny_vision=dict(
            depth=2,
            hidden_size=128,
            out_hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),  # fmt: skip
        sizes={
            "3b": qwen2_5_vl_size(2048, 11008, 36, 16, 2, 151936, tie=True),
            "7b": qwen2_5_vl_size(3584, 18944, 28, 28, 4, 152064, tie=False),
        },
    ),
    "qwen3-vl": Recipe(
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        QWEN3_VL_CHAT_TEMPLATE,
        tiny_text=TINY_QWEN3_TEXT,
        tiny_vision=dict(TINY_QWEN3_VISION, deepstack_visual_indexes=[0, 1]),  # a deepstack merger per block
        sizes={
            "2b": qwen3_vl_size(2048, 6144, 28, True, 24, 1024, 4096, [5, 11, 17]),
            "4b": qwen3_vl_size(2560, 9728, 36, True, 24, 1024, 4096, [5, 11, 17]),
            "8b": qwen3_vl_size(4096, 12288, 36, False, 27, 1152, 4304, [8, 16, 24]),
        },
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
    ),
    "qwen3-vl-moe": Recipe(
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        QWEN3_VL_CHAT_TEMPLATE,
        # Every decoder layer's MLP is 4 experts of which each token uses 2.
        tiny_text=dict(TINY_QWEN3_TEXT, moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2),
        tiny_vision=dict(TINY_QWEN3_VISION, deepstack_visual_indexes=[0, 1]),
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
    ),
    "qwen3.5": Recipe(
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        QWEN3_5_CHAT_TEMPLATE,
        # Three gated delta-net (linear attention) layers, then one of full attention, as in the real ones;
        # a quarter of each head's dimensions rotate, in interleaved M-RoPE blocks of [3, 3, 2] frequencies.
        tiny_text=dict(
            TINY_TEXT,
            head_dim=64,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10.0,
                "mrope_section": [3, 3, 2],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.25,
            },  # fmt: skip
        ),
        tiny_vision=TINY_QWEN3_VISION,
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
        tokenizer=Qwen3_5Tokenizer,
        think_tokens=True,
    ),
}
SIZES = sorted({size for recipe in FAMILIES.values() for size in recipe.sizes})


def make_config(tokenizer, family: str = "qwen2-vl", size: str = "tiny", llm_layers: int | None = None):
    """The model config for this tokenizer's special tokens: tiny, or the published shapes of a size
    (with llm_layers decoder layers instead of its own, for benchmarks that need the widths only)."""
    recipe = FAMILIES[family]
    if size != "tiny" and size not in recipe.sizes:
        raise ValueError(f"{family} has no size {size!r}: {', '.join(['tiny', *recipe.sizes])}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if size == "tiny":
        text = dict(recipe.tiny_text, vocab_size=(len(tokenizer) + 63) // 64 * 64)
        vision, tie_word_embeddings = recipe.tiny_vision, False
    else:
        shape = recipe.sizes[size]
        text = dict(shape["text"], max_position_embeddings=shape["text"].get("max_position_embeddings", 32768))
        vision, tie_word_embeddings = shape["vision"], shape["tie"]
    if llm_layers:
        text["num_hidden_layers"] = llm_layers
    return recipe.config(
        text_config=dict(
            **text,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(**vision, patch_size=recipe.patch_size, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tokenizer(family: str = "qwen2-vl", vocab_size: int = 640):
    """A byte-level BPE tokenizer of the family's class with Qwen's special tokens and the family's chat template."""
    recipe = FAMILIES[family]
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
    tokenizer = recipe.tokenizer(vocab=learned["vocab"], merges=merges, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    if recipe.think_tokens:
        tokenizer.add_tokens(THINK_TOKENS)
    tokenizer.chat_template = recipe.chat_template
    tokenizer.model_max_length = 32768
    return tokenizer


# Written last into a built directory: what it was built from, so that --reuse can tell a complete build
# of the same recipe from a partial or outdated one.
RECIPE_FILE = "qwen_ft_tiny.json"


def recipe(seed: int, family: str, size: str, llm_layers: int | None) -> dict:
    """Everything the written files depend on; the builder's own code and the library versions included."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {"seed": seed, "family": family, "size": size, "llm_layers": llm_layers, "builder": code,
            "transformers": transformers.__version__, "torch": torch.__version__}  # fmt: skip


def build(
    out_dir: str | Path,
    seed: int = 0,
    family: str = "qwen2-vl",
    size: str = "tiny",
    reuse: bool = False,
    llm_layers: int | None = None,
) -> Path:
    """Write the checkpoint; a size other than "tiny" gives a published model's shapes instead (bf16 weights,
    initialised on the GPU when there is one: 7B in fp32 on the CPU would take 33 GB).

    With reuse, a directory that already holds this recipe's build is kept as it is; otherwise the
    build is written beside it and renamed into place, so that a build cut short is never reused and
    two processes building at once both end with a complete one.
    """
    out_dir = Path(out_dir)
    if not reuse:
        write(out_dir, seed, family, size, llm_layers)
        return out_dir
    try:
        if json.loads((out_dir / RECIPE_FILE).read_text()) == recipe(seed, family, size, llm_layers):
            return out_dir
    except (OSError, ValueError):  # not built yet, or cut short
        pass
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging, seed, family, size, llm_layers)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        staging.rename(out_dir)
    except OSError:  # another process renamed its build into place first: the same files
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def write(out_dir: Path, seed: int, family: str, size: str, llm_layers: int | None) -> None:
    """The checkpoint's files, RECIPE_FILE last."""
    family_recipe = FAMILIES[family]
    tokenizer = build_tokenizer(family)
    config = make_config(tokenizer, family, size, llm_layers)
    torch.manual_seed(seed)
    if size == "tiny":
        model = family_recipe.model(config)
        # At the usual init std of 0.02 the output head caps every logit near |h| * |w| = 11 * 0.23, so
        # a model whose head stays frozen (LoRA) could never grow confident. A trained head has a far
        # wider margin; give the tiny one enough to learn with.
        torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    else:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = family_recipe.model._from_config(config, dtype=torch.bfloat16)
    end_of_text, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text], pad_token_id=end_of_text
    )
    model.save_pretrained(out_dir)
    normalisation = {}
    if family_recipe.image_mean:
        normalisation = dict(image_mean=list(family_recipe.image_mean), image_std=list(family_recipe.image_mean))
    processor = family_recipe.processor(
        image_processor=Qwen2VLImageProcessor(patch_size=family_recipe.patch_size, **normalisation),
        video_processor=family_recipe.video_processor(patch_size=family_recipe.patch_size, **normalisation),
        tokenizer=tokenizer,
        chat_template=family_recipe.chat_template,
    )
    processor.save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe(seed, family, size, llm_layers), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--family", choices=list(FAMILIES), default="qwen2-vl", help="model family")
    parser.add_argument(
        "--size",
        choices=["tiny", *SIZES],
        default="tiny",
        help="tiny, or a published size of the family: "
        + "; ".join(f"{name} {', '.join(r.sizes)}" for name, r in FAMILIES.items() if r.sizes),
    )
    parser.add_argument("--llm-layers", type=int, help="decoder layers instead of the size's own")
    parser.add_argument(
        "--reuse", action="store_true", help="keep out_dir as it is if it already holds this exact build"
    )
    args = parser.parse_args()
    if args.size != "tiny" and args.size not in FAMILIES[args.family].sizes:
        parser.error(f"{args.family} has no size {args.size}: its sizes are {', '.join(FAMILIES[args.family].sizes)}")
    print(build(args.out_dir, args.seed, args.family, args.size, args.reuse, args.llm_layers))


if __name__ == "__main__":
    main()
