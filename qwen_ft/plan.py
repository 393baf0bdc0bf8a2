"""Peak memory before launch: `python -m qwen_ft.plan [finetune.py's flags] [--device-memory 80GB] [--json]`.

    python -m qwen_ft.plan --model Qwen/Qwen2-VL-7B-Instruct --data train_data/data.json --lora --device-memory 24GB

It reads the model's config.json (the model is built on PyTorch's meta device, set up as the run would set
it up: frozen parts, LoRA adapters, QLoRA's 4-bit layers, dtypes; so every parameter's shape and dtype is
exact and no weight is read) and the data's token counts (from the data index beside --output-dir, or by
the check a run's start makes), and predicts the most bytes that tensors hold at once on one device: what
torch.cuda.max_memory_allocated reports, without the CUDA context and the allocator's unused cache.

The parts:
- weights, by dtype and quantisation (4-bit: half a byte a value, a byte per block of 64 and its scales);
- gradients: one per trained parameter, in its dtype;
- optimizer states: AdamW's two moments in the parameter's dtype, or 8-bit ones (a byte each, an fp32
  scale per block of 256; tensors under 4,096 values keep fp32 states);
- activations: what autograd keeps for the backward pass over the largest micro-batch, from each decoder
  layer's shapes (the tensors each of its operations saves; with --gradient-checkpointing each layer's input
  and one layer recomputed at a time);
- logits: those of the trained positions, with their gradient and the chunked cross-entropy's fp32 copies;
- vision tower: the tensors its forward pass makes at once when it is frozen (or what it keeps when it trains);
- under DDP, its gradient buckets (a second copy of the gradients); under FSDP2, each rank's shard of the
  weights, gradients and states, with the layers gathered whole for the forward and backward passes.

They do not all peak together: the states stay, and the peak is the largest of the moments a step goes
through (the vision forward, the start of the backward pass with every activation alive, its end with every
gradient), which the plan names. When the peak doesn't fit the device, it tries the changes that lower it
(gradient checkpointing, --max-tokens, 8-bit states, LoRA, QLoRA, FSDP over more devices) and prints the
prediction of each. The activation model follows the kernels the run uses (sdpa's memory-efficient path:
no attention matrix); bench/memory_profile.py measures the real peak to hold it against.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from qwen_ft.config import Config, ConfigError, build_parser
from qwen_ft.data.batching import BatchPlan
from qwen_ft.model import ModelUnavailable, part_of
from qwen_ft.optim import MIN_8BIT_SIZE, STATE_BLOCK

GIB = 2**30
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "uint8"}
FIT_FRACTION = 0.9  # of the device's memory that tensors may use: the rest is the CUDA context and the cache
CROSS_ENTROPY_CHUNK = 1024  # finetune.cross_entropy_sum's tokens per chunk
BATCH_BYTES_PER_TOKEN = 8 * 8  # input ids, labels, mask and positions: int64 each
PIXEL_VALUES_PER_PATCH = 3 * 2 * 14 * 14  # Qwen's patch: 3 colours x 2 frames x 14 x 14 (16 x 16 for Qwen3)


@dataclass(frozen=True)
class MicroBatch:
    """What the activations depend on: the positions computed (rows x longest row, padding included), the
    trained tokens (where logits are computed), the vision patches, and whether attention needs a mask."""

    rows: int
    row_length: int
    trained: int
    patches: int
    masked: bool

    @property
    def positions(self) -> int:
        return self.rows * self.row_length


@dataclass
class Prediction:
    parts: dict  # name -> bytes
    peak_bytes: int
    at_peak: list  # the parts that the peak holds together
    notes: dict  # name -> a short description of the part


# ---------------------------------------------------------------------------------------------------------
# The model, built on the meta device as the run sets it up.


def plan_model(cfg: Config):
    """The model of cfg, on the meta device, with what trains, LoRA, QLoRA's 4-bit layers and the dtypes the
    run would give it (finetune.py's set-up); config.json is the only file read."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from qwen_ft.lora import as_trained, quantization_config

    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelUnavailable(f"model '{cfg.model}': {e}") from None
    dtype = {"fp32": torch.float32, "auto": getattr(config, "dtype", None) or torch.float32}.get(
        cfg.precision, torch.bfloat16
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
        )
    if cfg.qlora:  # the layers transformers would load in 4 bits, as bitsandbytes' modules (unquantized on meta)
        quantization = quantization_config(cfg.frozen())
        model = replace_with_bnb_linear(model, quantization.llm_int8_skip_modules, quantization)
        model.is_loaded_in_4bit = True
    return as_trained(model, cfg)


def four_bit_bytes(values: int) -> int:
    """A 4-bit NF4 weight with double quantization: two values a byte, a byte per block of 64 values (the
    quantized scale), an fp32 scale per 256 of those, and its small tables (256 + 16 fp32 values, an offset)."""
    blocks = -(-values // 64)
    return values // 2 + blocks + 4 * -(-blocks // 256) + 4 * (256 + 16 + 1)


def tensors(model):
    """Each parameter and buffer once (tied weights are one), with its module and its name in the model."""
    seen = set()
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield f"{module_name}.{name}".lstrip("."), tensor


def quantized_values(tensor) -> int | None:
    """The values of a bitsandbytes 4-bit weight (its real shape: once loaded, two share a byte), or None."""
    if type(tensor).__name__ != "Params4bit":
        return None
    quant_state = getattr(tensor, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else tensor.numel()


def model_bytes(model, optim: str) -> tuple[dict, dict]:
    """Bytes of the weights (by dtype and quantisation), the gradients and the optimizer's states, and
    parameter counts (total, trained)."""
    parts, counts = Counter(), Counter()
    for name, tensor in tensors(model):
        values = quantized_values(tensor)
        if values is not None:
            parts["weights 4-bit"] += four_bit_bytes(values)
        else:
            values = tensor.numel()
            parts[f"weights {DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))}"] += values * tensor.element_size()
        if not isinstance(tensor, torch.nn.Parameter) or ".original_module." in f".{name}.":
            continue  # a buffer, or peft's frozen original of a module it trains a copy of: no count
        counts["parameters"] += values
        if tensor.requires_grad:
            counts["trained"] += values
            parts["gradients"] += values * tensor.element_size()
            parts["optimizer states"] += optimizer_state_bytes(tensor, optim)
    if optim != "adamw" and counts["trained"]:
        parts["optimizer states"] += 2 * 256 * 4  # the two quantization maps, shared by every tensor
    return dict(parts), dict(counts)


def optimizer_state_bytes(param, optim: str) -> int:
    """AdamW's states of one parameter: two moments in its dtype and a 4-byte step (torch's), or bitsandbytes'
    8-bit moments with an fp32 scale per block (fp32 moments for a tensor under MIN_8BIT_SIZE values)."""
    values = param.numel()
    if optim == "adamw":
        return 2 * values * param.element_size() + 4
    if values < MIN_8BIT_SIZE:
        return 2 * values * 4
    return 2 * values + 2 * 4 * -(-values // STATE_BLOCK)


# ---------------------------------------------------------------------------------------------------------
# Activations, logits and the vision tower, from the shapes.


@dataclass(frozen=True)
class Shapes:
    hidden: int
    query: int  # heads x head size
    key: int  # key-value heads x head size
    heads: int
    head_dim: int
    intermediate: int  # of a dense MLP, or of the experts a token goes to (all of them)
    layers: int
    vocab: int
    qk_norm: bool  # Qwen3's norms on queries and keys
    linear_attention: int  # Qwen3.5's gated delta-net layers among `layers`
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_gated: bool
    patch: int
    deepstack: int


def shapes_of(model) -> Shapes:
    config = model.config
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    intermediate = text.intermediate_size
    if getattr(text, "num_experts", None):
        intermediate = text.moe_intermediate_size * text.num_experts_per_tok
    layer_types = getattr(text, "layer_types", None) or []
    vision_hidden = getattr(vision, "embed_dim", None) or vision.hidden_size
    vision_intermediate = getattr(vision, "intermediate_size", None) or int(vision_hidden * vision.mlp_ratio)
    return Shapes(
        hidden=text.hidden_size,
        query=text.num_attention_heads * head_dim,
        key=text.num_key_value_heads * head_dim,
        heads=text.num_attention_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        qk_norm=config.model_type.startswith("qwen3"),
        linear_attention=sum(kind == "linear_attention" for kind in layer_types),
        vision_hidden=vision_hidden,
        vision_intermediate=vision_intermediate,
        vision_depth=vision.depth,
        vision_gated=config.model_type == "qwen2_5_vl",
        patch=vision.patch_size,
        deepstack=len(getattr(vision, "deepstack_visual_indexes", None) or []),
    )


@dataclass(frozen=True)
class Training:
    """What decides which tensors autograd keeps, read from the set-up model."""

    compute: int  # bytes of a matmul's inputs and outputs: 2 under bf16 autocast or bf16 weights, 4 in fp32
    residual: int  # bytes of the residual stream: 4 unless the weights are bf16
    llm_weights: bool  # the decoder layers' own weights train
    adapter_inputs: tuple  # input widths of one decoder layer's LoRA adapters
    lora_rank: int
    lora_dropout: bool
    vision_trains: bool
    merger_trains: bool
    head_grad: int  # bytes of the output head's gradient, made at the start of the backward pass
    checkpointing: bool
    eager: bool
    grad_accum: int


def training_of(model, cfg: Config) -> Training:
    trained = {part_of(name) for name, p in model.named_parameters() if p.requires_grad}
    layer_params = [(n, p) for n, p in model.named_parameters() if ".layers.0." in n and part_of(n) != "vision"]
    adapters = [p.shape[1] for n, p in layer_params if "lora_A" in n]
    head = model.get_output_embeddings()
    head_grad = head.weight.numel() * head.weight.element_size() if head.weight.requires_grad else 0
    return Training(
        compute=4 if cfg.precision == "fp32" else 2,
        residual=2 if cfg.precision == "bf16" else 4,
        llm_weights=any(p.requires_grad and "lora_" not in n for n, p in layer_params),
        adapter_inputs=tuple(adapters),
        lora_rank=cfg.lora_r,
        lora_dropout=cfg.lora_dropout > 0,
        vision_trains="vision" in trained or any("lora_" in n and ".visual." in n for n, _ in model.named_parameters()),
        merger_trains="merger" in trained,
        head_grad=head_grad,
        checkpointing=cfg.gradient_checkpointing,
        eager=cfg.attn_implementation == "eager",
        grad_accum=cfg.grad_accum,
    )


def layer_bytes_per_position(s: Shapes, t: Training, linear_attention: bool = False) -> float:
    """Bytes one decoder layer keeps for the backward pass, per position of the micro-batch.

    Each RMSNorm keeps its fp32 input and, where its weight trains, its normalized output; each linear layer
    whose weight trains keeps its input; frozen ones keep nothing (their weight serves the backward pass).
    Attention keeps the rotated queries and keys, the values, its output and the softmax statistics; the
    dense MLP its gate, up and activation outputs, and the down projection's input if it trains. A LoRA
    adapter keeps its (dropped-out) input, the dropout's mask and its rank-r middle."""
    c, r, H, Q, K, M = t.compute, t.residual, s.hidden, s.query, s.key, s.intermediate
    norms = 2 * (4 * H + 4 + (r * H + c * H if t.llm_weights else 0))
    attention = c * (2 * Q + 2 * K) + 4 * s.heads + 2 * 4 * s.head_dim  # + the rotary cos and sin
    if s.qk_norm:
        attention += (4 + c) * (Q + K)
    if linear_attention:  # gated delta-net: its projections' outputs, the short convolution, the recurrence
        attention = c * 3 * (Q + 2 * K) + 4 * s.heads
    mlp = 3 * c * M + (c * (Q + M) if t.llm_weights else 0)  # + o_proj's and down_proj's inputs
    adapters = sum((c + 1 if t.lora_dropout else c) * width + c * t.lora_rank for width in t.adapter_inputs)
    return norms + attention + mlp + adapters


def llm_activation_bytes(s: Shapes, t: Training, batch: MicroBatch) -> int:
    positions = batch.positions
    full = s.linear_attention * layer_bytes_per_position(s, t, linear_attention=True)
    full += (s.layers - s.linear_attention) * layer_bytes_per_position(s, t)
    per_layer = full / s.layers
    if t.checkpointing:  # each layer keeps its input; the backward pass recomputes one layer at a time
        kept = s.layers * t.residual * s.hidden + per_layer
    else:
        kept = full
    mask = 0
    if t.eager:  # the attention weights and their softmax, per head, in every layer
        mask = (1 if t.checkpointing else s.layers) * s.heads * batch.rows * batch.row_length**2 * (4 + t.compute)
    elif batch.masked:  # sdpa turns the boolean mask into an additive one, kept by every layer
        mask = (1 if t.checkpointing else s.layers) * batch.rows * batch.row_length**2 * 4
    embeddings = positions * t.residual * s.hidden  # the token embeddings, with the image features put in
    return int(positions * kept + mask + embeddings + positions * BATCH_BYTES_PER_TOKEN)


def logits_bytes(s: Shapes, t: Training, batch: MicroBatch) -> int:
    """The trained positions' logits (kept for the loss's backward), their gradient as the loss's chunks
    give it and as one tensor, and the fp32 copies a chunk of the cross-entropy makes (logits, log-softmax,
    their gradient)."""
    chunk = min(batch.trained, CROSS_ENTROPY_CHUNK)
    return batch.trained * s.vocab * 3 * t.compute + 3 * chunk * s.vocab * 4


def vision_bytes(s: Shapes, t: Training, batch: MicroBatch) -> tuple[int, int]:
    """(kept for the backward pass, made at once during the forward pass) by the vision tower and merger.

    A frozen tower keeps nothing (its input needs no gradient), but each block makes its input, attention's
    queries, keys, values and output and the MLP's hidden layer, at once. A trained one keeps, per block,
    what a decoder layer keeps; a trained merger its input and hidden layer."""
    P, Hv, Iv, c = batch.patches, s.vision_hidden, s.vision_intermediate, t.compute
    pixels = P * PIXEL_VALUES_PER_PATCH * (s.patch / 14) ** 2 * 4
    block = P * (c * 8 * Hv + c * (3 if s.vision_gated else 2) * Iv)
    merger = (1 + s.deepstack) * P * 5 * Hv * c if t.merger_trains else 0
    if not t.vision_trains:
        return int(merger), int(pixels + block + merger)
    per_block = P * (2 * (4 * Hv + 2 * c * Hv) + c * 6 * Hv + c * (4 if s.vision_gated else 2) * Iv)
    kept = s.vision_depth * (P * t.residual * Hv if t.checkpointing else per_block) + merger
    return int(kept), int(pixels + kept + block)


# ---------------------------------------------------------------------------------------------------------
# The peak, per device.


@dataclass(frozen=True)
class Setup:
    """What the prediction needs of the set-up model, read once: its bytes, shapes and what trains."""

    parts: dict  # weights by dtype, gradients, optimizer states (one device, before any sharding)
    counts: dict  # parameters, trained
    shapes: Shapes
    training: Training
    units: tuple  # (parameters outside the decoder layers and vision blocks, of the largest of those)


def setup_of(model, cfg: Config, optim: str | None = None) -> Setup:
    parts, counts = model_bytes(model, optim or cfg.optim)
    units = Counter()
    for name, tensor in tensors(model):
        match = re.search(r"\.(layers|blocks)\.(\d+)\.", f".{name}.")
        units[match.group(0) if match else "rest"] += tensor.numel()
    rest = units.pop("rest", 0)
    return Setup(parts, counts, shapes_of(model), training_of(model, cfg), (rest, max(units.values(), default=0)))


def predict(setup: Setup, batch: MicroBatch, world_size: int = 1, fsdp: bool = False) -> Prediction:
    """The peak memory of one device for this set-up and micro-batch."""
    s, t = setup.shapes, setup.training
    parts = dict(setup.parts)
    kept, vision_forward = vision_bytes(s, t, batch)
    parts["activations"] = llm_activation_bytes(s, t, batch) + kept
    parts["logits"] = logits_bytes(s, t, batch)
    parts["vision tower"] = vision_forward
    gradients, head_grad = parts.get("gradients", 0), t.head_grad
    if world_size > 1 and fsdp:
        # FSDP2 (finetune.py's units: each decoder layer, each vision block, the rest): a rank holds a shard
        # of the weights, gradients and states, and a unit's whole weights in the compute dtype while it runs
        # (the next one prefetched), the rest's (embeddings, head, merger) throughout; a unit's gradient is
        # whole until it is reduce-scattered.
        for name in [n for n in parts if n.startswith("weights")] + ["gradients", "optimizer states"]:
            if name in parts:
                parts[name] = -(-parts[name] // world_size)
        rest, largest = setup.units
        parts["gathered layers"] = (rest + 2 * largest) * t.compute
        gradients = parts["gradients"] + (rest + largest) * t.compute
        head_grad = head_grad // 4 * t.compute
    elif world_size > 1:
        parts["DDP gradient buckets"] = gradients  # DDP reduces a flat copy of the gradients, bucket by bucket
    resident = [name for name in parts if name.startswith("weights")] + ["optimizer states"]
    resident += [name for name in ("DDP gradient buckets", "gathered layers") if name in parts]
    # With gradient accumulation the gradients are alive through every micro-batch but the first.
    carried = t.grad_accum > 1
    moments = {
        "the vision forward": (
            ["vision tower", *(["gradients"] if carried else [])],
            parts["vision tower"] + (gradients if carried else 0),
        ),
        "the backward's start": (
            ["activations", "logits", *(["gradients"] if carried else ["output head's gradient"] if head_grad else [])],
            parts["activations"] + parts["logits"] + (gradients if carried else head_grad),
        ),
        "the backward's end": (["gradients"], gradients),
    }
    moment, (names, largest) = max(moments.items(), key=lambda item: item[1][1])
    peak = sum(parts.get(name, 0) for name in resident) + largest
    notes = {
        "weights": f"{setup.counts.get('parameters', 0):,} parameters, {setup.counts.get('trained', 0):,} trained",
        "activations": f"largest micro-batch: {batch.rows} x {batch.row_length} positions, {batch.patches:,} "
        f"vision patches, {batch.trained:,} trained tokens",
    }
    return Prediction({k: int(v) for k, v in parts.items() if v}, int(peak), [*resident, *names, moment], notes)


# ---------------------------------------------------------------------------------------------------------
# The data's largest micro-batch.


def vision_patches(samples, collator) -> np.ndarray:
    """Each sample's vision patches (before the 2x2 merge), from its media's sizes as found by the checks."""
    image_processor, video_processor = collator.processor.image_processor, collator.processor.video_processor
    rows, owners = samples.image_rows()
    sizes, of_size = np.unique(samples.table["image_sizes"][rows].reshape(-1, 2), axis=0, return_inverse=True)
    per_size = np.array([image_processor.get_number_of_image_patches(int(h), int(w)) for h, w in sizes], np.int64)
    index_of = np.full(len(samples.table["length"]), -1, np.int64)  # a position (as read) -> its index in the view
    index_of[samples.order] = np.arange(len(samples))
    patches = np.zeros(len(samples), np.int64)
    np.add.at(patches, index_of[owners], per_size[of_size.reshape(-1)] if len(sizes) else 0)
    side, frames_per_patch = video_processor.patch_size, video_processor.temporal_patch_size
    for position, plans in samples.video_plans.items():
        if index_of[position] >= 0:
            patches[index_of[position]] += sum(
                p.frames // frames_per_patch * (p.height // side) * (p.width // side) for p in plans
            )
    return patches


def trained_tokens(samples) -> np.ndarray:
    """Each sample's trained tokens, at most: those from its first trained one to its end."""
    _, _, first_trained = samples.table["measure"][samples.order].T
    return np.maximum(samples.lengths - np.minimum(first_trained, samples.lengths), 0)


def micro_batches(samples, collator, cfg: Config, world_size: int = 1) -> list[MicroBatch]:
    """The micro-batches to plan for: with --max-tokens those of the first epoch; else the longest samples
    together (the order is random: any micro-batch may draw them)."""
    lengths = samples.lengths.astype(np.int64)
    patches, trained = vision_patches(samples, collator), trained_tokens(samples)
    if cfg.max_tokens is None:
        longest = np.argsort(-lengths, kind="stable")[: cfg.batch_size]
        groups = [longest.tolist()]
    else:
        plan = BatchPlan(tuple(lengths.tolist()), cfg.batch_size, cfg.max_tokens, cfg.packing, cfg.shuffle, cfg.seed)
        groups = plan.epoch(0)
    batches = []
    for group in groups:
        rows = 1 if cfg.packing else len(group)
        row_length = int(lengths[group].sum() if cfg.packing else lengths[group].max())
        # Rows of unequal lengths are padded, and packed samples kept apart: both by an attention mask.
        masked = len(group) > 1 and (cfg.packing or len(set(lengths[group].tolist())) > 1)
        masked = masked and cfg.attn_implementation != "flash_attention_2"
        batches.append(MicroBatch(rows, row_length, int(trained[group].sum()), int(patches[group].sum()), masked))
    return batches


def predict_for_data(setup: Setup, batches: list[MicroBatch], world_size: int = 1, fsdp: bool = False) -> Prediction:
    """The prediction for the micro-batch whose step takes the most memory."""
    return max((predict(setup, b, world_size, fsdp) for b in set(batches)), key=lambda p: p.peak_bytes)


# ---------------------------------------------------------------------------------------------------------
# The report.


def gib(n: int) -> str:
    """Bytes as GiB, or MiB under one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def run_prediction(model, cfg: Config, samples, collator, world_size: int = 1) -> Prediction:
    """The prediction for a set-up model (on meta, or finetune.py's before any wrapper) and checked samples."""
    batches = micro_batches(samples, collator, cfg)
    return predict_for_data(setup_of(model, cfg), batches, world_size, cfg.fsdp)


def summary_line(prediction: Prediction) -> str:
    """The one line finetune.py prints at its start."""
    parts = ", ".join(f"{name} {gib(size)}" for name, size in prediction.parts.items())
    return f"memory plan: peak {gib(prediction.peak_bytes)} per device ({parts}); python -m qwen_ft.plan explains"


@dataclass
class Planner:
    """The plan of a config and its data, and of the changes that lower its peak."""

    cfg: Config
    samples: object
    collator: object
    devices: int

    def predict(self, cfg: Config | None = None, devices: int | None = None, model=None) -> Prediction:
        cfg = cfg or self.cfg
        devices = devices or self.devices
        model = model if model is not None else plan_model(cfg)
        batches = micro_batches(self.samples, self.collator, cfg)
        return predict_for_data(setup_of(model, cfg), batches, devices, cfg.fsdp)

    def changes(self, usable: int) -> list[tuple[str, Prediction]]:
        """Changes that lower the peak, one at a time, each with its prediction; those that fit first."""
        cfg, replace = self.cfg, dataclasses.replace
        tried = []
        if not cfg.gradient_checkpointing:
            tried.append(("--gradient-checkpointing", self.predict(replace(cfg, gradient_checkpointing=True))))
        longest, largest = int(self.samples.lengths.max()), max(b.positions for b in self.batches())
        budget, model = largest, plan_model(cfg)
        while budget > longest:  # the largest --max-tokens that fits, halving from the largest micro-batch
            budget = max(longest, budget // 2)
            prediction = self.predict(replace(cfg, max_tokens=budget), model=model)
            if prediction.peak_bytes <= usable or budget == longest:
                tried.append((f"--max-tokens {budget}", prediction))
                break
        if cfg.optim == "adamw":
            tried.append(("--optim adamw8bit", self.predict(replace(cfg, optim="adamw8bit"))))
        if not cfg.lora:
            tried.append(("--lora", self.predict(replace(cfg, lora=True))))
        if not cfg.qlora:
            tried.append(("--qlora", self.predict(replace(cfg, lora=True, qlora=True))))
        if not cfg.lora:
            for devices in (2, 4, 8, 16, 32, 64):
                if devices > self.devices or not cfg.fsdp:
                    tried.append((f"--fsdp over {devices} devices", self.predict(replace(cfg, fsdp=True), devices)))
                    if tried[-1][1].peak_bytes <= usable:
                        break
        return sorted(tried, key=lambda item: (item[1].peak_bytes > usable, item[1].peak_bytes))

    def batches(self) -> list[MicroBatch]:
        return micro_batches(self.samples, self.collator, self.cfg)


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '24G', '512MB': GB and GiB both count 2**30 bytes, as GPU makers' figures do."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (say 80GB)")
    return int(float(match.group(1)) * 1024 ** ("KMGT".find(match.group(2).upper()) + 1 if match.group(2) else 0))


def this_device_memory() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM (no GPU)"


def report(planner: Planner, prediction: Prediction, device: str, usable: int, tried: list) -> str:
    cfg = planner.cfg
    other = planner.predict(dataclasses.replace(cfg, gradient_checkpointing=not cfg.gradient_checkpointing))
    lines = [f"Memory plan per device, {device}: tensors may use {gib(usable)}"]
    for name, size in prediction.parts.items():
        note = ""
        if name.startswith("weights"):
            note = prediction.notes["weights"] if name == next(iter(prediction.parts)) else ""
        elif name == "activations":
            switch = "without" if cfg.gradient_checkpointing else "with"
            note = prediction.notes["activations"]
            note += f"; {switch} --gradient-checkpointing: {gib(other.parts['activations'])}"
        lines.append(f"  {name:<24}{gib(size):>11}   {note}".rstrip())
    lines.append(f"  {'peak':<24}{gib(prediction.peak_bytes):>11}   at {prediction.at_peak[-1]}: "
                 f"{' + '.join(prediction.at_peak[:-1])}")  # fmt: skip
    if planner.devices > 1:
        for mode, fsdp in (("DDP", False), ("FSDP2", True)):
            shared = planner.predict(dataclasses.replace(cfg, fsdp=fsdp))
            lines.append(f"  per rank under {mode} over {planner.devices} devices: {gib(shared.peak_bytes)}")
    fits = prediction.peak_bytes <= usable
    lines.append(f"{'fits' if fits else 'does not fit'}: {gib(prediction.peak_bytes)} of {gib(usable)}")
    if tried:
        lines.append("What fits instead (one change at a time):")
        lines += [f"  {flags:<28}{gib(p.peak_bytes):>11}   {'fits' if p.peak_bytes <= usable else 'too large'}"
                  for flags, p in tried]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--device-memory", type=parse_size, help="memory of the device to plan for, e.g. 80GB "
                        "(default: this machine's GPU, or its RAM without one)")  # fmt: skip
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs) the run uses: DDP, or --fsdp")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = vars(parser.parse_args(argv))
    device_memory, devices, as_json = args.pop("device_memory"), args.pop("devices"), args.pop("json")
    try:
        cfg = Config(**args)
    except ValueError as e:
        parser.error(str(e))
    from qwen_ft.collate import Collator
    from qwen_ft.data.checked import checked_samples
    from qwen_ft.data.read import DataError
    from qwen_ft.dist import Dist
    from qwen_ft.model import load_processor
    from qwen_ft.packing import rope_index_of

    try:
        processor = load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels, cfg.video_max_pixels)
        rope_index = rope_index_of(cfg.model, cfg.trust_remote_code) if cfg.packing else None
        collator = Collator(processor, cfg.max_length, cfg.video(), blank_image=devices > 1, rope_index=rope_index)
        # What the data check says goes to stderr, as do its warnings: stdout holds the plan alone.
        with contextlib.redirect_stdout(sys.stderr):
            samples = checked_samples(cfg.data, cfg, collator, Dist(torch.device("cpu")))
        planner = Planner(cfg, samples, collator, devices)
        prediction = planner.predict()
    except (DataError, ModelUnavailable, ConfigError) as e:
        sys.exit(f"error: {e}")
    memory, device = (device_memory, "of the given size") if device_memory else this_device_memory()
    usable = int(memory * FIT_FRACTION)
    tried = planner.changes(usable) if prediction.peak_bytes > usable else []
    if as_json:
        print(json.dumps({
            "peak_bytes": prediction.peak_bytes, "parts": prediction.parts, "at_peak": prediction.at_peak,
            "device_memory": memory, "usable_bytes": usable, "fits": prediction.peak_bytes <= usable,
            "devices": devices,
            "changes": [{"change": flags, "peak_bytes": p.peak_bytes, "fits": p.peak_bytes <= usable}
                        for flags, p in tried],
        }))  # fmt: skip
    else:
        print(report(planner, prediction, device, usable, tried))


if __name__ == "__main__":
    main()
