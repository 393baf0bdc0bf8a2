import json
import math
from functools import partial

import pytest
import torch
from helpers import collate, picture, qa, write_json
from transformers import AutoModelForImageTextToText, AutoProcessor

import finetune
from qwen_ft import training
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import parse_config
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.model import cast_trainable, load_model, load_processor
from qwen_ft.tiny import FAMILIES


def small_dataset(folder) -> str:
    """Four picture samples with answers of different lengths, and one text-only sample."""
    samples = [
        qa(picture(folder, "a.png"), "What colour is the shape?", "red"),
        qa(picture(folder, "b.png", "square", "blue", "bottom right"), "Describe the picture.", "a blue square"),
        qa(picture(folder, "c.png", "triangle", "green", "top right"), "Where is the shape?", "top right"),
        qa(picture(folder, "d.png", "circle", "yellow", "bottom left"), "What shape is it?", "circle"),
        qa(None, "How many corners does a triangle have?", "three"),
    ]
    return write_json(folder / "data.json", samples)


def train(tiny_model, data, out, *flags):
    args = ["--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0", *flags]
    return finetune.train(parse_config(args), single_device())


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_micro_batches_of_one_give_the_gradients_of_one_batch_of_two(tmp_path, family_model, family):
    samples = read_samples(small_dataset(tmp_path))
    check_media(samples)
    collator = Collator(load_processor(family_model(family)), max_length=4096)
    first, second = samples[0], samples[1]  # 2 and 4 trained tokens: unequal weights per micro-batch
    model = load_model(family_model(family), "fp32", "sdpa", torch.device("cpu"))
    no_autocast = partial(torch.autocast, "cpu", enabled=False)

    def gradients(window):
        model.zero_grad()
        loss_sum, trained_tokens = finetune.forward_backward(model, window, single_device(), no_autocast)
        return loss_sum / trained_tokens, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_accumulated, accumulated = gradients([collate(collator, [first]), collate(collator, [second])])
    loss_batched, batched = gradients([collate(collator, [first, second])])

    torch.testing.assert_close(loss_accumulated, loss_batched, rtol=1e-5, atol=1e-6)
    assert len(accumulated) == len(batched) > 0
    for a, b in zip(accumulated, batched):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # A per-micro-batch mean, the common mistake, weighs the shorter answer's tokens double and differs.
    model.zero_grad()
    for batch in (collate(collator, [first]), collate(collator, [second])):
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        (loss / 2).backward()
    per_batch_mean = [p.grad for p in model.parameters() if p.grad is not None]
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(per_batch_mean, batched))


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_when_overfitting_a_batch(tmp_path, family_model, family):
    out = tmp_path / "out"
    data = small_dataset(tmp_path)
    flags = ["--batch-size", "5", "--grad-accum", "1", "--max-steps", "40", "--lr", "2e-3", "--warmup-steps", "0"]
    train(family_model(family), data, out, *flags, "--no-shuffle", "--precision", "fp32")
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 40
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(
    "precision, trained_dtype, frozen_dtype",
    [("bf16-mixed", torch.float32, torch.bfloat16), ("bf16", torch.bfloat16, torch.bfloat16)],
)
def test_precision_sets_the_dtype_of_the_weights(tmp_path, tiny_model, precision, trained_dtype, frozen_dtype):
    out = tmp_path / "out"
    flags = ["--max-steps", "2", "--save-every", "2", "--precision", precision]
    model = train(tiny_model, small_dataset(tmp_path), out, *flags)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {trained_dtype}
    assert {p.dtype for p in model.model.visual.blocks.parameters()} == {frozen_dtype}  # frozen by default
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    assert all(math.isfinite(m["loss"]) for m in metrics(out))

    # The output and the checkpoint are written in the trained weights' dtype, which config.json names,
    # so that dtype="auto" loads every weight exactly as it was in memory.
    for folder in (out, out / "checkpoints" / "step-00000002"):
        assert json.loads((folder / "config.json").read_text())["dtype"] == str(trained_dtype).split(".")[1]
        loaded = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
        trained = dict(model.named_parameters())
        for name, param in loaded.named_parameters():
            assert param.dtype == trained_dtype
            torch.testing.assert_close(param, trained[name].to(trained_dtype), rtol=0, atol=0)


def test_bf16_mixed_computes_in_bf16(tmp_path, tiny_model, processor):
    samples = read_samples(small_dataset(tmp_path))
    check_media(samples)
    model = load_model(tiny_model, "bf16-mixed", "sdpa", torch.device("cpu"))
    cast_trainable(model, torch.float32)  # as finetune.py does under bf16-mixed (everything trains here)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    finetune.forward_backward(model, [collate(Collator(processor, 4096), samples[:2])], single_device(), autocast)
    assert seen == [torch.bfloat16]
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_writes_metrics_config_and_a_model_transformers_loads(tmp_path, family_model, family):
    tiny_model = family_model(family)
    out = tmp_path / "out"
    data = small_dataset(tmp_path)
    flags = ["--max-steps", "7", "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "3"]
    train(tiny_model, data, out, *flags)

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 8))
    # The schedule as the README gives it: a linear warm-up whose first step already moves the weights and
    # whose third reaches the peak, then a cosine from the peak towards 0 over the 4 steps left.
    warm_up = [1 / 3, 2 / 3, 1]
    cosine = [(1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]  # 1, 0.854, 0.5, 0.146
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f for f in warm_up + cosine], rel=1e-6)
    assert {"step", "loss", "lr", "trained_tokens", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert rows[-1]["epoch"] == pytest.approx(7 * 2 / 5)  # 14 micro-batches cycle through 5 samples
    assert all(r["trained_tokens"] > 0 for r in rows)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 7 and saved["data"] == data

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is FAMILIES[family].model and type(processor) is FAMILIES[family].processor
    base = AutoModelForImageTextToText.from_pretrained(tiny_model)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(tmp_path / "a.png")},
                {"type": "text", "text": "What colour is the shape?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def merger_module(name: str) -> bool:
    """Whether a parameter belongs to a module that feeds vision features into the LLM: the merger, and
    Qwen3-VL's deepstack mergers (which feed earlier vision blocks' features to the first decoder layers)."""
    return name.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list."))


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_frozen_parts_do_not_change(tmp_path, family_model, family):
    tiny_model = family_model(family)
    flags = ["--max-steps", "3", "--lr", "1e-3", "--freeze-llm", "--precision", "fp32"]
    model = train(tiny_model, small_dataset(tmp_path), tmp_path / "out", *flags)
    base = dict(load_model(tiny_model, "fp32", "sdpa", torch.device("cpu")).named_parameters())
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, base[name])}
    # Only the mergers trained, every weight matrix of them.
    assert changed <= {name for name in base if merger_module(name)}
    assert {name for name in base if merger_module(name) and name.endswith("weight")} <= changed
    if family == "qwen3-vl":
        assert any(".deepstack_merger_list." in name for name in changed)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_each_part_trains_at_its_own_learning_rate(tmp_path, family_model, family):
    """AdamW's first step moves each weight by lr * g / (|g| + eps), so a parameter's largest change is its lr."""
    tiny_model = family_model(family)
    rates = {"vision": 4e-3, "merger": 2e-3, "llm": 1e-3}
    flags = ["--max-steps", "1", "--batch-size", "5", "--grad-accum", "1", "--precision", "fp32", "--no-freeze-vision"]
    flags += ["--lr", str(rates["llm"]), "--vision-lr", str(rates["vision"]), "--merger-lr", str(rates["merger"])]
    model = train(tiny_model, small_dataset(tmp_path), tmp_path / "out", *flags, "--weight-decay", "0")
    base = dict(load_model(tiny_model, "fp32", "sdpa", torch.device("cpu")).named_parameters())
    for name, param in model.named_parameters():
        part = "merger" if merger_module(name) else "vision" if name.startswith("model.visual.") else "llm"
        largest_change = (param - base[name]).abs().max().item()
        assert largest_change == pytest.approx(rates[part], rel=1e-3), name


def test_the_optimizer_steps_with_the_gradient_clipped_to_max_grad_norm(tmp_path, tiny_model, monkeypatch):
    seen, real_make_optimizer = [], training.make_optimizer  # seen: the gradient norm each optimizer step is given

    def gradient_norm(optimizer, args, kwargs):
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients])).item())

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        optimizer.register_step_pre_hook(gradient_norm)
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", make_optimizer)
    flags = ["--max-steps", "2", "--batch-size", "1", "--grad-accum", "1", "--precision", "fp32", "--lr", "1e-3"]
    train(tiny_model, small_dataset(tmp_path), tmp_path / "out", *flags, "--max-grad-norm", "0.01")
    logged = [m["grad_norm"] for m in metrics(tmp_path / "out")]
    assert len(logged) == 2 and min(logged) > 0.1  # the norm before clipping, well above the limit
    assert seen == pytest.approx([0.01] * 2, rel=1e-4)


def test_trained_labels_count_matches_metrics(tmp_path, tiny_model, processor):
    out = tmp_path / "out"
    data = small_dataset(tmp_path)
    train(tiny_model, data, out, "--max-steps", "1", "--batch-size", "5", "--grad-accum", "1", "--no-shuffle")
    samples = read_samples(data)
    check_media(samples)
    labels = Collator(processor, 4096)(samples)["labels"]
    assert metrics(out)[0]["trained_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_gradient_checkpointing_leaves_the_losses_unchanged(tmp_path, tiny_model):
    data = small_dataset(tmp_path)
    flags = ["--max-steps", "3", "--lr", "1e-3", "--precision", "fp32", "--no-shuffle", "--batch-size", "5"]
    train(tiny_model, data, tmp_path / "plain", *flags)
    model = train(tiny_model, data, tmp_path / "checkpointed", *flags, "--gradient-checkpointing")
    assert model.is_activation_checkpointing
    plain, checkpointed = metrics(tmp_path / "plain"), metrics(tmp_path / "checkpointed")
    assert [m["loss"] for m in checkpointed] == pytest.approx([m["loss"] for m in plain], rel=1e-5)


def test_a_blank_image_leaves_the_outputs_of_a_text_only_batch_unchanged(tmp_path, tiny_model, processor):
    """Distributed runs give text-only batches a masked-out blank image; it must change nothing."""
    samples = read_samples(small_dataset(tmp_path))
    text_only = samples.select([i for i, s in enumerate(samples) if not s.media("image")])
    check_media(text_only)
    plain = collate(Collator(processor, 4096), text_only)
    blank = collate(Collator(processor, 4096, blank_image=True), text_only)
    assert "pixel_values" not in plain and "pixel_values" in blank
    model = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    length = plain["input_ids"].shape[1]
    with torch.no_grad():
        expected = model(**{k: v for k, v in plain.items() if k != "labels"}).logits
        got = model(**{k: v for k, v in blank.items() if k != "labels"}).logits[:, :length]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(blank["labels"][:, :length], plain["labels"])
    assert (blank["labels"][:, length:] == IGNORE_INDEX).all()
