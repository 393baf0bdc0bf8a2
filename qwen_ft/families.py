"""The Qwen vision-language families qwen-ft trains, and the few places where they differ.

Every family has the same shape: `model.visual` (a vision tower of `blocks` and a `merger` into the
LLM), `model.language_model` (decoder `layers`) and a chat template with Qwen's special tokens, so the
loop, the collator and the checkpoints need no branches. What differs is held here and read where used.
"""

from dataclasses import dataclass

# Qwen3.5's gated delta-net layers run a causal convolution and a recurrence along the whole row. Their
# installed PyTorch kernels take no sample boundaries, so a packed row would leak one sample into the next.
LINEAR_ATTENTION_PACKING = (
    "--packing can't be used with {family}: its linear-attention layers (gated delta-net) would carry each "
    "packed sample's state into the next, as their kernels take no sample boundaries; use --max-tokens alone"
)


@dataclass(frozen=True)
class Family:
    name: str  # as --family of qwen_ft.tiny and FAMILY of finetune.sh take it
    model_types: tuple[str, ...]  # config.json's model_type
    hub_names: tuple[str, ...]  # published models to pass to --model
    packing_refused: str | None = None  # why --packing can't keep this family's samples apart, if it can't


FAMILIES = (
    Family("qwen2-vl", ("qwen2_vl",), ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct")),
    Family(
        "qwen2.5-vl",
        ("qwen2_5_vl",),
        ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-32B-Instruct"),
    ),
    Family(
        "qwen3-vl",
        ("qwen3_vl",),
        ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
    ),
    Family("qwen3-vl-moe", ("qwen3_vl_moe",), ("Qwen/Qwen3-VL-30B-A3B-Instruct",)),
    Family("qwen3.5", ("qwen3_5",), ("Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-27B"), LINEAR_ATTENTION_PACKING),
)

# Modules of model.visual that carry vision features into the LLM, which the "merger" part holds: the
# merger after the last block, and Qwen3-VL's deepstack mergers, which feed earlier blocks' features to
# the first decoder layers.
MERGERS = ("merger", "deepstack_merger_list")

# The LLM's linear layers that LoRA's "llm" target adapts: attention (q, k, v, o), Qwen3.5's linear
# attention (its input and output projections; the two per-head gate projections are a few columns
# wide) and the dense MLP (gate, up, down). An MoE layer's experts are one 3-D weight each, not
# linear layers, and its router is not one either: LoRA leaves both as they are.
LLM_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj", "down_proj"
)  # fmt: skip


class UnsupportedModel(Exception):
    """A model of an architecture that is not one of FAMILIES."""


def family_of(config) -> Family:
    """The family of a model config (a transformers config); UnsupportedModel names the families that are."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = ", ".join(getattr(config, "architectures", None) or []) or model_type
    supported = ", ".join(f"{f.name} ({f.hub_names[0]}, ...)" for f in FAMILIES)
    raise UnsupportedModel(f"{architectures} is not a model qwen-ft trains; the supported families are {supported}")
