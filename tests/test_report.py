"""The run report: summary.json and report.png drawn from metrics.jsonl, and never a failed run because of them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwen_ft import report

REPO = Path(__file__).resolve().parent.parent
STEPS, EVAL_EVERY = 40, 10


def synthetic_run(with_exact_match: bool = True) -> list[dict]:
    """Training lines with a falling loss and eval lines at step 0, every EVAL_EVERY steps and at the end, in the
    order finetune.py writes them (an eval line after the training line of its step)."""
    lines = []

    def evaluate(step, elapsed):
        line = {"step": step, "eval_loss": 3.0 - 0.05 * step, "eval_tokens": 900, "elapsed_s": elapsed}
        if with_exact_match:
            line["eval_exact_match"] = min(1.0, step / STEPS)
        lines.append(line)

    evaluate(0, 2.0)
    for step in range(1, STEPS + 1):
        tokens = 500 + 10 * (step % 7)
        lines.append(
            {
                "step": step,
                "epoch": step / STEPS,
                "loss": 3.0 / step + 0.1 * (step % 3),
                "lr": 1e-4 * min(1.0, step / 5),
                "grad_norm": 1.0 + 0.1 * (step % 5),
                "trained_tokens": 40 + step % 4,
                "tokens": tokens,
                "padded_tokens": 20 * (step % 2),
                "tokens_per_s": 1000.0 + 10 * step,
                "peak_memory_gib": 1.5 + 0.01 * (step % 9),
                "skipped_step": step == 13,
                "bad_steps": int(step >= 13),
                "skipped_samples": 2,
                "elapsed_s": 2.0 + step * 0.5,
            }
        )
        if step % EVAL_EVERY == 0:
            evaluate(step, 2.1 + step * 0.5)
    return lines


def write_metrics(folder, lines, tail: str = "") -> None:
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)


def test_summary_json_equals_values_computed_from_the_lines(tmp_path):
    lines = synthetic_run()
    write_metrics(tmp_path, lines)
    assert report.write_report(tmp_path) == [tmp_path / "summary.json", tmp_path / "report.png"]
    summary = json.loads((tmp_path / "summary.json").read_text())

    train = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_loss" in line]
    step_time = sum(line["tokens"] / line["tokens_per_s"] for line in train)
    assert summary["steps"] == STEPS == len(train)
    assert summary["wall_time_s"] == lines[-1]["elapsed_s"]  # the eval at the end comes after the last step
    assert summary["tokens"] == sum(line["tokens"] for line in train)
    assert summary["trained_tokens"] == sum(line["trained_tokens"] for line in train)
    assert summary["step_time_s"] == pytest.approx(step_time, abs=1e-3)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / step_time, abs=0.1)
    assert summary["peak_memory_gib"] == max(line["peak_memory_gib"] for line in train)
    assert summary["final_loss"] == train[-1]["loss"]
    assert summary["evals"] == len(evals) == STEPS // EVAL_EVERY + 1
    assert summary["first_eval_loss"] == evals[0]["eval_loss"]
    assert summary["final_eval_loss"] == summary["best_eval_loss"] == evals[-1]["eval_loss"]  # it only falls
    assert summary["best_eval_step"] == STEPS
    assert summary["first_eval_exact_match"] == 0.0
    assert summary["best_eval_exact_match"] == summary["final_eval_exact_match"] == 1.0
    assert summary["best_eval_exact_match_step"] == STEPS
    assert (summary["bad_steps"], summary["skipped_samples"]) == (1, 2)


def test_best_eval_is_the_lowest_loss_not_the_last(tmp_path):
    lines = synthetic_run(with_exact_match=False)
    evals = [line for line in lines if "eval_loss" in line]
    evals[-1]["eval_loss"] = evals[1]["eval_loss"] + 1.0  # overfitting at the end
    write_metrics(tmp_path, lines)
    report.write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    lowest = min(evals[:-1], key=lambda line: line["eval_loss"])
    assert (summary["best_eval_loss"], summary["best_eval_step"]) == (lowest["eval_loss"], lowest["step"])
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["best_eval_exact_match"] is None


def test_report_png_has_a_panel_per_quantity_drawn_from_the_lines(tmp_path):
    lines = synthetic_run()
    train = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_loss" in line]
    drawn = report.plot(lines, tmp_path / "report.png", "a run")
    assert drawn == {
        "loss": {"train": len(train), "train, smoothed": len(train), "eval": len(evals)},
        "eval exact match": {"eval": len(evals)},
        "learning rate": {"lr": len(train)},
        "grad norm": {"grad_norm": len(train)},
        "tokens/s": {"tokens_per_s": len(train)},
    }
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "report.png") as image:
        width, height = image.size
    assert width >= 800 and height >= 600  # three rows of two panels, readable


def test_no_exact_match_panel_without_generation_eval_and_nan_losses_are_left_out(tmp_path):
    lines = synthetic_run(with_exact_match=False)
    train = [line for line in lines if "loss" in line]
    train[12]["loss"] = math.nan  # a non-finite step: json writes NaN, and it would break the smoothed line
    drawn = report.plot(lines, tmp_path / "report.png")
    assert "eval exact match" not in drawn
    assert drawn["loss"]["train"] == drawn["loss"]["train, smoothed"] == len(train) - 1


def test_summary_json_stays_strict_json_when_the_last_loss_is_nan(tmp_path):
    lines = synthetic_run()
    [line for line in lines if "loss" in line][-1]["loss"] = math.nan
    write_metrics(tmp_path, lines)
    report.write_report(tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["final_loss"] is None


def test_smooth_is_a_trailing_mean():
    values = [float(v) for v in range(40)]  # window 2
    assert report.smooth(values)[:3] == [0.0, 0.5, 1.5]
    assert report.smooth([5.0]) == [5.0]


def test_a_partial_last_line_is_ignored(tmp_path):
    lines = synthetic_run()
    write_metrics(tmp_path, lines, tail='{"step": 41, "epoch": 1.02, "lo')  # the run is writing it
    assert len(report.read_metrics(tmp_path / "metrics.jsonl")) == len(lines)
    report.write_report(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == STEPS


def test_run_summary_counts_training_lines_only(tmp_path):
    lines = synthetic_run()
    write_metrics(tmp_path, lines)
    train = [line for line in lines if "loss" in line]
    tokens = sum(line["tokens"] for line in train)
    padded = sum(line["padded_tokens"] for line in train)
    assert report.run_summary(tmp_path / "metrics.jsonl") == (
        f"{STEPS} steps, {tokens:,} tokens, padding {padded / (tokens + padded):.1%} of the positions computed, "
        "1 non-finite steps skipped, 2 bad samples skipped"
    )
    write_metrics(tmp_path, [line for line in lines if "eval_loss" in line])  # an eval at step 0, then a crash
    assert report.run_summary(tmp_path / "metrics.jsonl") == "no training steps were taken"


def test_without_matplotlib_a_hint_and_still_summary_json(tmp_path, monkeypatch, capsys):
    write_metrics(tmp_path, synthetic_run())
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert report.write_report(tmp_path) == [tmp_path / "summary.json"]
    assert not (tmp_path / "report.png").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "qwen-ft[report]"' in err and "matplotlib" in err


def test_write_report_never_raises(tmp_path, capsys):
    assert report.write_report(tmp_path / "no-such-run") == []
    assert capsys.readouterr().err.startswith("warning: no summary.json")


def test_command_line(tmp_path):
    write_metrics(tmp_path, synthetic_run())
    result = subprocess.run(
        [sys.executable, "-m", "qwen_ft.report", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'report.png'}" in result.stdout and f"{STEPS} steps" in result.stdout
    assert (tmp_path / "report.png").stat().st_size > 10_000
    missing = subprocess.run(
        [sys.executable, "-m", "qwen_ft.report", str(tmp_path / "nothing")], cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 1 and "metrics.jsonl does not exist" in missing.stderr


def grpo_run() -> list[dict]:
    """finetune_grpo.py's lines: two reward functions, a greedy evaluation at step 0, 20 and 40."""
    lines = [{"step": 0, "eval_reward": 0.3, "eval_reward_exact": 0.25, "eval_reward_format": 0.5}]
    for step in range(1, STEPS + 1):
        lines.append(
            {
                "step": step, "loss": 0.01 * (step % 3), "reward": 0.3 + 0.01 * step, "reward_std": 0.4,
                "reward_exact": 0.2 + 0.01 * step, "reward_format": 0.5, "zero_std_groups": 0.25,
                "completion_length": 4 + step % 2, "completion_length_max": 8, "clip_fraction": 0.0,
                "generation_s": 1.0, "train_s": 2.0, "lr": 1e-4, "grad_norm": 1.0, "tokens": 600,
                "tokens_per_s": 200.0, "peak_memory_gib": None, "bad_steps": 0, "skipped_samples": 0,
            }
        )  # fmt: skip
        if step % 20 == 0:
            lines.append({"step": step, "eval_reward": 0.3 + step / 100, "eval_reward_exact": 0.2 + step / 100})
    return lines


def test_a_grpo_run_reports_its_rewards_their_parts_and_the_answers_lengths(tmp_path):
    lines = grpo_run()
    drawn = report.plot(lines, tmp_path / "report.png", "grpo")
    steps = STEPS
    assert drawn["reward"] == {"train": steps, "train, smoothed": steps, "eval (greedy)": 3}
    assert drawn["reward parts, smoothed"] == {"exact": steps, "format": steps}
    assert drawn["completion length"] == {"mean": steps, "longest": steps}
    assert drawn["seconds per step"] == {"generation": steps, "training": steps}
    write_metrics(tmp_path, lines)
    report.write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_reward"] == pytest.approx(sum(0.3 + 0.01 * s for s in range(37, 41)) / 4)
    assert (summary["first_eval_reward"], summary["final_eval_reward"]) == (0.3, 0.7)
    assert (summary["best_eval_reward"], summary["best_eval_reward_step"]) == (0.7, 40)
