"""Loading a Qwen2-VL-family model and processor, and choosing which of its parts train."""

import socket
import urllib.parse
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForImageTextToText, AutoProcessor

PRECISION_DTYPES = {"bf16-mixed": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}


class ModelUnavailable(Exception):
    """The model can't be found locally and the hub can't be reached."""


def check_available(name: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after minutes of download retries, when a hub model can't be had.

    A local directory always loads. A hub name loads from the cache when the hub is unreachable
    (by switching the hub client to offline mode), and is an error when it isn't cached either.
    """
    if Path(name).exists() or hub_constants.HF_HUB_OFFLINE:
        return
    endpoint = urllib.parse.urlparse(hub_constants.ENDPOINT)
    host = endpoint.hostname
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        socket.create_connection((host, port), timeout=timeout_s).close()
        return
    except OSError as e:
        reason = e.strerror or str(e)
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        hub_constants.HF_HUB_OFFLINE = True
        return
    raise ModelUnavailable(
        f"model '{name}' is not a local directory and {host} cannot be reached ({reason}), so it can't be "
        "downloaded. Pass --model PATH to a local checkpoint, or try the loop offline with a tiny random "
        "model: MODEL=tiny ./finetune.sh"
    )


def load_processor(name: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor, with Qwen's smart resize bounded by [min_pixels, max_pixels] where given.

    The bounds are stored in the processor, so the saved fine-tuned model sees images at
    the same resolution at inference as in training.
    """
    check_available(name)
    processor = AutoProcessor.from_pretrained(name)
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    processor.image_processor.size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
    return processor


def load_model(name: str, precision: str, attn_implementation: str, device: torch.device):
    check_available(name)
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=PRECISION_DTYPES[precision], attn_implementation=attn_implementation
    )
    return model.to(device)


def model_parts(model) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters of the vision tower, the merger (vision to language projection) and the LLM."""
    visual = model.model.visual
    merger = list(visual.merger.parameters())
    merger_ids = {id(p) for p in merger}
    llm = {id(p): p for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    return {
        "vision": [p for p in visual.parameters() if id(p) not in merger_ids],
        "merger": merger,
        "llm": list(llm.values()),  # lm_head may share its weight with the embeddings
    }


def set_trainable(model, freeze_vision: bool, freeze_merger: bool, freeze_llm: bool) -> None:
    frozen = {"vision": freeze_vision, "merger": freeze_merger, "llm": freeze_llm}
    for part, params in model_parts(model).items():
        for param in params:
            param.requires_grad_(not frozen[part])


def trainable_table(model) -> str:
    """Parameter counts per part, trainable and total, as a small text table."""
    rows = [f"{'part':<8}{'trainable':>15}{'total':>15}"]
    for part, params in model_parts(model).items():
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append(f"{part:<8}{trainable:>15,}{sum(p.numel() for p in params):>15,}")
    return "\n".join(rows)
