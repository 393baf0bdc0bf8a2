"""What a run did, read back from metrics.jsonl (which keeps one line per step across resumes).

    python -m qwen_ft.report OUTPUT_DIR    # at any time, also while the run is going

writes OUTPUT_DIR/summary.json (totals, throughput, best eval) and OUTPUT_DIR/report.png (loss, eval loss and exact
match, learning rate, grad norm and tokens/s against steps; for a preference run, its rewards and reward accuracy).
finetune.py and finetune_dpo.py call write_report at the end of a run. The plot needs matplotlib
(pip install "qwen-ft[report]"); summary.json doesn't.
"""

import json
import math
import sys
from pathlib import Path

HINT = 'pip install "qwen-ft[report]" (or pip install matplotlib) to get report.png'


def read_metrics(metrics_path: Path) -> list[dict]:
    """The lines of metrics.jsonl. A line that doesn't parse (the last one, while the run writes it) is left out."""
    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def training_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "loss" in row]  # eval lines have eval_loss and no loss


def eval_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "eval_loss" in row]


def reward_eval_rows(rows: list[dict]) -> list[dict]:
    """The evaluations of a GRPO run (finetune_grpo.py): greedy answers scored by its reward functions."""
    return [row for row in rows if finite(row.get("eval_reward"))]


def run_summary(metrics_path: Path) -> str:
    """One line: steps, tokens, the share of computed positions that were padding, and what was skipped."""
    rows = training_rows(read_metrics(metrics_path)) if Path(metrics_path).is_file() else []
    if not rows:
        return "no training steps were taken"
    tokens = sum(row["tokens"] for row in rows)
    # Absent from lines written before it was logged, and from GRPO's, whose rows are rollouts.
    padded = sum(row.get("padded_tokens", 0) for row in rows)
    logged = any("padded_tokens" in row for row in rows)
    padding = f"padding {padded / (tokens + padded):.1%} of the positions computed, " if logged else ""
    return (
        f"{len(rows)} steps, {tokens:,} tokens, {padding}"
        f"{rows[-1]['bad_steps']} non-finite steps skipped, {rows[-1]['skipped_samples']} bad samples skipped"
    )


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarize(rows: list[dict]) -> dict:
    """The numbers of summary.json, from the lines of metrics.jsonl."""
    train, evals = training_rows(rows), eval_rows(rows)
    # Each line's step time is tokens / tokens_per_s: the time of the steps alone, without evaluation,
    # checkpoints and start-up, so tokens_per_s is the throughput of training itself (wall_time_s has the rest).
    timed = [row for row in train if finite(row.get("tokens_per_s")) and row["tokens_per_s"] > 0]
    step_time = sum(row["tokens"] / row["tokens_per_s"] for row in timed)
    memory = [row["peak_memory_gib"] for row in train if finite(row.get("peak_memory_gib"))]
    elapsed = [row["elapsed_s"] for row in rows if finite(row.get("elapsed_s"))]
    scored = [row for row in evals if finite(row["eval_loss"])]
    best = min(scored, key=lambda row: row["eval_loss"], default=None)  # the first of equals: min keeps it
    matched = [row for row in evals if finite(row.get("eval_exact_match"))]
    best_match = max(matched, key=lambda row: row["eval_exact_match"], default=None)
    last = train[-1] if train else {}
    summary = {
        "steps": len(train),
        "epochs": last.get("epoch"),
        "wall_time_s": max(elapsed, default=None),
        "step_time_s": round(step_time, 3),
        "tokens": sum(row["tokens"] for row in train),
        "trained_tokens": sum(row.get("trained_tokens", 0) for row in train),
        "padded_tokens": sum(row.get("padded_tokens", 0) for row in train),
        "tokens_per_s": round(sum(row["tokens"] for row in timed) / step_time, 1) if step_time else None,
        "peak_memory_gib": max(memory, default=None),
        "final_loss": last.get("loss"),
        "evals": len(evals),
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "first_eval_exact_match": matched[0]["eval_exact_match"] if matched else None,
        "final_eval_exact_match": matched[-1]["eval_exact_match"] if matched else None,
        "best_eval_exact_match": best_match["eval_exact_match"] if best_match else None,
        "best_eval_exact_match_step": best_match["step"] if best_match else None,
        # Preference runs (finetune_dpo.py): the share of pairs whose chosen answer the model prefers.
        "final_reward_accuracy": last.get("reward_accuracy"),
        "first_eval_reward_accuracy": evals[0].get("eval_reward_accuracy") if evals else None,
        "final_eval_reward_accuracy": evals[-1].get("eval_reward_accuracy") if evals else None,
        **reward_summary(rows),
        "bad_steps": last.get("bad_steps", 0),
        "skipped_samples": last.get("skipped_samples", 0),
    }
    # Strict JSON has no NaN: the loss of a last step that was skipped as non-finite becomes null.
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in summary.items()
    }


def reward_summary(rows: list[dict]) -> dict:
    """A GRPO run's rewards: the mean of its last tenth of steps, and its evaluations' first, last and best."""
    train, evals = [row for row in training_rows(rows) if finite(row.get("reward"))], reward_eval_rows(rows)
    if not train and not evals:
        return {}
    tail = train[-max(1, len(train) // 10) :]
    best = max(evals, key=lambda row: row["eval_reward"], default=None)
    return {
        "final_reward": sum(row["reward"] for row in tail) / len(tail) if tail else None,
        "first_eval_reward": evals[0]["eval_reward"] if evals else None,
        "final_eval_reward": evals[-1]["eval_reward"] if evals else None,
        "best_eval_reward": best["eval_reward"] if best else None,
        "best_eval_reward_step": best["step"] if best else None,
    }


def smooth(values: list[float]) -> list[float]:
    """Trailing mean over 5% of the run (at least one point): the trend through the noise of single steps."""
    window = max(1, len(values) // 20)
    sums = [0.0]  # running sums: each mean is one subtraction, however long the run
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(values))]


def plot(rows: list[dict], png_path: Path, title: str = "") -> dict[str, dict[str, int]]:
    """Draw report.png. Returns what each panel shows: {panel title: {line label: number of points}}."""
    # A Figure drawn by the Agg canvas, not pyplot: a file only, no window, and no change to the backend of
    # whatever else runs in this process (a notebook, say).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = training_rows(rows), eval_rows(rows)

    def points(lines, key):
        kept = [row for row in lines if finite(row.get(key))]  # NaN losses of skipped steps, nulls: left out
        return [row["step"] for row in kept], [row[key] for row in kept]

    loss_steps, losses = points(train, "loss")
    panels = {  # panel title -> {line label: (steps, values, matplotlib style)}
        "loss": {
            "train": (loss_steps, losses, dict(color="tab:blue", alpha=0.3, linewidth=0.8)),
            "train, smoothed": (loss_steps, smooth(losses), dict(color="tab:blue", linewidth=1.8)),
            "eval": (*points(evals, "eval_loss"), dict(color="tab:orange", marker="o", linewidth=1.5)),
        },
        "eval exact match": {"eval": (*points(evals, "eval_exact_match"), dict(color="tab:green", marker="o"))},
        "learning rate": {"lr": (*points(train, "lr"), {})},
        "grad norm": {"grad_norm": (*points(train, "grad_norm"), dict(linewidth=0.8))},
        "tokens/s": {"tokens_per_s": (*points(train, "tokens_per_s"), dict(linewidth=0.8))},
    }
    if not panels["eval exact match"]["eval"][0]:
        del panels["eval exact match"]  # generation eval was off: no empty panel
    if any(finite(row.get("reward_accuracy")) for row in train):  # a preference run (finetune_dpo.py)
        panels["rewards"] = {
            "chosen": (*points(train, "rewards_chosen"), dict(color="tab:green", linewidth=0.8)),
            "rejected": (*points(train, "rewards_rejected"), dict(color="tab:red", linewidth=0.8)),
            "margin": (*points(train, "reward_margin"), dict(color="tab:blue", linewidth=1.2)),
        }
        panels["reward accuracy"] = {
            "train": (*points(train, "reward_accuracy"), dict(color="tab:blue", alpha=0.5, linewidth=0.8)),
            "eval": (*points(evals, "eval_reward_accuracy"), dict(color="tab:orange", marker="o")),
        }
    if any(finite(row.get("completion_length")) for row in train):  # a GRPO run (finetune_grpo.py)
        reward_steps, rewards = points(train, "reward")
        panels["reward"] = {
            "train": (reward_steps, rewards, dict(color="tab:blue", alpha=0.3, linewidth=0.8)),
            "train, smoothed": (reward_steps, smooth(rewards), dict(color="tab:blue", linewidth=1.8)),
            "eval (greedy)": (*points(reward_eval_rows(rows), "eval_reward"), dict(color="tab:orange", marker="o")),
        }
        names = sorted({key for row in train for key in row if key.startswith("reward_")} - {"reward_std"})
        if len(names) > 1:  # one reward function: its part is the reward above
            panels["reward parts, smoothed"] = {}
            for name in names:
                steps, values = points(train, name)
                panels["reward parts, smoothed"][name[len("reward_") :]] = (steps, smooth(values), {})
        panels["completion length"] = {
            "mean": (*points(train, "completion_length"), dict(linewidth=1.2)),
            "longest": (*points(train, "completion_length_max"), dict(linewidth=0.8, alpha=0.6)),
        }
        panels["seconds per step"] = {
            "generation": (*points(train, "generation_s"), dict(linewidth=0.8)),
            "training": (*points(train, "train_s"), dict(linewidth=0.8)),
        }

    columns = 2
    rows_of_panels = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(12, 3.6 * rows_of_panels))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows_of_panels, columns, squeeze=False)
    drawn = {}
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        for label, (steps, values, style) in lines.items():
            if steps:
                ax.plot(steps, values, label=label, **style)
        drawn[panel] = {line.get_label(): len(line.get_xdata()) for line in ax.get_lines()}  # read back from the plot
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        if panel in ("eval exact match", "reward accuracy"):
            ax.set_ylim(-0.02, 1.02)  # a share: the whole range, so that a rise looks as big as it is
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return drawn


def headline(name: str, summary: dict) -> str:
    """The figure's title: what the run is and how it ended."""
    parts = [name, f"{summary['steps']} steps", f"{summary['tokens']:,} tokens"]
    if summary["best_eval_loss"] is not None:
        parts.append(f"best eval loss {summary['best_eval_loss']:.4g} at step {summary['best_eval_step']}")
    if summary["best_eval_exact_match"] is not None:
        parts.append(f"best exact match {summary['best_eval_exact_match']:.1%}")
    if summary.get("best_eval_reward") is not None:
        parts.append(f"eval reward {summary['first_eval_reward']:.3g} -> best {summary['best_eval_reward']:.3g}")
    return ", ".join(parts)


def write_report(out_dir: Path) -> list[Path]:
    """summary.json and report.png from OUTPUT_DIR/metrics.jsonl; returns the files written. Never raises (the
    end of a run must not fail on its report): a problem is one warning line on stderr."""
    out_dir = Path(out_dir)
    written = []
    try:
        rows = read_metrics(out_dir / "metrics.jsonl")
        summary = summarize(rows)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        written.append(out_dir / "summary.json")
    except Exception as error:
        print(f"warning: no summary.json ({type(error).__name__}: {error})", file=sys.stderr)
        return written
    try:
        plot(rows, out_dir / "report.png", headline(out_dir.resolve().name, summary))
        written.append(out_dir / "report.png")
    except ImportError:
        print(f"warning: no report.png: {HINT}", file=sys.stderr)
    except Exception as error:
        print(f"warning: no report.png ({type(error).__name__}: {error})", file=sys.stderr)
    return written


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(f"usage: python -m qwen_ft.report OUTPUT_DIR\n{__doc__}")
    out_dir = Path(sys.argv[1])
    if not (out_dir / "metrics.jsonl").is_file():
        raise SystemExit(f"error: {out_dir / 'metrics.jsonl'} does not exist; pass the --output-dir of a run")
    for path in write_report(out_dir):
        print(f"wrote {path}")
    print(run_summary(out_dir / "metrics.jsonl"))


if __name__ == "__main__":
    main()
