import json
from functools import partial

import pytest
import torch
from helpers import collate, picture, qa, write_json
from peft import PeftModel
from transformers import AutoModelForImageTextToText

import finetune
from qwen_ft import merge
from qwen_ft.collate import Collator
from qwen_ft.config import parse_config
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.lora import LLM_PROJECTIONS, add_lora, lora_target_modules
from qwen_ft.model import load_model, load_processor, part_of
from qwen_ft.tiny import FAMILIES

RANK = 4


def dataset(folder) -> str:
    samples = [
        qa(picture(folder, "a.png"), "What colour is the shape?", "red"),
        qa(picture(folder, "b.png", "square", "blue", "bottom right"), "Where is the shape?", "bottom right"),
        qa(picture(folder, "c.png", "triangle", "green", "top right"), "What shape is it?", "triangle"),
        qa(None, "How many corners does a square have?", "four"),
    ]
    return write_json(folder / "data.json", samples)


def train(tiny_model, data, out, *flags):
    args = ["--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0"]
    args += ["--lora-r", str(RANK), "--lora-alpha", "8", *flags]
    return finetune.train(parse_config(args), single_device())


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def linear_layers(model, part: str, names=None) -> list[torch.nn.Linear]:
    return [
        m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n != "lm_head"
        and part_of(n) == part
        and (names is None or n.rsplit(".", 1)[-1] in names)
    ]


def expected_trainable(base, lora_parts, full_parts, dora=False) -> dict[str, int]:
    """Trainable parameters per part, counted from the plain model's shapes."""
    counts = {"vision": 0, "merger": 0, "llm": 0, "lora": 0}
    for part in full_parts:
        counts[part] = sum(p.numel() for n, p in base.named_parameters() if part_of(n) == part)
    for part in lora_parts:
        layers = linear_layers(base, part, LLM_PROJECTIONS if part == "llm" else None)
        # A: r x in, B: out x r; DoRA adds a magnitude per output feature.
        counts["lora"] += sum(RANK * (m.in_features + m.out_features) + (m.out_features if dora else 0) for m in layers)
    return counts


def trainable(model) -> dict[str, int]:
    counts = {"vision": 0, "merger": 0, "llm": 0, "lora": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[part_of(name)] += param.numel()
    return counts


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
@pytest.mark.parametrize(
    "flags, lora_parts, full_parts",
    [
        (["--lora"], ["llm"], ["merger"]),
        (["--lora", "--freeze-merger"], ["llm"], []),
        (["--lora", "--lora-targets", "llm,vision"], ["llm", "vision"], ["merger"]),
        (["--lora", "--no-freeze-vision"], ["llm"], ["vision", "merger"]),
        (["--lora", "--lora-targets", "llm,merger"], ["llm", "merger"], []),
        (["--lora", "--dora", "--freeze-merger"], ["llm"], []),
        (["--qlora"], ["llm"], ["merger"]),
    ],
)
def test_trainable_parameters_per_mode(tmp_path, family_model, family, flags, lora_parts, full_parts, capsys):
    tiny_model = family_model(family)
    model = train(tiny_model, dataset(tmp_path), tmp_path / "out", "--max-steps", "1", *flags)
    base = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    assert trainable(model) == expected_trainable(base, lora_parts, full_parts, dora="--dora" in flags)
    table = capsys.readouterr().out
    assert "part" in table and "lora" in table  # the table printed before training
    if "--qlora" in flags:
        q_proj = model.base_model.model.model.language_model.layers[0].self_attn.q_proj.base_layer
        assert type(q_proj).__name__ == "Linear4bit"
        # The mergers (Qwen3-VL's deepstack mergers too) stay unquantized: they train in full.
        merger_linears = [
            module
            for name, module in model.named_modules()
            if name.endswith(".modules_to_save.default") and isinstance(module, torch.nn.Linear)
        ]
        assert len(merger_linears) == len(linear_layers(base, "merger")) > 0
        assert all(type(module) is torch.nn.Linear for module in merger_linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_has_its_part_and_lora_adapts_every_linear_layer_of_the_llm(family_model, family):
    model = load_model(family_model(family), "fp32", "sdpa", torch.device("cpu"))
    for name, _ in model.named_parameters():
        if name.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list.")):
            assert part_of(name) == "merger", name  # what carries vision features into the LLM
        elif name.startswith("model.visual."):
            assert part_of(name) == "vision", name
        else:
            assert part_of(name) == "llm", name  # MoE experts and router included
    # Attention, Qwen3.5's linear attention and dense MLPs: every linear layer of the decoder layers but
    # Qwen3.5's per-head gate projections (in_proj_a, in_proj_b). An MoE layer's experts are no linear layers.
    decoder_linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith("model.language_model.layers.")
        and not name.endswith(("in_proj_a", "in_proj_b"))
    }
    assert set(lora_target_modules(model, "llm")) == decoder_linears
    if family == "qwen3.5":
        assert {name.rsplit(".", 1)[-1] for name in decoder_linears} >= {"in_proj_qkv", "in_proj_z", "out_proj"}


def test_only_a_named_layer_gets_adapters(tmp_path, tiny_model):
    flags = ["--max-steps", "1", "--lora", "--freeze-merger", "--lora-targets", "q_proj,v_proj"]
    model = train(tiny_model, dataset(tmp_path), tmp_path / "out", *flags)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "family, mode", [("qwen2-vl", "--lora"), ("qwen2-vl", "--qlora"), ("qwen3-vl", "--qlora"), ("qwen3.5", "--lora")]
)
def test_lora_and_qlora_loss_falls(tmp_path, family_model, family, mode):
    out = tmp_path / "out"
    flags = ["--max-steps", "30", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--warmup-steps", "0"]
    train(family_model(family), dataset(tmp_path), out, mode, "--no-shuffle", *flags)
    losses = [m["loss"] for m in metrics(out)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("quantized", [False, True])
def test_gradient_checkpointing_with_lora_gives_gradients_to_every_trainable_parameter(
    tmp_path, tiny_model, processor, quantized
):
    from qwen_ft.lora import quantization_config

    frozen = {"vision": True, "merger": False, "llm": False}
    quantization = quantization_config(frozen) if quantized else None
    model = load_model(tiny_model, "bf16-mixed", "sdpa", torch.device("cpu"), quantization)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, frozen, r=RANK, alpha=8, dropout=0.0, targets="llm", dora=False)
    model.train()
    assert model.base_model.model.is_activation_checkpointing
    samples = read_samples(dataset(tmp_path))
    check_media(samples)
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    finetune.forward_backward(model, [collate(Collator(processor, 4096), samples)], single_device(), autocast)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in n for n in params) and any("merger" in n for n in params)
    # lora_B starts at zero, so lora_A's gradient is zero on the first step; B's and the merger's are not.
    assert all(p.grad is not None for p in params.values())
    assert all(p.grad.abs().sum() > 0 for n, p in params.items() if ".lora_A." not in n)


@pytest.fixture(scope="module")
def trained_adapter(family_model, tmp_path_factory):
    """trained_adapter(family): a LoRA run (fp32) with the mergers trained in full beside the adapters,
    made once per family: its folder, output folder and trained model."""
    runs = {}

    def run(family: str):
        if family not in runs:
            folder = tmp_path_factory.mktemp(f"lora-{family}")
            flags = ["--lora", "--max-steps", "6", "--lr", "3e-3", "--precision", "fp32", "--batch-size", "4"]
            model = train(family_model(family), dataset(folder), folder / "out", *flags, "--grad-accum", "1")
            runs[family] = folder, folder / "out", model
        return runs[family]

    return run


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_output_is_a_peft_adapter_that_restores_lora_and_the_merger(family_model, trained_adapter, family):
    _, out, trained = trained_adapter(family)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "processor_config.json").exists()
    base = AutoModelForImageTextToText.from_pretrained(family_model(family), dtype=torch.float32)
    base_merger = {n: p.clone() for n, p in base.named_parameters() if part_of(n) == "merger"}
    loaded = PeftModel.from_pretrained(base, out)
    trained_params = dict(trained.named_parameters())
    restored = 0
    for name, param in loaded.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            torch.testing.assert_close(param, trained_params[name], rtol=0, atol=0)
            restored += 1
    assert restored > 0
    merger = {
        n.replace("base_model.model.", "", 1).replace(".modules_to_save.default", ""): p
        for n, p in loaded.named_parameters()
        if ".modules_to_save." in n
    }
    assert merger.keys() == base_merger.keys()  # Qwen3-VL's deepstack mergers too
    assert all(not torch.equal(p, base_merger[n]) for n, p in merger.items() if n.endswith("weight"))


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_gives_the_logits_of_base_plus_adapter(tmp_path, family_model, trained_adapter, family):
    tiny_model = family_model(family)
    folder, out, _ = trained_adapter(family)
    merged_dir = tmp_path / "merged"
    merge.main(["--base", tiny_model, "--adapter", str(out), "--out", str(merged_dir)])
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "float32"  # the base's, by default

    samples = read_samples(dataset(folder))
    check_media(samples)
    batch = collate(Collator(load_processor(tiny_model), 4096), samples)
    batch.pop("labels")
    base = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        plain = base(**batch).logits
        with_adapter = PeftModel.from_pretrained(base, out).eval()(**batch).logits
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype="auto")(**batch).logits
    assert not torch.allclose(with_adapter, plain, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged, with_adapter, rtol=1e-5, atol=1e-5)
    assert (merged_dir / "processor_config.json").exists() and not (merged_dir / "adapter_config.json").exists()


def test_a_qlora_adapter_merges_into_full_precision_weights(tmp_path, tiny_model):
    out = tmp_path / "out"
    train(tiny_model, dataset(tmp_path), out, "--qlora", "--max-steps", "3", "--lr", "3e-3")
    merged_dir = tmp_path / "merged"
    merge.main(["--base", tiny_model, "--adapter", str(out), "--out", str(merged_dir), "--dtype", "bf16"])
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert type(merged.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_generate_takes_an_adapter(tiny_model, trained_adapter, capsys):
    from qwen_ft import generate

    folder, out, _ = trained_adapter("qwen2-vl")
    generate.main(
        ["--model", tiny_model, "--adapter", str(out), "--data", str(folder / "data.json"), "--max-new-tokens", "4"]
    )
    assert "exact match:" in capsys.readouterr().out
