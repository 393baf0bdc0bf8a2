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
from qwen_ft.data import check_media, read_samples
from qwen_ft.dist import single_device
from qwen_ft.lora import LLM_PROJECTIONS, add_lora
from qwen_ft.model import load_model, part_of

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
def test_trainable_parameters_per_mode(tmp_path, tiny_model, flags, lora_parts, full_parts, capsys):
    model = train(tiny_model, dataset(tmp_path), tmp_path / "out", "--max-steps", "1", *flags)
    base = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    assert trainable(model) == expected_trainable(base, lora_parts, full_parts, dora="--dora" in flags)
    table = capsys.readouterr().out
    assert "part" in table and "lora" in table  # the table printed before training
    if "--qlora" in flags:
        q_proj = model.base_model.model.model.language_model.layers[0].self_attn.q_proj.base_layer
        assert type(q_proj).__name__ == "Linear4bit"
        merger_linear = model.base_model.model.model.visual.merger.mlp[0].modules_to_save["default"]
        assert type(merger_linear) is torch.nn.Linear  # unquantized: it trains in full


def test_only_a_named_layer_gets_adapters(tmp_path, tiny_model):
    flags = ["--max-steps", "1", "--lora", "--freeze-merger", "--lora-targets", "q_proj,v_proj"]
    model = train(tiny_model, dataset(tmp_path), tmp_path / "out", *flags)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("mode", ["--lora", "--qlora"])
def test_lora_and_qlora_loss_falls(tmp_path, tiny_model, mode):
    out = tmp_path / "out"
    flags = ["--max-steps", "30", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--warmup-steps", "0"]
    train(tiny_model, dataset(tmp_path), out, mode, "--no-shuffle", *flags)
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
def trained_adapter(tiny_model, tmp_path_factory):
    """A LoRA run (fp32) with the merger trained in full beside the adapters."""
    folder = tmp_path_factory.mktemp("lora")
    out = folder / "out"
    model = train(
        tiny_model,
        dataset(folder),
        out,
        "--lora",
        "--max-steps",
        "6",
        "--lr",
        "3e-3",
        "--precision",
        "fp32",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
    )
    return folder, out, model


def test_output_is_a_peft_adapter_that_restores_lora_and_the_merger(tiny_model, trained_adapter):
    _, out, trained = trained_adapter
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "processor_config.json").exists()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    base_merger = {n: p.clone() for n, p in base.model.visual.merger.named_parameters()}
    loaded = PeftModel.from_pretrained(base, out)
    trained_params = dict(trained.named_parameters())
    restored = 0
    for name, param in loaded.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            torch.testing.assert_close(param, trained_params[name], rtol=0, atol=0)
            restored += 1
    assert restored > 0
    merger = {
        n.replace(".modules_to_save.default", ""): p
        for n, p in loaded.base_model.model.model.visual.merger.named_parameters()
        if ".modules_to_save." in n
    }
    assert merger.keys() == base_merger.keys()
    assert all(not torch.equal(p, base_merger[n]) for n, p in merger.items() if n.endswith("weight"))


def test_merged_model_gives_the_logits_of_base_plus_adapter(tmp_path, tiny_model, trained_adapter, processor):
    folder, out, _ = trained_adapter
    merged_dir = tmp_path / "merged"
    merge.main(["--base", tiny_model, "--adapter", str(out), "--out", str(merged_dir)])
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "float32"  # the base's, by default

    samples = read_samples(dataset(folder))
    check_media(samples)
    batch = collate(Collator(processor, 4096), samples)
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

    folder, out, _ = trained_adapter
    generate.main(
        ["--model", tiny_model, "--adapter", str(out), "--data", str(folder / "data.json"), "--max-new-tokens", "4"]
    )
    assert "exact match:" in capsys.readouterr().out
