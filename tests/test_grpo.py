"""finetune_grpo.py: its advantages and objective against references computed here another way, the rollouts,
rewards that fail, exact resume and DDP."""

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import picture, qa, write_json

import finetune_grpo
from qwen_ft import lock
from qwen_ft.checkpoint import complete_checkpoints
from qwen_ft.collate import Collator
from qwen_ft.config import parse_config
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.model import load_model, load_processor
from qwen_ft.rollout import PromptCollator, check_prompts, with_completions

REPO = Path(__file__).resolve().parent.parent
GROUP = 4
# Fixed answers, one per row of a group, so that a step can be computed without sampling.
ANSWERS = ["red", "blue", "a green square", "red"]
NO_AUTOCAST = partial(torch.autocast, "cpu", enabled=False)


def dataset(folder) -> str:
    samples = [
        qa(picture(folder, "red.png", colour="red"), "What colour is the shape?", "red"),
        qa(picture(folder, "blue.png", "square", "blue", "bottom right"), "What colour is the shape?", "blue"),
        qa(None, "How many corners does a square have?", "four"),
        qa(picture(folder, "green.png", "triangle", "green", "top right"), "What is it?", "a green triangle"),
    ]
    return write_json(folder / "data.json", samples)


def config(tiny_model, data, out, *extra) -> finetune_grpo.GRPOConfig:
    args = [
        "--model",
        tiny_model,
        "--data",
        data,
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
        "--precision",
        "fp32",
        "--num-generations",
        str(GROUP),
        "--max-new-tokens",
        "4",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "0",
        *extra,
    ]
    return parse_config(args, config=finetune_grpo.GRPOConfig)


def fixed_completions(collator: Collator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ANSWERS over and over, each with its <|im_end|>, right-padded: (rows, longest) ids and the answers' mask."""
    tokenizer = collator.processor.tokenizer
    answers = [
        tokenizer.encode(ANSWERS[row % GROUP], add_special_tokens=False) + [collator.tokens.im_end]
        for row in range(rows)
    ]
    longest = max(map(len, answers))
    ids = torch.full((rows, longest), tokenizer.pad_token_id)
    mask = torch.zeros(rows, longest, dtype=torch.bool)
    for row, answer in enumerate(answers):
        ids[row, : len(answer)] = torch.tensor(answer)
        mask[row, : len(answer)] = True
    return ids, mask


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    samples = read_samples(dataset(folder))
    collator = Collator(load_processor(tiny_model), max_length=4096)
    model = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    return samples, collator, model, dataset(folder)


def window_of(samples, collator, micro_batches, seed=0, old=False, reference=False) -> list[dict]:
    """Micro-batches of fixed rollouts with made-up rewards: advantages, and old and reference log-probs that
    differ from the model's, so that the clip and the KL both act."""
    generator = torch.Generator().manual_seed(seed)
    window = []
    for indices in micro_batches:
        prompts = PromptCollator(collator, GROUP)([samples[i] for i in indices])
        completion, mask = fixed_completions(collator, len(prompts["samples"]))
        rollout = {"batch": with_completions(prompts["prompt"], completion, mask), "mask": mask}
        rollout["advantages"] = torch.randn(len(mask), generator=generator)
        rollout["old_logps"] = -torch.rand(mask.shape, generator=generator) * 3 if old else None
        rollout["ref_logps"] = -torch.rand(mask.shape, generator=generator) * 3 if reference else None
        window.append(rollout)
    return window


def reference_objective(model, window, cfg) -> torch.Tensor:
    """GRPO's loss written out token by token from the paper's sums: logits at every position (no
    logits_to_keep), fp32 log-softmax, and plain loops."""
    answers = []  # each answer's token losses
    for rollout in window:
        batch, mask = rollout["batch"], rollout["mask"]
        prompt_length = batch["input_ids"].shape[1] - mask.shape[1]
        logprobs = torch.log_softmax(model(**batch).logits.float() / cfg.temperature, dim=-1)
        for row in range(len(mask)):
            losses = []
            for t in range(int(mask[row].sum())):
                token = batch["input_ids"][row, prompt_length + t]
                logp = logprobs[row, prompt_length + t - 1, token]
                old = rollout["old_logps"][row, t] if rollout["old_logps"] is not None else logp.detach()
                ratio, advantage = torch.exp(logp - old), rollout["advantages"][row]
                clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon_high)
                loss = -torch.minimum(ratio * advantage, clipped * advantage)
                if cfg.beta:
                    ref = rollout["ref_logps"][row, t]
                    loss = loss + cfg.beta * (torch.exp(ref - logp) - (ref - logp) - 1)
                losses.append(loss)
            answers.append(losses)
    if cfg.loss_type == "grpo":
        return sum(sum(losses) / len(losses) for losses in answers) / len(answers)
    total = sum(sum(losses) for losses in answers)
    if cfg.loss_type == "dr-grpo":
        return total / (len(answers) * cfg.max_new_tokens)
    return total / sum(len(losses) for losses in answers)


def step_and_gradients(model, window, cfg) -> tuple[dict, list[torch.Tensor]]:
    model.zero_grad()
    objective = finetune_grpo.policy_backward(model, window, cfg, single_device(), NO_AUTOCAST)
    return objective, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def reference_gradients(model, loss) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_type", ["grpo", "dr-grpo", "dapo"])
def test_the_loss_of_a_step_equals_the_objective_written_out(setup, tmp_path, tiny_model, loss_type):
    samples, collator, model, data = setup
    cfg = config(
        tiny_model,
        data,
        tmp_path,
        "--loss-type",
        loss_type,
        "--beta",
        "0.1",
        "--epsilon",
        "0.1",
        "--epsilon-high",
        "0.3",
        "--temperature",
        "0.7",
        "--num-iterations",
        "2",
    )
    # Two micro-batches of unequal lengths (one holds the text-only sample): the averages are over the window.
    window = window_of(samples, collator, [[0, 2], [3]], old=True, reference=True)
    objective, gradients = step_and_gradients(model, window, cfg)
    expected = reference_objective(model, window, cfg)
    assert objective["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < objective["clip_fraction"] < 1 and objective["kl"] > 0  # the clip and the KL both take part
    for got, want in zip(gradients, reference_gradients(model, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_with_one_iteration_and_no_kl_the_ratio_is_1_and_the_gradient_that_of_policy_gradient(
    setup, tmp_path, tiny_model
):
    samples, collator, model, data = setup
    cfg = config(tiny_model, data, tmp_path)  # --loss-type dapo, --beta 0, --num-iterations 1
    window = window_of(samples, collator, [[0, 1], [2, 3]])
    objective, gradients = step_and_gradients(model, window, cfg)
    # -mean(A · log π) over every answer token of the window, from logits at every position.
    total, tokens = 0, 0
    for rollout in window:
        batch, mask = rollout["batch"], rollout["mask"]
        logits = model(**batch).logits[:, -mask.shape[1] - 1 : -1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(-1, batch["input_ids"][:, -mask.shape[1] :, None])[..., 0]
        total = total - (rollout["advantages"][:, None] * logps * mask).sum()
        tokens += mask.sum()
    expected = total / tokens
    # The ratio is 1, so the loss is -mean(A) over the tokens, whatever the log-probs.
    mean_advantage = sum((r["advantages"][:, None] * r["mask"]).sum() for r in window) / tokens
    assert objective["loss"] == pytest.approx(-mean_advantage.item(), rel=1e-5)
    assert objective["clip_fraction"] == 0
    for got, want in zip(gradients, reference_gradients(model, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_advantages_per_scale_rewards():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0, 1.0, 1.0])  # 3 groups of 4; the 2nd all equal
    groups = rewards.reshape(3, GROUP)
    centred = (groups - groups.mean(axis=1, keepdims=True)).flatten()
    expected = {
        "group": centred / (np.repeat(groups.std(axis=1, ddof=1), GROUP) + 1e-4),
        "batch": centred / (rewards.std(ddof=1) + 1e-4),
        "none": centred,
    }
    for scale, want in expected.items():
        got = finetune_grpo.group_advantages(torch.tensor(rewards), GROUP, scale, torch.tensor(rewards))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert (finetune_grpo.group_advantages(torch.tensor(rewards), GROUP, "group", None)[4:8] == 0).all()


def test_prompts_are_the_conversation_before_the_last_answer_and_are_checked(setup, tmp_path):
    samples, collator, _, _ = setup
    prompts = PromptCollator(collator, GROUP)([samples[0], samples[2]])
    assert prompts["references"] == ["red"] * GROUP + ["four"] * GROUP
    ids = prompts["prompt"]["input_ids"]
    assert (ids[:GROUP] == ids[0]).all() and (ids[GROUP:] == ids[GROUP]).all()  # a group: one prompt, repeated
    assert (prompts["prompt"]["attention_mask"][:, -1] == 1).all()  # left-padded: every row ends with its prompt
    text = collator.processor.tokenizer.decode(ids[GROUP][prompts["prompt"]["attention_mask"][GROUP] == 1])
    assert text.endswith("How many corners does a square have?<|im_end|>\n<|im_start|>assistant\n")
    asked = write_json(
        tmp_path / "asked.json",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"},
                ]
            }
        ],
    )
    with pytest.raises(Exception, match=r"asked.json: sample 0: the last message is a user's"):
        check_prompts(read_samples(asked))


def run(cfg) -> list[dict]:
    finetune_grpo.train(cfg, single_device())
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


def signal_during_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process during the step-th policy update, as `kill` would send it."""
    calls, real = [], finetune_grpo.policy_backward

    def policy_backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_grpo, "policy_backward", policy_backward)


@pytest.mark.parametrize("iterations", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_signal_then_resume_samples_and_trains_as_if_never_interrupted(
    setup, tmp_path, tiny_model, monkeypatch, capsys, iterations
):
    _, _, _, data = setup
    # A reward of the sampled text itself: the tiny random model's answers are random tokens, never right.
    (tmp_path / "rewards.py").write_text(
        "def chars(completions, references, samples):\n    return [float(len(c) % 5) for c in completions]\n"
    )
    flags = [
        "--max-steps",
        str(3 * iterations),
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--temperature",
        "1.5",
        "--num-iterations",
        str(iterations),
        "--save-every",
        str(2 * iterations),
        "--reward",
        f"{tmp_path / 'rewards.py'}:chars",
    ]
    reference = run(config(tiny_model, data, tmp_path / "reference", *flags))
    with monkeypatch.context() as patched:
        # The first step of the second batch of rollouts; with 2 iterations the run finishes that batch's
        # second step before it stops, as checkpoints fall between batches of rollouts.
        signal_during_step(patched, iterations + 1)
        stopped = run(config(tiny_model, data, tmp_path / "out", *flags))
    assert len(stopped) == 2 * iterations
    assert complete_checkpoints(tmp_path / "out")[-1].name == f"step-{2 * iterations:08d}"
    assert f"stopped after step {2 * iterations}" in capsys.readouterr().out
    resumed = run(config(tiny_model, data, tmp_path / "out", *flags, "--resume"))
    keys = ("loss", "reward", "reward_std", "completion_length", "grad_norm")
    assert [[row[k] for k in keys] for row in resumed] == [[row[k] for k in keys] for row in reference]
    # The answers sampled matter: they differ in reward, and so give a gradient (not the loss: with the ratio 1
    # and every answer cut at --max-new-tokens, it is minus the mean advantage, 0 but for rounding).
    assert all(row["reward_std"] > 0 and row["grad_norm"] > 0 for row in reference)


def test_a_run_into_a_folder_another_run_holds_stops_with_one_line(setup, tmp_path, tiny_model, capsys):
    _, _, _, data = setup
    held = lock.take(tmp_path / "out")  # as a run in progress holds it
    try:
        with pytest.raises(SystemExit) as stopped:
            finetune_grpo.main(["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path / "out")])
    finally:
        held.release()
    error = str(stopped.value.code)  # one process: main() exits with the line, as finetune.py's does
    assert "\n" not in error and error.startswith(f"error: {tmp_path / 'out'} is in use by a run: pid {os.getpid()}")


def test_the_iou_reward_on_data_without_boxes_stops_before_the_model_loads(setup, tmp_path, tiny_model, capsys):
    _, _, _, data = setup
    with pytest.raises(SystemExit) as stopped:
        finetune_grpo.main(["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path), "--reward", "iou"])
    assert (
        stopped.value.code
        == f"error: --reward iou: no sample of {data} has a box in its answer to measure answers against"
    )


def test_a_reward_function_that_fails_stops_the_run_with_one_line(setup, tmp_path, tiny_model, capsys):
    _, _, _, data = setup
    (tmp_path / "rewards.py").write_text("def broken(completions, references, samples):\n    return [1.0]\n")
    cfg = [
        "--model",
        tiny_model,
        "--data",
        data,
        "--output-dir",
        str(tmp_path / "out"),
        "--num-workers",
        "0",
        "--precision",
        "fp32",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "2",
        "--batch-size",
        "2",
        "--reward",
        f"exact,{tmp_path / 'rewards.py'}:broken",
    ]
    with pytest.raises(SystemExit) as stopped:
        finetune_grpo.main(cfg)
    error = str(stopped.value.code)
    assert "\n" not in error and (
        error.startswith("error: reward function ")
        and "rewards.py:broken returned 1 rewards for 4 completions" in error
    )
    assert "data.json: sample" in error


DDP_SCRIPT = """
import sys, torch
import finetune_grpo

def fixed(model, prompt, collator, max_new_tokens, temperature, top_p, seed, synced_gpus=False):
    tokenizer = collator.processor.tokenizer
    answers = [tokenizer.encode(["red", "blue", "a green square", "red"][row % 4], add_special_tokens=False)
               + [collator.tokens.im_end] for row in range(len(prompt["input_ids"]))]
    ids = torch.full((len(answers), max(map(len, answers))), tokenizer.pad_token_id)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, answer in enumerate(answers):
        ids[row, : len(answer)], mask[row, : len(answer)] = torch.tensor(answer), True
    return ids.to(prompt["input_ids"].device), mask.to(prompt["input_ids"].device)

finetune_grpo.sample_completions = fixed
finetune_grpo.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--lora", "--lora-r", "4", "--beta", "0.1"]])
def test_ddp_equals_one_process_on_fixed_completions(setup, tmp_path, tiny_model, mode):
    _, _, _, data = setup
    script = tmp_path / "fixed.py"
    script.write_text(DDP_SCRIPT)
    flags = [
        "--model",
        tiny_model,
        "--data",
        data,
        "--num-workers",
        "0",
        "--precision",
        "fp32",
        "--num-generations",
        str(GROUP),
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "0",
        "--scale-rewards",
        "batch",
        "--num-iterations",
        "1",
        "--no-shuffle",
        *mode,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run(
        [sys.executable, str(script), *flags, "--batch-size", "2", "--output-dir", str(tmp_path / "one")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            *flags,
            "--batch-size",
            "1",
            "--output-dir",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        for key in ("loss", "reward", "reward_std", "completion_length", "grad_norm", "kl"):
            assert (key in a) == (key in b) and a.get(key, 0) == pytest.approx(b.get(key, 0), rel=1e-4), key


@pytest.mark.slow
def test_fsdp_samples_trains_evaluates_and_saves(setup, tmp_path, tiny_model):
    """Sampling under FSDP: every forward of generate gathers weights on all ranks, which keep stepping until
    the last has finished (synced_gpus), however long each rank's answers are."""
    _, _, _, data = setup
    args = [
        "--model",
        tiny_model,
        "--data",
        data,
        "--eval-data",
        data,
        "--output-dir",
        str(tmp_path / "out"),
        "--num-workers",
        "0",
        "--precision",
        "fp32",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "6",
        "--max-steps",
        "2",
        "--batch-size",
        "1",
        "--fsdp",
        "--temperature",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(REPO / "finetune_grpo.py"),
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert [row["step"] for row in rows if "eval_reward" in row] == [0, 2]
    assert (tmp_path / "out" / "model.safetensors").exists()
