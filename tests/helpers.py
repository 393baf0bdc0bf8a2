"""Small builders of test data shared by the test modules."""

import json
import random
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

import finetune
from qwen_ft import example_data, inspect_data
from qwen_ft.dist import single_device


def picture(folder: Path, name: str, shape="circle", colour="red", corner="top left", size=None) -> str:
    """Draw an example-data picture into folder/name and return the name."""
    image = example_data.draw(shape, colour, corner, random.Random(0))
    if size:
        image = image.resize(size)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return name


def clip(folder: Path, name="clip.mp4", frames=16) -> str:
    """A 2 s clip (8 fps) of a red circle moving right, 112x112 pixels."""
    pictures = [example_data.draw_at("circle", "red", 0.3 + 0.4 * t / (frames - 1), 0.5, 18) for t in range(frames)]
    folder.mkdir(parents=True, exist_ok=True)
    example_data.write_clip(folder / name, pictures, fps=8)
    return name


def video_qa(video, question="Which way does the shape move?", answer="right", **settings) -> dict:
    """A one-turn sample about a video; settings are the part's own keys (fps, video_start, ...)."""
    content = [{"type": "video", "video": video, **settings}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def write_json(path: Path, samples) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples))
    return str(path)


def qa(image: str | None, question: str, answer: str) -> dict:
    """A one-turn sample, with an image when given."""
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def reference_labels(messages, collator) -> list[int]:
    """Labels built another way than assistant_labels: render the conversation up to each assistant
    turn and measure.

    The trained span of assistant turn k starts where the conversation before it (messages[:k]) and
    the turn's header "<|im_start|>assistant\n" end, and ends with the <|im_end|> that closes the turn.
    It holds all that the template writes into the turn: Qwen3.5's empty thinking block too.
    """

    def ids(conversation) -> list[int]:
        return collator.process([conversation])["input_ids"][0].tolist()

    tokenizer = collator.processor.tokenizer
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    full = ids(messages)
    labels = [-100] * len(full)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            before = ids(messages[:k])
            assert full[: len(before)] == before, "the template renders the turns before this one differently"
            start = len(before) + header
            end = full.index(collator.tokens.im_end, start) + 1
            labels[start:end] = full[start:end]
    return labels


def run_finetune(tiny_model, data, out: Path, *extra) -> str:
    """Run finetune.py's main on bad data; returns the error it exits with, checking nothing trained."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0", *extra])
    assert exit_info.value.code not in (0, None)
    assert not (out / "metrics.jsonl").exists()  # stopped before the first training step
    return str(exit_info.value.code)


def inspected(model, data, capsys, *flags) -> tuple[list[dict], str]:
    """inspect_data --json's input_ids and labels of each sample, and what it said about the data on stderr."""
    inspect_data.main(["--model", model, "--data", str(data), "--json", *flags])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    return [{key: row[key] for key in ("input_ids", "labels")} for row in rows], captured.err


def collate(collator, samples) -> dict:
    """The collator's batch as the loop hands it to the model: no sample failed, the list of failures removed."""
    batch = collator(samples)
    assert batch.pop("bad_samples") == []
    return batch


def loop_step(model, window) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loop's forward and backward over a window of micro-batches, without autocast: the mean loss
    per trained token and the gradients it leaves."""
    model.zero_grad()
    no_autocast = partial(torch.autocast, "cpu", enabled=False)
    loss_sum, trained = finetune.forward_backward(model, window, single_device(), no_autocast)
    return loss_sum / trained, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_step(step, reference, loss_tolerance: tuple[float, float], gradient_tolerance: tuple[float, float]):
    """(loss, gradients) equal to the reference's within (rtol, atol), the same parameters having gradients."""
    (loss, gradients), (reference_loss, reference_gradients) = step, reference
    torch.testing.assert_close(loss, reference_loss, rtol=loss_tolerance[0], atol=loss_tolerance[1])
    assert len(gradients) == len(reference_gradients) > 0
    for gradient, expected in zip(gradients, reference_gradients):
        torch.testing.assert_close(gradient, expected, rtol=gradient_tolerance[0], atol=gradient_tolerance[1])


def greedy_answer(model, tokenizer, inputs, max_new_tokens: int) -> str:
    """The model's own greedy answer to one prompt, by transformers' generate alone: the new tokens up to
    <|im_end|>, decoded without special tokens and stripped, as qwen_ft.generate documents its answers."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=im_end)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def transformers_model(name: str):
    """The model as transformers loads it, in fp32 and eval mode, as qwen_ft.generate runs it on the CPU."""
    return AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32).eval()
