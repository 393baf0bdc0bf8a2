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
    processor: str = "Qwen3VLProcessor"  # the class of its processor, by which a processor tells its family
    # How its boxes and points are written (grounding.py): "tokens", Qwen2-VL's special tokens around
    # "(x1,y1),(x2,y2)", or "json", {"bbox_2d": [x1, y1, x2, y2], "label": ...} in a ```json list; and in
    # what numbers: "1000", thousandths of the image's width and height, or "resized", pixels of the
    # image as the processor resized it.
    box_form: str = "json"
    box_scale: str = "1000"


# Grounding conventions, as Qwen documents them: Qwen2-VL's paper (arXiv 2409.12191, 2.2.1) and the Qwen2-VL
# section of Qwen3-VL's qwen-vl-finetune/tools/process_bbox.ipynb; Qwen2.5-VL's cookbooks/spatial_understanding.ipynb
# (pixels of the resized image) and process_bbox.ipynb; Qwen3-VL's cookbooks/2d_grounding.ipynb (0 to 1000).
# Qwen3-VL-MoE and Qwen3.5 share Qwen3-VL's processor and, with no document of their own, its convention.
FAMILIES = (
    Family(
        "qwen2-vl",
        ("qwen2_vl",),
        ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        processor="Qwen2VLProcessor",
        box_form="tokens",
    ),
    Family(
        "qwen2.5-vl",
        ("qwen2_5_vl",),
        ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-32B-Instruct"),
        processor="Qwen2_5_VLProcessor",
        box_scale="resized",
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


def family_of_processor(processor) -> Family:
    """The first family whose processor is of this class: the family itself, or (Qwen3VLProcessor, which
    Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 share) one that differs from it in nothing a processor touches."""
    name = type(processor).__name__
    for family in FAMILIES:
        if family.processor == name:
            return family
    raise UnsupportedModel(f"a {name} is not the processor of a model qwen-ft trains")
