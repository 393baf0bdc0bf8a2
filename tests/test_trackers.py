"""--report-to: the trackers get the records of metrics.jsonl, continue their run on resume, and never stop a run."""

import importlib.util
import json
import sys

import pytest

from qwen_ft import trackers

CONFIG = {"lr": 1e-4, "output_dir": None, "report_to": "tensorboard"}


def records(first: int, last: int, offset: float = 0.0) -> list[dict]:
    """Training lines as finetune.py writes them (flags and nulls included), and an eval line every 5 steps."""
    lines = []
    for step in range(first, last + 1):
        lines.append(
            {
                "step": step,
                "epoch": step / 20,
                "loss": 5.0 / step + offset,
                "lr": 1e-4 * step / 20,
                "grad_norm": 1.0 + step % 3,
                "tokens": 500 + step,
                "tokens_per_s": 1000.0 + step,
                "peak_memory_gib": None,  # on the CPU
                "skipped_step": False,
                "bad_steps": 0,
            }
        )
        if step % 5 == 0:
            lines.append({"step": step, "eval_loss": 4.0 / step + offset, "eval_tokens": 300, "elapsed_s": step * 1.5})
    return lines


def tensorboard_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))  # purges what a restart (purge_step) marked as gone, as TensorBoard does
    events.Reload()
    return events


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard_events(folder)
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every number but the step, against the step; what isn't a number (flags, nulls) left out."""
    scalars = {}
    for line in lines:
        for name, value in line.items():
            if name != "step" and type(value) in (int, float):
                scalars.setdefault(name, []).append((line["step"], pytest.approx(value, rel=1e-6)))  # float32
    return scalars


def test_tensorboard_event_files_hold_every_number_of_every_record(tmp_path):
    lines = records(1, 20)
    logger = trackers.open_trackers(["tensorboard"], tmp_path, CONFIG, resume_step=None)
    assert list(logger.opened) == ["tensorboard"]
    for line in lines:
        logger.log(line)
    logger.close()
    scalars = read_tensorboard(tmp_path / "tensorboard")
    assert scalars == expected(lines)
    assert "skipped_step" not in scalars and "peak_memory_gib" not in scalars
    assert len(scalars["eval_loss"]) == 4 and len(scalars["loss"]) == 20
    config_text = tensorboard_events(tmp_path / "tensorboard").Tensors("config/text_summary")[0]
    assert json.loads(config_text.tensor_proto.string_val[0].decode().strip("`\n")) == CONFIG


def test_tensorboard_resume_drops_the_steps_the_resumed_run_takes_again(tmp_path):
    first = trackers.open_trackers(["tensorboard"], tmp_path, CONFIG, resume_step=None)
    for line in records(1, 13):  # a checkpoint at step 10, then a crash after step 13
        first.log(line)
    first.close()
    resumed = trackers.open_trackers(["tensorboard"], tmp_path, CONFIG, resume_step=10)
    for line in records(11, 20, offset=100.0):  # different numbers, to tell the runs apart
        resumed.log(line)
    resumed.close()
    lines = [line for line in records(1, 20) if line["step"] <= 10] + records(11, 20, offset=100.0)
    assert read_tensorboard(tmp_path / "tensorboard") == expected(lines)  # one point per step, the resumed ones


def test_tensorboard_fresh_run_in_the_same_folder_replaces_the_old_one(tmp_path):
    old = trackers.open_trackers(["tensorboard"], tmp_path, CONFIG, resume_step=None)
    for line in records(1, 20):
        old.log(line)
    old.close()
    new = trackers.open_trackers(["tensorboard"], tmp_path, CONFIG, resume_step=None)
    for line in records(1, 5, offset=7.0):
        new.log(line)
    new.close()
    assert read_tensorboard(tmp_path / "tensorboard") == expected(records(1, 5, offset=7.0))


def test_a_tracker_that_is_not_installed_is_one_line_and_the_others_log(tmp_path, monkeypatch, capsys):
    for name in ("wandb", "swanlab", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)  # import NAME now raises ImportError, installed or not
    logger = trackers.open_trackers(["wandb", "tensorboard", "swanlab", "trackio"], tmp_path, CONFIG, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 3
    for line, name in zip(lines, ("wandb", "swanlab", "trackio")):
        assert line.startswith(f"warning: --report-to {name}: cannot import {name}")
        assert f"pip install {name}" in line and "the run goes on with metrics.jsonl" in line.lower()
    assert list(logger.opened) == ["tensorboard"]
    for line in records(1, 5):
        logger.log(line)
    logger.close()
    assert read_tensorboard(tmp_path / "tensorboard") == expected(records(1, 5))


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path, monkeypatch, capsys):
    class NotLoggedIn:
        def __init__(self, *args):
            raise RuntimeError("no API key configured.\nRun `wandb login`.")

    monkeypatch.setitem(trackers.OPENERS, "wandb", NotLoggedIn)
    logger = trackers.open_trackers(["wandb"], tmp_path, CONFIG, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--report-to wandb did not start (RuntimeError: no API key configured. Run `wandb login`.)" in err
    assert logger.opened == {}
    logger.log(records(1, 1)[0])  # nothing to log to, and no error
    logger.close()


class Recorder:
    """A tracker that keeps what it is sent, or fails when told to."""

    def __init__(self, fail: bool = False):
        self.fail, self.logged, self.closed = fail, [], False

    def log(self, step, values):
        if self.fail:
            raise ConnectionError("the server went away")
        self.logged.append((step, values))

    def close(self):
        self.closed = True


def test_a_tracker_that_fails_while_logging_is_dropped_after_one_line(capsys):
    broken, working = Recorder(fail=True), Recorder()
    logger = trackers.Trackers({"wandb": broken, "tensorboard": working})
    lines = records(1, 5)
    for line in lines:
        logger.log(line)
    logger.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--report-to wandb failed while logging (ConnectionError" in err
    assert [step for step, _ in working.logged] == [line["step"] for line in lines]
    numbers = ("epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "bad_steps")  # not the flag, not null
    assert working.logged[0][1] == {name: lines[0][name] for name in numbers}
    assert working.closed and not broken.closed


def test_no_trackers_does_nothing(tmp_path):
    logger = trackers.open_trackers([], tmp_path / "out", CONFIG, None)
    logger.log(records(1, 1)[0])
    logger.close()
    assert not (tmp_path / "out").exists()


def test_wandb_offline_writes_under_the_output_dir_and_resumes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = trackers.open_trackers(["wandb"], tmp_path, CONFIG, None)
    run = logger.opened["wandb"].run
    lines = records(1, 6)
    for line in lines:
        logger.log(line)
    # wandb keeps a step open until a later one comes: the summary has step 5 or 6, whose eval line merged in.
    assert run.summary["loss"] in (lines[-1]["loss"], lines[-3]["loss"]) and run.summary["eval_loss"] == 0.8
    logger.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"]
    assert run_id == run.id and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))

    resumed = trackers.open_trackers(["wandb"], tmp_path, CONFIG, resume_step=4)
    assert resumed.opened["wandb"].run.id == run_id
    resumed.close()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_swanlab_offline_writes_under_the_output_dir_and_resumes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("swanlab")
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    logger = trackers.open_trackers(["swanlab"], tmp_path, CONFIG, None)
    for line in records(1, 5):
        logger.log(line)
    logger.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["swanlab"]["id"]
    assert list((tmp_path / "swanlog").glob(f"run-*-{run_id}"))
    resumed = trackers.open_trackers(["swanlab"], tmp_path, CONFIG, resume_step=3)
    assert resumed.opened["swanlab"].run.id == run_id
    resumed.close()


@pytest.mark.skipif(
    importlib.util.find_spec("trackio") is None or "trackio" in sys.modules,  # TRACKIO_DIR is read on import
    reason="trackio is not installed, or was imported before TRACKIO_DIR could point it to a temporary folder",
)
def test_trackio_logs_locally_and_resumes_its_run_by_name(tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    logger = trackers.open_trackers(["trackio"], tmp_path / "out", CONFIG, None)
    for line in records(1, 5):
        logger.log(line)
    logger.close()
    name = json.loads((tmp_path / "out" / "trackers.json").read_text())["trackio"]["name"]
    resumed = trackers.open_trackers(["trackio"], tmp_path / "out", CONFIG, resume_step=5)
    for line in records(6, 7):
        resumed.log(line)
    resumed.close()
    database = sqlite3.connect(tmp_path / "trackio" / f"{trackers.PROJECT}.db")
    logged = database.execute("select run_name, step, metrics from metrics order by id").fetchall()
    assert {run_name for run_name, _, _ in logged} == {name}  # one run, continued
    assert [step for _, step, _ in logged] == [line["step"] for line in records(1, 7)]
    assert [json.loads(metrics).get("loss") for _, _, metrics in logged] == [line.get("loss") for line in records(1, 7)]
