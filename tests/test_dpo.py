"""finetune_dpo.py: preference pairs in each form, their checks, the DPO loss against a reference computed here,
the reference model, and the loop's first step."""

import json
import math
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import datasets
import pytest
import torch
from helpers import inspected, picture, run_finetune, write_json

import finetune_dpo
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.config import parse_config
from qwen_ft.data.media_check import check_media
from qwen_ft.data.pairs import PairCollator, Pairs, read_pairs
from qwen_ft.dist import single_device
from qwen_ft.lora import add_lora
from qwen_ft.model import load_model, set_trainable

REPO = Path(__file__).resolve().parent.parent
FROZEN = {"vision": True, "merger": False, "llm": False}
QUESTION = "What colour is the shape?"


def own(image="a.png", question=QUESTION, chosen="red", rejected="blue", history=()) -> dict:
    """A pair in qwen-ft's own form; history: earlier (question, answer) turns of the prompt."""
    prompt = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    user = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    return {"messages": [*prompt, {"role": "user", "content": user}], "chosen": chosen, "rejected": rejected}


def pairs_file(folder, pairs=None) -> str:
    picture(folder, "a.png")
    picture(folder, "b.png", shape="square", colour="blue", corner="bottom right")
    pairs = pairs or [
        own(),
        own("b.png", "What shape is it?", "square", "circle"),
        own("b.png", "Where is the shape?", "bottom right", "top left", history=[("Say hi", "hi")]),
        own("a.png", "Where is the shape?", "top left", "bottom left"),  # 4: two ranks take the same pairs as one
    ]
    return write_json(folder / "pairs.json", pairs)


# ------------------------------------------------------------------------------------------------------------
# Reading: every form gives the rows of qwen-ft's own form; only the last answer trains.


def trl_explicit(image, chosen, rejected):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    return {
        "images": [image],
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
    }


def trl_implicit(image, chosen, rejected):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    return {
        "images": [image],
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def sharegpt(image, chosen, rejected):
    return {
        "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
        "images": [image],
    }


FORMS = {"trl": trl_explicit, "trl-implicit": trl_implicit, "sharegpt": sharegpt}


@pytest.mark.parametrize("form", FORMS)
def test_each_pair_form_gives_the_rows_of_the_own_form(tmp_path, tiny_model, capsys, form):
    picture(tmp_path, "a.png")
    answers = [("red", "blue"), ("a red circle", "red")]
    reference = write_json(tmp_path / "own.json", [own("a.png", QUESTION, c, r) for c, r in answers])
    other = write_json(tmp_path / f"{form}.json", [FORMS[form]("a.png", c, r) for c, r in answers])
    expected, _ = inspected(tiny_model, reference, capsys, "--pairs")
    got, said = inspected(tiny_model, other, capsys, "--pairs")
    assert got == expected and len(got) == 4
    assert f"{form}.json: 2 pairs" in said


def test_a_parquet_of_questions_and_answers_reads_with_columns(tmp_path, tiny_model, capsys):
    """RLAIF-V's columns: an inline image, a question, a chosen and a rejected answer, under other names."""
    picture(tmp_path, "a.png")
    rows = {
        "image": [{"bytes": (tmp_path / "a.png").read_bytes(), "path": None}],
        "query": [QUESTION],
        "good": ["red"],
        "bad": ["blue"],
    }
    features = datasets.Features(
        {"image": datasets.Image(), **{k: datasets.Value("string") for k in ("query", "good", "bad")}}
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "pairs.parquet")
    expected, _ = inspected(tiny_model, write_json(tmp_path / "own.json", [own()]), capsys, "--pairs")
    columns = ["--columns", "question=query,chosen=good,rejected=bad"]
    got, said = inspected(tiny_model, tmp_path / "pairs.parquet", capsys, "--pairs", *columns)
    assert [row["labels"] for row in got] == [row["labels"] for row in expected]
    assert "pairs.parquet: 1 pairs, qa format" in said


def test_only_the_answer_trains_in_each_row(tmp_path, processor):
    """Labels built another way: the prompt rendered with its generation header; the answer is what follows."""
    data = pairs_file(tmp_path)
    sides = read_pairs(data, parse_config(["--data", data]), ())
    check_media(sides)
    collator = Collator(processor, 4096)
    pairs = Pairs(sides, torch.arange(len(sides) // 2).numpy())
    batch = PairCollator(collator)(list(pairs))
    assert batch["pairs"] == 4 and batch["input_ids"].shape[0] == 8
    rows = [(k, side) for side in (0, 1) for k in range(4)]  # the chosen rows, then the rejected ones
    for row, (k, side) in enumerate(rows):
        sample = sides.sample(2 * k + side)
        prompt = collator.process([sample.messages[:-1]], generation_prompt=True)["input_ids"][0].tolist()
        full = collator.process([sample.messages])["input_ids"][0].tolist()
        expected = [IGNORE_INDEX] * len(prompt) + full[
            len(prompt) : full.index(collator.tokens.im_end, len(prompt)) + 1
        ]
        got = batch["labels"][row][: len(expected)].tolist()
        assert got == expected
        assert (batch["labels"][row][len(expected) :] == IGNORE_INDEX).all()


BAD_PAIRS = {
    "identical answers": ({**own(), "rejected": "red"}, "'chosen' and 'rejected' are the same answer"),
    "identical in other forms": (
        {**own(), "chosen": [{"type": "text", "text": "red"}], "rejected": "red"},
        "'chosen' and 'rejected' are the same answer",
    ),
    "no rejected answer": ({k: v for k, v in own().items() if k != "rejected"}, "no 'rejected' answer"),
    "an empty chosen cell": ({**own(), "chosen": None}, "no 'chosen' answer"),
    "two messages as an answer": (
        {**own(), "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "'chosen' holds 2 messages",
    ),
    "an answer that is not the assistant's": (
        {**own(), "rejected": {"role": "user", "content": "blue"}},
        "'rejected' is a message of 'user'",
    ),
    "implicit prompts that differ": (
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
        },
        "differ before their last message",
    ),
    "a bad message in one side": ({**own(), "rejected": [{"type": "table"}]}, "rejected: message 1: unknown content"),
    "no prompt": ({"chosen": "a", "rejected": "b"}, "to read the pair's prompt from"),
}


@pytest.mark.parametrize("problem", BAD_PAIRS)
def test_a_bad_pair_stops_before_training_naming_file_pair_and_problem(tmp_path, tiny_model, problem):
    bad, message = BAD_PAIRS[problem]
    data = pairs_file(tmp_path, [own(), bad])
    error = run_finetune(tiny_model, data, tmp_path / "out", main=finetune_dpo.main)
    assert error.startswith("error: ") and len(error.splitlines()) == 1
    assert f"{data}: sample 1: " in error and message in error


# ------------------------------------------------------------------------------------------------------------
# The loss against a reference computed here from the model's own log-probabilities.


def reference_logps(model, batch) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens, the plain way: logits everywhere, log-softmax."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "pairs", "pair_numbers", "bad_samples")}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token * mask).sum(1)


def window_of(tmp_path, processor, sizes=(2, 1)) -> list[dict]:
    data = pairs_file(tmp_path)
    sides = read_pairs(data, parse_config(["--data", data]), ())
    check_media(sides)
    make = PairCollator(Collator(processor, 4096))
    pairs, start, window = list(Pairs(sides, torch.arange(3).numpy())), 0, []
    for size in sizes:
        window.append(make(pairs[start : start + size]))
        start += size
    return window


def step_of(model, reference, window, **flags) -> tuple[float, dict]:
    """forward_backward's mean loss over the window's pairs, and the gradients it leaves."""
    cfg = parse_config(["--precision", "fp32", *(f for k, v in flags.items() for f in (f"--{k}", str(v)))],
                       config=finetune_dpo.DPOConfig)  # fmt: skip
    no_autocast = partial(torch.autocast, "cpu", enabled=False)
    model.zero_grad()
    window = [{k: v for k, v in b.items() if k != "bad_samples"} for b in window]  # as the loop hands it over
    sums = finetune_dpo.forward_backward(model, reference, window, cfg, single_device(), no_autocast)
    stats = dict(zip(finetune_dpo.STATS, sums.tolist()))
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return stats, gradients


# IPO's β is small, as its τ usually is: its square then dwarfs the fp32 rounding of the summed log-probs.
@pytest.mark.parametrize(
    "loss, beta, rpo_alpha",
    [
        ("sigmoid", 0.3, 0.0),
        pytest.param("ipo", 0.05, 0.0, marks=pytest.mark.slow),
        pytest.param("sigmoid", 0.3, 0.5, marks=pytest.mark.slow),  # RPO
    ],
)
def test_the_loss_and_its_gradients_equal_the_equations_on_the_models_own_log_probabilities(
    tmp_path, tiny_model, processor, loss, beta, rpo_alpha
):
    torch.manual_seed(0)
    policy = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    set_trainable(policy, FROZEN)
    reference = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu")).requires_grad_(False)
    with torch.no_grad():  # a policy that differs from the reference, so the loss is not at its start
        for param in policy.model.language_model.layers[0].parameters():
            param.add_(torch.randn_like(param) * 0.02)
    window = window_of(tmp_path, processor)
    stats, gradients = step_of(policy, reference, window, beta=beta, loss=loss, **{"rpo-alpha": rpo_alpha})

    # The reference: DPO (Rafailov et al. 2023, eq. 7), IPO (Azar et al. 2023, eq. 17), RPO's NLL per token.
    policy.zero_grad()
    terms, nll, chosen_tokens, pairs = [], 0.0, 0, sum(b["pairs"] for b in window)
    for batch in window:
        n = batch["pairs"]
        pi, ref = reference_logps(policy, batch), reference_logps(reference, batch).detach()
        h = (pi[:n] - ref[:n]) - (pi[n:] - ref[n:])
        terms.append(-torch.log(torch.sigmoid(beta * h)) if loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
        nll = nll - pi[:n].sum()
        chosen_tokens += int((batch["labels"][:n, 1:] != IGNORE_INDEX).sum())
    total = torch.cat(terms).sum() / pairs + rpo_alpha * nll / chosen_tokens
    total.backward()

    assert stats["pairs"] == pairs == 3
    assert stats["loss"] / pairs == pytest.approx(torch.cat(terms).mean().item(), rel=1e-6)
    for name, param in policy.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(gradients[name], param.grad.float(), rtol=1e-5, atol=1e-6)


def test_the_first_step_has_the_loss_ln_2_and_no_reward(tmp_path, tiny_model):
    """Policy and reference are the same model at the first step: every log-ratio is 0."""
    data = pairs_file(tmp_path)
    out = tmp_path / "out"
    flags = ["--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0", "--precision"]
    finetune_dpo.main([*flags, "fp32", "--max-steps", "1", "--batch-size", "3", "--grad-accum", "1", "--lora"])
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert record["rewards_chosen"] == record["rewards_rejected"] == record["reward_margin"] == 0
    assert record["reward_accuracy"] == 0 and record["pairs"] == 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "report.png").is_file()


def test_the_lora_reference_is_the_base_model_with_the_merger_trained_in_full(tmp_path, tiny_model, processor):
    base = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    model = add_lora(load_model(tiny_model, "fp32", "sdpa", torch.device("cpu")), FROZEN, 4, 8, 0.0, "llm", False)
    with torch.no_grad():  # trained adapters, and a merger that moved: the policy is no longer the base
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    assert any(".modules_to_save." in name for name, p in model.named_parameters() if p.requires_grad)
    (batch,) = window_of(tmp_path, processor, sizes=(3,))
    no_autocast = partial(torch.autocast, "cpu", enabled=False)
    numbers = batch["pair_numbers"]
    inputs = {k: v for k, v in batch.items() if k not in ("pairs", "pair_numbers", "bad_samples")}
    with torch.no_grad():
        policy = finetune_dpo.answer_logps(model, inputs, no_autocast)
        expected = finetune_dpo.answer_logps(base, inputs, no_autocast)
    got = finetune_dpo.reference_answer_logps(model, inputs, numbers, no_autocast)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(policy, expected, rtol=1e-3)
    torch.testing.assert_close(reference_logps(base, batch).float(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The loop: resume, precomputed reference, several processes (the slow tier: whole runs).


def dpo_flags(tiny_model, data, out, *extra) -> list[str]:
    return [
        "--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0", "--no-shuffle",
        "--precision", "fp32", "--lr", "1e-3", "--warmup-steps", "0", "--max-steps", "4", "--batch-size", "1",
        "--grad-accum", "2", *extra,
    ]  # fmt: skip


def losses(out) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def dpo_train(args):
    return finetune_dpo.train(parse_config(args, config=finetune_dpo.DPOConfig), single_device())


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--lora", "--lora-dropout", "0", "--lora-r", "4"]])
def test_a_signal_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, mode, monkeypatch, capsys):
    data = pairs_file(tmp_path)
    dpo_train(dpo_flags(tiny_model, data, tmp_path / "reference", *mode))
    args = dpo_flags(tiny_model, data, tmp_path / "out", *mode)
    calls, real = [], finetune_dpo.forward_backward

    def forward_backward(*a, **k):  # SIGTERM during step 2: the step finishes, a checkpoint, the run returns
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    with monkeypatch.context() as patched:
        patched.setattr(finetune_dpo, "forward_backward", forward_backward)
        dpo_train(args)
    assert len(losses(tmp_path / "out")) == 2 and "stopped after step 2" in capsys.readouterr().out
    dpo_train([*args, "--resume"])
    assert losses(tmp_path / "out") == losses(tmp_path / "reference")  # bit for bit


@pytest.mark.slow
def test_the_precomputed_reference_gives_the_steps_of_the_frozen_copy(tmp_path, tiny_model):
    data = pairs_file(tmp_path)
    eval_data = ["--eval-data", data]
    dpo_train(dpo_flags(tiny_model, data, tmp_path / "copy", *eval_data))
    dpo_train(dpo_flags(tiny_model, data, tmp_path / "precomputed", *eval_data, "--precompute-ref"))
    assert losses(tmp_path / "precomputed") == pytest.approx(losses(tmp_path / "copy"), rel=1e-6)
    assert len(list((tmp_path / ".qwen-ft-data-index").glob("reference-*.pt"))) == 2  # training and eval pairs
    rows = [json.loads(line) for line in (tmp_path / "precomputed" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_loss" in row]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2)) and evals[-1]["eval_reward_accuracy"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--lora", "--lora-dropout", "0", "--lora-r", "4"]])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_model, mode):
    data = pairs_file(tmp_path)
    dpo_train(dpo_flags(tiny_model, data, tmp_path / "one", "--batch-size", "2", "--grad-accum", "1", *mode))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(REPO / "finetune_dpo.py"), *dpo_flags(tiny_model, data, tmp_path / "two", *mode)]
    command[command.index("--grad-accum") + 1] = "1"
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert run.stdout.count("saved the fine-tuned model") == 1
