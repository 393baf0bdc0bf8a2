"""--report-to: the records of metrics.jsonl sent to the experiment trackers people already use.

Each tracker is imported only when asked for, and none can stop a run: a tracker that is not installed
or fails to start is one line on stderr, one that fails while logging is one line and then dropped;
metrics.jsonl is written either way. Only rank 0 opens trackers (the caller sees to it).

Where each one writes, and how it goes on after --resume:
  tensorboard  OUTPUT_DIR/tensorboard; purge_step drops the events of the steps a resumed run takes again
  wandb        online (after `wandb login`), or WANDB_MODE=offline: OUTPUT_DIR/wandb, for a later `wandb sync`;
               the run id is kept in OUTPUT_DIR/trackers.json and resumed with resume="allow"; a resumed run
               writes a new offline-run-* folder of the same id, which `wandb sync` uploads after the first
  swanlab      online (after `swanlab login`), or SWANLAB_MODE=offline: OUTPUT_DIR/swanlog, for a later
               `swanlab sync`; the run id is resumed as for wandb (a new run-* folder of the same id offline)
  trackio      local: its own database ($TRACKIO_DIR, by default under the Hugging Face cache), where
               `trackio show` finds it; the run is resumed by its name, kept in trackers.json
A resumed run takes again the steps after its checkpoint and sends them again. Online, wandb and swanlab keep
the first records of those steps (their steps only go up); trackio, and the offline folders, keep both. The
numbers are the same, resume being exact, but for times and throughput.
"""

import json
import os
import secrets
import sys
import time
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "swanlab", "trackio")
PROJECT = "qwen-ft"  # the project (wandb: unless WANDB_PROJECT says otherwise) every run is logged to
STATE_FILE = "trackers.json"  # run ids and names, so that --resume continues the same tracker run


def warn(message: str) -> None:
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)  # one line, whatever the error says


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict, first_step: int, saved: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # Events from step first_step on, left by an earlier run in this folder (the one that is resumed, or
        # one that a fresh run replaces, with first_step 0), are dropped when TensorBoard reads the folder.
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=first_step, flush_secs=10)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", first_step)
        self.state = {}

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, out_dir: Path, config: dict, first_step: int, saved: dict):
        import wandb

        # No mode is passed: WANDB_MODE decides (offline writes OUTPUT_DIR/wandb, for a later `wandb sync`).
        # allow_val_change: a resumed run may change a few settings (see check_resume_config).
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=out_dir.name,
            dir=str(out_dir),
            config=config,
            id=saved.get("id"),
            resume="allow" if saved.get("id") else None,
            allow_val_change=True,
        )
        self.state = {"id": self.run.id}

    def log(self, step: int, values: dict) -> None:
        # Online, wandb drops (with its own warning) the steps a resumed run repeats: its steps only go up.
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLab:
    def __init__(self, out_dir: Path, config: dict, first_step: int, saved: dict):
        import swanlab

        # No mode is passed: SWANLAB_MODE decides (offline writes OUTPUT_DIR/swanlog for a later `swanlab
        # sync`; local needs swanlab[dashboard]). interactive=False: without a login, online mode fails with
        # a message instead of waiting for an answer on the terminal.
        self.run = swanlab.init(
            project=PROJECT,
            name=out_dir.name,
            log_dir=str(out_dir / "swanlog"),
            config=config,
            id=saved.get("id"),
            resume="allow" if saved.get("id") else "never",
            settings=swanlab.Settings(interactive=False),
        )
        self.state = {"id": self.run.id}

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out_dir: Path, config: dict, first_step: int, saved: dict):
        import trackio

        # trackio resumes the latest run of a name, and runs may share one: a fresh run takes a name of its own
        # (the folder's, when, and a random tail for runs started in the same second, as a sweep's may be).
        name = saved.get("name") or f"{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.run = trackio.init(
            project=PROJECT, name=name, config=config, resume="allow" if saved.get("name") else "never"
        )
        self.state = {"name": name}

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import trackio

        # Not run.finish(): that leaves it trackio's current run, which trackio finishes again at exit.
        trackio.finish()


OPENERS = {"tensorboard": TensorBoard, "wandb": Wandb, "swanlab": SwanLab, "trackio": Trackio}


class Trackers:
    """The trackers that started. One call per record: log(record), then close() at the end."""

    def __init__(self, opened: dict):
        self.opened = opened

    def log(self, record: dict) -> None:
        """Every number of the record but "step", against record["step"]; flags (bools) and nulls are left out."""
        values = {
            name: value
            for name, value in record.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for name, tracker in list(self.opened.items()):
            try:
                tracker.log(record["step"], values)
            except Exception as error:  # a tracker must not stop the run; it is dropped, metrics.jsonl goes on
                warn(
                    f"--report-to {name} failed while logging ({type(error).__name__}: {error}); no more is sent "
                    "to it, the run goes on and metrics.jsonl has every record"
                )
                del self.opened[name]

    def close(self) -> None:
        for name, tracker in self.opened.items():
            try:
                tracker.close()
            except Exception as error:
                warn(f"--report-to {name} failed to close ({type(error).__name__}: {error})")
        self.opened = {}


def open_trackers(names: list[str], out_dir: Path, config: dict, resume_step: int | None) -> Trackers:
    """Start the named trackers (rank 0 only). resume_step is the step of the checkpoint a resumed run starts
    from, None for a fresh run. Never raises: what can't start is one line on stderr and is left out."""
    if not names:
        return Trackers({})
    out_dir = Path(out_dir).resolve()  # its name names the tracker runs, also when it is "."
    state_path = out_dir / STATE_FILE
    state = {}
    if resume_step is not None:  # a fresh run starts new tracker runs, even in a folder that had one
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
    # Trackers take plain JSON: paths and other objects of the config become strings.
    config = json.loads(json.dumps(config, default=str))
    first_step = 0 if resume_step is None else resume_step + 1
    opened = {}
    for name in names:
        if name not in OPENERS:
            warn(
                f"--report-to {name}: no such tracker (choose from {', '.join(TRACKERS)}); the run goes on "
                "with metrics.jsonl"
            )
            continue
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            tracker = OPENERS[name](out_dir, config, first_step, state.get(name, {}))
        except ImportError as error:
            warn(
                f"--report-to {name}: cannot import {name} ({error}); pip install {name}. The run goes on with "
                "metrics.jsonl"
            )
            continue
        except Exception as error:  # no login, no network in online mode, a bad setting: not worth a run
            warn(
                f"--report-to {name} did not start ({type(error).__name__}: {error}); the run goes on with "
                "metrics.jsonl"
            )
            continue
        opened[name] = tracker
        if tracker.state:
            state[name] = tracker.state
    try:  # also when empty: a later --resume must not continue the tracker runs of an earlier fresh run
        out_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2) + "\n")
    except OSError as error:
        warn(f"could not write {state_path} ({error}); --resume will start new tracker runs")
    return Trackers(opened)
