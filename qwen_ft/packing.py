"""Padding-free packing: a micro-batch's samples in one row, each keeping the positions it has alone.

transformers reads a packed row from its position ids: where the text positions restart at 0 a new
sample begins, and attention stays within each sample (a block-diagonal causal mask for sdpa and
eager, variable-length kernels for flash_attention_2). The 3-D M-RoPE positions come from the
model's own rope index, per sample, so an image is placed as it would be in a batch of one.
"""

import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from qwen_ft.config import ConfigError
from qwen_ft.families import family_of


def rope_index_of(model_name: str, trust_remote_code: bool = False):
    """The model's get_rope_index without its weights, for DataLoader workers: it reads only the config,
    so it is bound to an instance of the model's base class that holds nothing else."""
    config = AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    family = family_of(config)
    if family.packing_refused:
        raise ConfigError(family.packing_refused.format(family=family.name))
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is None or not hasattr(model_class, "get_rope_index"):
        raise ConfigError(f"--packing: {type(config).__name__} models have no rope index to place packed samples")
    holder = model_class.__new__(model_class)  # no __init__: no weights
    holder.__dict__["config"] = config  # past nn.Module.__setattr__, which needs an initialised module
    return holder.get_rope_index


def pack(batch: dict, rope_index) -> dict:
    """A right-padded processor batch with labels as one row without padding or attention mask, and
    position ids of shape (4, 1, tokens): text positions, then the 3-D M-RoPE ones."""
    keep = batch.pop("attention_mask").bool()
    media = {key: batch[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if key in batch}
    rope, _ = rope_index(batch["input_ids"], batch["mm_token_type_ids"], attention_mask=keep.long(), **media)
    text = keep.long().cumsum(1) - 1  # 0, 1, 2, ... within each row, that is, each sample
    positions = torch.cat([text[None], rope])[:, keep]
    packed = {key: batch[key][keep][None] for key in ("input_ids", "mm_token_type_ids", "labels")}
    return {**batch, **packed, "position_ids": positions[:, None]}


def real_tokens(batch: dict) -> int:
    """Positions of a batch that hold a token, not padding (a packed batch has no padding, nor a mask)."""
    mask = batch.get("attention_mask")
    return batch["input_ids"].numel() if mask is None else int(mask.sum())
