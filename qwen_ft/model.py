"""Loading a Qwen vision-language model and processor, and choosing which of its parts train."""

import json
import socket
import urllib.parse
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    AutoVideoProcessor,
    BitsAndBytesConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)

from qwen_ft.families import MERGERS, Family, UnsupportedModel, family_of


class ModelUnavailable(Exception):
    """The model can't be found locally and the hub can't be reached, or a folder is not a model."""


# A processor saved by transformers writes one of these (older versions the second).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def has_processor(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in PROCESSOR_FILES)


def check_model_dir(folder: Path, processor: bool) -> None:
    """A one-line ModelUnavailable for a folder that from_pretrained would fail on with a traceback: one
    without a model, or (processor=True) without a processor, which a LoRA adapter folder may hold alone."""
    if not folder.is_dir():
        raise ModelUnavailable(f"model '{folder}' is a file, not a model folder")
    if processor and has_processor(folder):
        return
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ModelUnavailable(
            f"'{folder}' holds a LoRA adapter, not a whole model: pass its base model as --model and this "
            "folder as --adapter, or merge the two with python -m qwen_ft.merge"
        )
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(f"'{folder}' is not a model folder: it has no config.json")
    if processor:
        raise ModelUnavailable(
            f"'{folder}' has a model but no processor ({' or '.join(PROCESSOR_FILES)}): copy the processor and "
            "tokenizer files of the model it was trained from into it"
        )


def check_available(name: str, processor: bool = False, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after minutes of download retries or with a traceback, when a model can't be had.

    A local folder must hold a model (and, with processor, a processor). A hub name loads from the
    cache when the hub is unreachable (by switching the hub client to offline mode) or offline mode is
    set, and is an error when it isn't cached either.
    """
    if Path(name).exists():
        check_model_dir(Path(name), processor)
        return
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:  # not of the hub's "namespace/name" form either: a folder that isn't there
        raise ModelUnavailable(f"model folder '{name}' not found") from None
    if hub_constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE
        if cached:
            return
        raise ModelUnavailable(
            f"model '{name}' is not a local directory and not in the Hugging Face cache, and offline mode is on "
            "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), so it can't be downloaded. Download it where there is "
            "network, pass --model PATH to a local checkpoint, or try the loop with MODEL=tiny ./finetune.sh"
        )
    endpoint = urllib.parse.urlparse(hub_constants.ENDPOINT)
    host = endpoint.hostname
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        socket.create_connection((host, port), timeout=timeout_s).close()
        return
    except OSError as e:
        reason = e.strerror or str(e)
    if cached:
        hub_constants.HF_HUB_OFFLINE = True
        return
    raise ModelUnavailable(
        f"model '{name}' is not a local directory and {host} cannot be reached ({reason}), so it can't be "
        "downloaded. Pass --model PATH to a local checkpoint, or try the loop offline with a tiny random "
        "model: MODEL=tiny ./finetune.sh"
    )


def check_family(name: str, trust_remote_code: bool = False) -> Family:
    """The model's family, from its config.json alone (before any weights or processor are loaded);
    ModelUnavailable for an architecture qwen-ft doesn't train, naming those it does."""
    try:
        return family_of(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))
    except UnsupportedModel as e:
        raise ModelUnavailable(f"'{name}': {e}") from None
    except ValueError as e:  # a config.json transformers can't read (an unknown model_type)
        raise ModelUnavailable(f"'{name}': {e}") from None


def load_processor(
    name: str,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_max_pixels: int | None = None,
    trust_remote_code: bool = False,
):
    """The model's processor, with Qwen's smart resize bounded by [min_pixels, max_pixels] where given
    (video frames by [min_pixels, video_max_pixels]).

    The bounds are stored in the processor, so the saved fine-tuned model sees images at the same
    resolution at inference as in training.
    """
    check_available(name, processor=True)
    if not Path(name).is_dir() or (Path(name) / "config.json").is_file():  # an adapter folder may hold no config
        check_family(name, trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError:  # transformers' "Unrecognized image processor", a 40-line traceback
        if image_processor_type(name) != EARLY_QWEN2_5_VL:
            raise
        processor = early_qwen2_5_vl_processor(name)
    for sub, largest in ((processor.image_processor, max_pixels), (processor.video_processor, video_max_pixels)):
        size = dict(sub.size)
        sub.size = {
            "shortest_edge": min_pixels if min_pixels is not None else size["shortest_edge"],
            "longest_edge": largest if largest is not None else size["longest_edge"],
        }
    return processor


# The early Qwen2.5-VL releases name their image processor so in preprocessor_config.json, a class transformers
# never had (Qwen2.5-VL's images go through Qwen2-VL's processor), and AutoProcessor can't load them.
EARLY_QWEN2_5_VL = "Qwen2_5_VLImageProcessor"


def image_processor_type(name: str) -> str | None:
    """What the model's preprocessor_config.json (if any) names as its image processor."""
    file = "preprocessor_config.json"
    path = Path(name) / file if Path(name).is_dir() else try_to_load_from_cache(name, file)  # fetched by AutoProcessor
    try:
        return json.loads(Path(path).read_text()).get("image_processor_type")
    except (TypeError, OSError, ValueError, AttributeError):  # not there, unreadable, not JSON, not an object
        return None


def early_qwen2_5_vl_processor(name: str):
    """The processor of an early Qwen2.5-VL folder, put together from its parts with the image processor it meant;
    saved with the fine-tuned model, it is one that AutoProcessor loads."""
    try:
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor.from_pretrained(name),
            tokenizer=AutoTokenizer.from_pretrained(name),
            video_processor=AutoVideoProcessor.from_pretrained(name),
            chat_template=Qwen2_5_VLProcessor.get_processor_dict(name)[0].get("chat_template"),
        )
    except Exception as e:  # what transformers raises for files it can't read varies
        raise ModelUnavailable(
            f"'{name}': its preprocessor_config.json names the image processor {EARLY_QWEN2_5_VL}, which transformers "
            f"does not have, and its parts could not be loaded as Qwen2-VL's ({e}); change that name to "
            "Qwen2VLImageProcessor"
        ) from None


def load_model(
    name: str,
    precision: str,
    attn_implementation: str,
    device: torch.device,
    quantization_config: BitsAndBytesConfig | None = None,
    trust_remote_code: bool = False,
):
    """The model on `device`, weights in bf16 unless precision is fp32, or in the dtype its config.json
    names for "auto" (4-bit where quantization_config says).

    Under bf16-mixed the weights that train are cast to fp32 later (cast_trainable), once it is known
    which they are; frozen weights stay in bf16, which autocast would cast them to anyway.
    """
    check_available(name)
    check_family(name, trust_remote_code)
    return AutoModelForImageTextToText.from_pretrained(
        name,
        dtype={"fp32": torch.float32, "auto": "auto"}.get(precision, torch.bfloat16),
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        device_map={"": device},
        trust_remote_code=trust_remote_code,
    )


def part_of(name: str) -> str:
    """The part a parameter or module belongs to, from its name (also inside a peft wrapper):
    "vision" (the vision tower), "merger" (vision-to-language projections), "llm" or "lora" (adapters)."""
    if "lora_" in name:
        return "lora"
    dotted = f".{name}."
    if any(f".visual.{merger}." in dotted for merger in MERGERS):
        return "merger"
    if ".visual." in dotted:
        return "vision"
    return "llm"


def set_trainable(model, frozen: dict[str, bool]) -> None:
    """requires_grad on every parameter of each part that isn't frozen ({"vision": True, ...}); a trained
    weight that the input embedding and the output head share gets one gradient (one_tied_gradient)."""
    for name, param in model.named_parameters():
        param.requires_grad_(not frozen[part_of(name)])
    one_tied_gradient(model)


def one_tied_gradient(model) -> bool:
    """Make a tied embedding/output-head weight that trains hold one full-size gradient, not three.

    Where the two share a weight (tie_word_embeddings: Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B and 4B),
    autograd holds the head's gradient of it (vocab x hidden: 0.87 GiB in fp32 for the 2B) from the start
    of the backward pass until the embedding's, as large, arrives at its end, and sums the two into a
    third. Here the head adds its gradient straight into weight.grad (TiedHead), and the embedding's
    lookup gives a sparse gradient (the rows of the micro-batch's tokens), which autograd adds into it in
    place. The embedding's gradient is the one autograd delivers, last, so hooks on the weight's
    gradient (DDP's reduction) see the sum. Returns whether the model has such a weight.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight is not head.weight or not head.weight.requires_grad:
        return False
    # The modules stay as they are (their names, weights and saving); only what their forward computes
    # with changes. nn.Embedding's own `sparse` flag is left off: DDP would then expect a sparse .grad.
    embedding.forward = partial(sparse_lookup, embedding)
    head.forward = partial(tied_head, head)
    return True


def sparse_lookup(embedding: torch.nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    e = embedding
    return F.embedding(input_ids, e.weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, sparse=True)


def tied_head(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return TiedHead.apply(hidden, head.weight)


class TiedHead(torch.autograd.Function):
    """hidden @ weight.T, whose backward adds weight's gradient into weight.grad itself (addmm_, in place
    once there is one) and hands autograd none; the gradient of hidden goes back as usual."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return F.linear(hidden, weight)  # under autocast in its dtype, as nn.Linear would

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, weight = ctx.saved_tensors
        # Under autocast the forward computed in grad_logits' dtype: the gradients are computed in it too,
        # then cast to the tensors' own dtypes, as autograd does through autocast's casts.
        compute = grad_logits.dtype
        grad_hidden = (grad_logits @ weight.to(compute)).to(hidden.dtype)
        rows, columns = grad_logits.reshape(-1, grad_logits.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        columns = columns.to(compute)
        if weight.grad is None:
            weight.grad = (rows.T @ columns).to(weight.dtype)
        elif compute == weight.grad.dtype:
            weight.grad.addmm_(rows.T, columns)
        else:
            weight.grad.add_(rows.T @ columns)
        return grad_hidden, None


def cast_trainable(model, dtype: torch.dtype) -> None:
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)


def trainable_table(model) -> str:
    """Parameter counts per part, trainable and total, as a small text table."""
    counts = {part: [0, 0] for part in ("vision", "merger", "llm", "lora")}
    for name, param in model.named_parameters():
        if ".original_module." in name:  # peft's frozen original of a module it trains a copy of
            continue
        # A 4-bit weight packs two values per stored byte; its quant_state knows the real shape.
        quant_state = getattr(param, "quant_state", None)
        numel = quant_state.shape.numel() if quant_state is not None else param.numel()
        counts[part_of(name)][0] += numel if param.requires_grad else 0
        counts[part_of(name)][1] += numel
    rows = [f"{'part':<8}{'trainable':>15}{'total':>15}"]
    rows += [f"{part:<8}{trained:>15,}{total:>15,}" for part, (trained, total) in counts.items() if total]
    return "\n".join(rows)
