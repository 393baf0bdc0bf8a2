"""Evaluation during training: the eval loss, the answers, the best checkpoint, under one process and two."""

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import collate, picture, qa, reference_labels, write_json
from test_distributed import torchrun
from transformers import AutoModelForImageTextToText

import finetune
from qwen_ft import generate
from qwen_ft.collate import Collator
from qwen_ft.config import parse_config
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.lora import add_lora
from qwen_ft.model import load_model, load_processor

COLOURS = ["red", "green", "blue", "yellow"]


def eval_data(folder: Path, n: int = 6) -> str:
    """Pictures with one- and two-turn conversations, and a text-only sample."""
    samples = [qa(picture(folder, f"{i}.png", colour=COLOURS[i % 4]), "What colour is the shape?", COLOURS[i % 4])
               for i in range(n - 2)]  # fmt: skip
    samples.append(qa(None, "How many corners has a square?", "four"))
    two_turns = qa(picture(folder, "t.png", colour="blue"), "What colour is the shape?", "blue")
    two_turns["messages"] += [
        {"role": "user", "content": [{"type": "text", "text": "And its shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
    ]
    samples.append(two_turns)
    return write_json(folder / "eval.json", samples)


def run(tiny_model, tmp_path, *extra) -> Path:
    out = tmp_path / "out"
    data = eval_data(tmp_path / "data")
    args = ["--model", tiny_model, "--data", data, "--eval-data", data, "--output-dir", str(out), "--precision", "fp32"]
    args += ["--num-workers", "0", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--save-every", "0"]
    finetune.train(parse_config([*args, *extra]), single_device())
    return out


def records(out: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def test_eval_loss_is_the_mean_cross_entropy_of_the_assistant_tokens_of_the_saved_model(tmp_path, tiny_model):
    out = run(tiny_model, tmp_path, "--max-steps", "3", "--eval-every", "2")
    _, evals = records(out)
    assert [r["step"] for r in evals] == [0, 2, 3]  # before the first step, every 2, after the last
    # Independently: the saved model, one sample at a time through transformers' own forward, with
    # labels found by rendering the conversation up to each assistant turn.
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    collator = Collator(load_processor(str(out)), max_length=4096)
    total, tokens = 0.0, 0
    for sample in json.loads(Path(tmp_path / "data" / "eval.json").read_text()):
        messages = [
            {"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else m["content"]} for m in sample["messages"]
        ]  # fmt: skip
        for message in messages:  # media paths relative to the data file, as the reader resolves them
            for part in message["content"]:
                if part["type"] == "image":
                    part["image"] = str(tmp_path / "data" / part["image"])
        batch = collator.process([messages])
        labels = torch.tensor([reference_labels(messages, collator)])
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1]
        targets = labels[0, 1:]
        total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        tokens += int((targets != -100).sum())
    assert evals[-1]["eval_tokens"] == tokens
    assert evals[-1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]  # it learned the eval set, which it trains on


def test_evaluation_runs_without_dropout_and_leaves_the_model_training(tmp_path, tiny_model):
    """With --lora the adapters' input has dropout (0.05): an evaluation in train mode would give another loss
    each time, and not the loss of the weights."""
    data = eval_data(tmp_path, n=4)
    cfg = parse_config(["--model", tiny_model, "--data", data, "--lora", "--batch-size", "2", "--num-workers", "0"])
    assert cfg.lora_dropout > 0
    collator = Collator(load_processor(tiny_model), max_length=4096)
    samples = read_samples(data)
    check_media(samples)
    model = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    model = add_lora(model, cfg.frozen(), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.dora)
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # adapters as training leaves them: B = 0 would hide the dropout
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    no_autocast = partial(torch.autocast, "cpu", enabled=False)
    model.train()
    evaluations = []
    for _ in range(2):
        evaluations.append(finetune.evaluate(model, samples, collator, cfg, single_device(), no_autocast, 1, tmp_path))
        assert model.training  # the loop goes on training after an evaluation
    # The reference: the model in eval mode, every sample in one batch, through transformers' own loss (the mean
    # over the batch's trained tokens).
    model.eval()
    with torch.no_grad():
        reference = model(**collate(collator, samples)).loss.item()
    assert [e["eval_loss"] for e in evaluations] == pytest.approx([reference] * 2, rel=1e-5)


def test_eval_answers_are_those_of_qwen_ft_generate(tmp_path, tiny_model, capsys):
    out = run(tiny_model, tmp_path, "--max-steps", "2", "--eval-generate", "4")
    _, evals = records(out)
    answers = [json.loads(line) for line in (out / "eval" / "step-00000002.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and evals[-1]["eval_exact_match"] == sum(a["exact_match"] for a in answers) / 4
    data = tmp_path / "data" / "first4.json"
    data.write_text(json.dumps(json.loads((tmp_path / "data" / "eval.json").read_text())[:4]))
    predictions = tmp_path / "predictions.jsonl"
    generate.main(["--model", str(out), "--data", str(data), "--out", str(predictions)])
    expected = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [a["prediction"] for a in answers] == [e["prediction"] for e in expected]
    assert [a["reference"] for a in answers] == [e["reference"] for e in expected]


def test_save_best_keeps_the_checkpoint_of_the_lowest_eval_loss(tmp_path, tiny_model, capsys):
    # Trained to answer "red", evaluated on "blue": the eval loss falls while the model learns the
    # answers' form, then rises as it learns that they are red.
    train = [qa(picture(tmp_path, f"r{i}.png", colour="red"), "What colour is the shape?", "red") for i in range(4)]
    held_out = [
        qa(picture(tmp_path, f"b{i}.png", colour="blue"), "What colour is the shape?", "blue") for i in range(4)
    ]
    args = [
        "--model",
        tiny_model,
        "--data",
        write_json(tmp_path / "train.json", train),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    args += ["--eval-data", write_json(tmp_path / "eval.json", held_out), "--eval-every", "1", "--save-best"]
    args += ["--max-steps", "6", "--save-every", "1", "--keep-last", "1", "--lr", "1e-3", "--warmup-steps", "0"]
    args += ["--precision", "fp32", "--num-workers", "0", "--batch-size", "2", "--grad-accum", "1"]
    finetune.train(parse_config(args), single_device())
    out = tmp_path / "out"
    _, evals = records(out)
    best = min((r for r in evals if r["step"] > 0), key=lambda r: r["eval_loss"])
    assert best["step"] < 6, "the run must not end at its best for this test to mean something"
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == [f"step-{best['step']:08d}", "step-00000006"]  # the best, and the last (--keep-last 1)
    assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] == best["step"]
    assert f"lowest eval loss {best['eval_loss']:.4f} at step {best['step']}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "sharding", [[], pytest.param(["--fsdp", "--eval-generate", "2"], marks=pytest.mark.slow)], ids=["ddp", "fsdp"]
)
def test_eval_under_two_processes_equals_one(tmp_path, tiny_model, sharding):
    train = eval_data(tmp_path / "train", n=4)  # one global batch of 4 per step
    held_out = eval_data(tmp_path / "eval", n=5)  # 3 batches of 2: rank 1 runs an empty one beside its own
    common = ["--model", tiny_model, "--data", train, "--eval-data", held_out, "--precision", "fp32", "--no-shuffle"]
    common += ["--num-workers", "0", "--max-steps", "2", "--eval-every", "1", "--lr", "1e-3", "--save-every", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune.train(parse_config([*common, "--output-dir", str(one), "--batch-size", "2", "--grad-accum", "2"]),
                   single_device())  # fmt: skip
    result = torchrun(*common, *sharding, "--output-dir", str(two), "--batch-size", "2", "--grad-accum", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    _, evals_one = records(one)
    _, evals_two = records(two)
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == [0, 1, 2]
    assert [r["eval_tokens"] for r in evals_two] == [r["eval_tokens"] for r in evals_one]
    for a, b in zip(evals_one, evals_two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_a_resumed_run_goes_on_with_its_eval_history_and_best_checkpoint(tmp_path, tiny_model, monkeypatch):
    data = eval_data(tmp_path / "data")
    args = ["--model", tiny_model, "--data", data, "--eval-data", data, "--precision", "fp32", "--num-workers", "0"]
    args += ["--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--max-steps", "4", "--eval-every", "1"]
    args += ["--save-every", "2", "--save-best"]
    finetune.train(parse_config([*args, "--output-dir", str(tmp_path / "whole")]), single_device())

    real, calls = finetune.forward_backward, []

    def crash_in_step_3(*inputs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return real(*inputs)

    monkeypatch.setattr(finetune, "forward_backward", crash_in_step_3)
    with pytest.raises(RuntimeError, match="went away"):
        finetune.train(parse_config([*args, "--output-dir", str(tmp_path / "cut")]), single_device())
    monkeypatch.undo()
    finetune.train(parse_config([*args, "--output-dir", str(tmp_path / "cut"), "--resume"]), single_device())

    whole, cut = records(tmp_path / "whole")[1], records(tmp_path / "cut")[1]
    assert [r["step"] for r in cut] == [r["step"] for r in whole] == [0, 1, 2, 3, 4]  # each evaluation once
    assert [r["eval_loss"] for r in cut] == pytest.approx([r["eval_loss"] for r in whole], rel=1e-6)
    best = [json.loads((tmp_path / run / "checkpoints" / "best.json").read_text()) for run in ("whole", "cut")]
    assert (
        best[0]["step"] == best[1]["step"]
        and (tmp_path / "cut" / "checkpoints" / f"step-{best[1]['step']:08d}").is_dir()
    )


def test_a_run_reports_to_tensorboard_draws_its_report_and_outlives_a_missing_tracker(
    tmp_path, tiny_model, monkeypatch, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this machine has
    out = run(tiny_model, tmp_path, "--max-steps", "3", "--eval-every", "2", "--report-to", "tensorboard,wandb")
    assert "--report-to wandb: cannot import wandb" in capsys.readouterr().err
    training, evals = records(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {name: [(e.step, e.value) for e in events.Scalars(name)] for name in ("loss", "eval_loss")}
    assert logged["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in training]
    assert logged["eval_loss"] == [(r["step"], pytest.approx(r["eval_loss"])) for r in evals]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
