"""LoRA and QLoRA with peft: which linear layers get adapters, and what trains in full beside them."""

import contextlib
import logging
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BitsAndBytesConfig

from qwen_ft.config import ConfigError
from qwen_ft.families import LLM_PROJECTIONS, MERGERS
from qwen_ft.model import cast_trainable, load_model, part_of, set_trainable

# On import, bitsandbytes' CPU backend tries to fetch an optional 4-bit kernel from the hub (with the
# `kernels` package) and logs a warning when it can't; its built-in kernel then runs, so the warning
# says nothing a user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@contextlib.contextmanager
def peft_quietly():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, a
    FutureWarning on every LoRA run that only a peft release can fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_target_modules(model, targets: str) -> list[str]:
    """Names of the linear layers that get adapters.

    targets is a comma-separated list of parts (llm: its LLM_PROJECTIONS;
    vision or merger: all their linear layers) and/or layer names (q_proj, qkv, mlp.0, ...).
    """
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":  # bitsandbytes' Linear4bit is a Linear
            continue
        part, leaf = part_of(name), name.rsplit(".", 1)[-1]
        if any(
            (t == "llm" and part == "llm" and leaf in LLM_PROJECTIONS)
            or (t in ("vision", "merger") and part == t)
            or name == t
            or name.endswith("." + t)
            for t in wanted
        ):
            names.append(name)
    if not names:
        raise ConfigError(f"--lora-targets {targets!r} names no linear layer of the model")
    return names


def quantization_config(frozen: dict[str, bool]) -> BitsAndBytesConfig:
    """QLoRA's 4-bit NF4 with double quantization and bf16 compute.

    The mergers and lm_head stay unquantized (small, and the mergers often train), as does the
    vision tower when it trains in full: a 4-bit weight can only be trained through adapters.
    """
    keep = ["lm_head", *(f"model.visual.{merger}" for merger in MERGERS)]
    keep += [] if frozen["vision"] else ["model.visual"]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=keep,
    )


def add_lora(model, frozen: dict[str, bool], r: int, alpha: int, dropout: float, targets: str, dora: bool):
    """Wrap the model with peft LoRA adapters; parts not frozen and without adapters train in full.

    The base weights of every part with adapters are frozen. Parts trained in full go into peft's
    modules_to_save, so the adapter directory holds them too and PeftModel.from_pretrained restores them.
    """
    target_modules = lora_target_modules(model, targets)
    adapted = {part_of(name) for name in target_modules}
    in_full = [part for part, is_frozen in frozen.items() if not is_frozen and part not in adapted]
    if "llm" in in_full and getattr(model, "is_loaded_in_4bit", False):
        raise ConfigError(
            "QLoRA holds the LLM in 4 bits, so it can only train through adapters: "
            "keep llm in --lora-targets or pass --freeze-llm"
        )
    # Every module that holds parameters of those parts itself (peft can't wrap a ModuleList of blocks).
    in_full_modules = [
        name
        for name, module in model.named_modules()
        if part_of(name) in in_full and next(module.parameters(recurse=False), None) is not None
    ]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=in_full_modules or None,
        use_dora=dora,
    )
    with peft_quietly():
        return get_peft_model(model, config)


def load_with_adapter(base: str, adapter: str, precision: str, device: torch.device):
    """The base model (never quantized: a QLoRA adapter applies to the bf16 weights too) with the adapter,
    and any modules trained in full beside it, loaded on top."""
    model = load_model(base, precision, "sdpa", device)
    with peft_quietly():
        return PeftModel.from_pretrained(model, adapter)


def as_trained(model, cfg):
    """The model with what cfg trains: LoRA adapters (whose peft wrapper trains them and the parts not frozen), or
    the parts not frozen, in full; under bf16-mixed what trains gets fp32 master weights. A run, and the memory
    plan's model on the meta device, both set up this way."""
    if cfg.lora:
        model = add_lora(model, cfg.frozen(), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.dora)
    else:
        set_trainable(model, cfg.frozen())
    if cfg.precision == "bf16-mixed":
        cast_trainable(model, torch.float32)
    return model
