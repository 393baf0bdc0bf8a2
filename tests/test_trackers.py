"""--report-to: the trackers get the records of metrics.jsonl, continue their run on resume, and never stop a run.

wandb, swanlab and trackio are tested for real where they are installed (pip install "qwen-ft[trackers]"), offline
and in temporary folders (tests/conftest.py): a tiny run that crashes and is resumed, then what each one stored,
read back through its own local format.
"""

import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
from helpers import picture, qa, write_json

import finetune
from qwen_ft import trackers
from qwen_ft.config import parse_config
from qwen_ft.dist import single_device

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


@pytest.fixture(scope="module")
def resumed_run(tiny_model, tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    """A tiny run reporting to every installed tracker, with eval records, that crashes in step 5 and resumes from
    its checkpoint at step 3: (its output folder, the metrics.jsonl lines of each of the two runs)."""
    installed = [name for name in ("tensorboard", "wandb", "swanlab", "trackio") if importlib.util.find_spec(name)]
    if not installed:
        pytest.skip('no tracker is installed (pip install "qwen-ft[tensorboard,trackers]")')
    folder = tmp_path_factory.mktemp("trackers")
    data = write_json(folder / "data.json", [qa(picture(folder, f"{i}.png"), "Colour?", "red") for i in range(4)])
    out = folder / "out"
    args = ["--model", tiny_model, "--data", data, "--eval-data", data, "--output-dir", str(out), "--num-workers", "0"]
    args += ["--batch-size", "2", "--grad-accum", "1", "--max-steps", "6", "--save-every", "3", "--eval-every", "2"]
    args += ["--report-to", ",".join(installed)]
    real, calls = finetune.forward_backward, []

    def crash_in_step_5(*inputs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("the machine went away")
        return real(*inputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "forward_backward", crash_in_step_5)
        with pytest.raises(RuntimeError, match="went away"):
            finetune.train(parse_config(args), single_device())
    first = metrics(out)
    assert [line["step"] for line in first] == [0, 1, 2, 2, 3, 4, 4]
    finetune.train(parse_config([*args, "--resume"]), single_device())
    second = [line for line in metrics(out) if line["step"] > 3]
    assert [line["step"] for line in second] == [4, 4, 5, 6, 6]
    return out, [first, second]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def numbers(line: dict) -> dict:
    """What a tracker is sent of a metrics.jsonl line: its numbers but the step (no flags, no nulls)."""
    return {k: v for k, v in line.items() if k != "step" and type(v) in (int, float)}


def by_step(lines: list[dict], first_wins=False) -> dict[int, dict]:
    """The numbers of each step, its training and eval lines together, as wandb and swanlab keep them. Both lines
    have elapsed_s: wandb keeps the later value of a name at a step, swanlab (first_wins) the earlier."""
    steps = {}
    for line in lines:
        values = numbers(line)
        step = steps.setdefault(line["step"], {})
        step.update({k: v for k, v in values.items() if k not in step} if first_wins else values)
    return steps


def saved_state(out: Path, name: str) -> dict:
    """What trackers.json keeps of the tracker's run (tensorboard: nothing)."""
    if importlib.util.find_spec(name) is None:
        extra = "tensorboard" if name == "tensorboard" else "trackers"
        pytest.skip(f'{name} is not installed (pip install "qwen-ft[{extra}]")')
    return json.loads((out / "trackers.json").read_text()).get(name, {})


def wandb_records(run_file: Path):
    """The records of a wandb run file, as wandb's protobuf Records. The file is a LevelDB-style log: a 7-byte
    header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each a 7-byte header (CRC-32 of its
    type and data, length, type: 1 whole, 2 first, 3 middle, 4 last) and the data. wandb (0.31) ships the
    Record class but no longer a Python reader."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert struct.unpack("<4sH", data[:6]) == (b":W&B", 0xBEE1), f"{run_file} is not a wandb run file"
    position, chunks, block = 7, [], 32 * 1024
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left for a chunk header: the block is padded
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{run_file}: a damaged record"
        chunks.append(chunk)
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_history(run_file: Path) -> tuple[list[str], dict[int, dict]]:
    """The run ids in a wandb run file, and the numbers it logged at each step (not wandb's own, "_runtime"...)."""
    ids, history = [], {}
    for record in wandb_records(run_file):
        if record.HasField("run"):
            ids.append(record.run.run_id)
        if record.HasField("history"):
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return ids, history


def swanlab_scalars(run_file: Path) -> tuple[list[tuple[str, str]], dict[int, dict]]:
    """The (run id, resume mode) a swanlab run file starts with, and the numbers it logged at each step (not
    swanlab's system metrics), read as `swanlab sync` reads it."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.proto.swanlab.run.v1.run_pb2 import ResumeMode
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader, starts, scalars = DataStoreReader(), [], {}
    reader.open(run_file)
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.HasField("start"):
            starts.append((record.start.id, ResumeMode.Name(record.start.resume)))
        if record.HasField("scalar") and not record.scalar.key.startswith("__swanlab__."):
            scalars.setdefault(record.scalar.step, {})[record.scalar.key] = record.scalar.value.number
    reader.close()
    return starts, scalars


@pytest.mark.slow
def test_tensorboard_keeps_every_record_at_its_step_the_resumed_run_replacing_the_steps_it_took_again(resumed_run):
    out, runs = resumed_run
    saved_state(out, "tensorboard")
    kept = [line for line in runs[0] if line["step"] <= 3]  # up to the checkpoint; then the resumed run's
    assert read_tensorboard(out / "tensorboard") == expected(kept + runs[1])


@pytest.mark.slow
def test_wandb_offline_keeps_every_record_at_its_step_and_resume_continues_the_run(resumed_run):
    out, runs = resumed_run
    run_id = saved_state(out, "wandb")["id"]
    folders = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))  # named by their start: the run, its resume
    assert len(folders) == 2 and not set((out / "wandb").glob("offline-run-*")) - set(folders)
    for folder, lines in zip(folders, runs):
        # Every number of every step, eval records included, and nothing else; the resumed run from the step
        # after its checkpoint on, under the same run id.
        assert wandb_history(folder / f"run-{run_id}.wandb") == ([run_id], by_step(lines))


@pytest.mark.slow
def test_swanlab_offline_keeps_every_record_at_its_step_and_resume_continues_the_run(resumed_run):
    out, runs = resumed_run
    run_id = saved_state(out, "swanlab")["id"]
    folders = sorted((out / "swanlog").glob(f"run-*-{run_id}"))  # named by their start: the run, its resume
    assert len(folders) == 2 and not set((out / "swanlog").glob("run-*")) - set(folders)
    for folder, lines, resume in zip(folders, runs, ("RESUME_MODE_NEVER", "RESUME_MODE_ALLOW")):
        assert swanlab_scalars(folder / f"run-{run_id}.swanlab") == ([(run_id, resume)], by_step(lines, True))


@pytest.mark.slow
def test_trackio_keeps_every_record_at_its_step_and_resume_continues_the_run(resumed_run):
    out, runs = resumed_run
    name = saved_state(out, "trackio")["name"]
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    assert [run.name for run in trackio.Api().runs(trackers.PROJECT)].count(name) == 1  # one run, resumed
    logged = SQLiteStorage.get_logs(trackers.PROJECT, run=name)
    rows = [(row["step"], {k: v for k, v in row.items() if k not in ("step", "timestamp")}) for row in logged]
    # Every record of both runs, each on its own row: trackio keeps both copies of the steps taken again.
    assert rows == [(line["step"], numbers(line)) for lines in runs for line in lines]
