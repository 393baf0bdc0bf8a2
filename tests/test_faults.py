"""Runs left alone on shared machines: a folder two runs write into, a full disk, a damaged checkpoint,
signals in every phase, a dead peer and weights that stop being finite each end in one line, losing
nothing but the steps since the last checkpoint."""

import contextlib
import errno
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import qa, write_json
from safetensors import SafetensorError
from test_checkpoint import dataset, flags, kill_tree, launch, rows, wait_for_steps

import finetune
from qwen_ft import checkpoint, lock, training
from qwen_ft.checkpoint import complete_checkpoints, find_checkpoint, save_checkpoint
from qwen_ft.collate import Collator
from qwen_ft.config import ConfigError, parse_config
from qwen_ft.data import lengths
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.stop import RunStopped

REPO = Path(__file__).resolve().parent.parent
SHORT = ["--max-steps", "4", "--save-every", "2", "--grad-accum", "1"]  # checkpoints at steps 2 and 4


def main_exits(args: list[str]) -> int | str | None:
    """finetune.main's exit: its code, or its message."""
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(args)
    return exit_info.value.code


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> tuple[str, Path]:
    """The data, and the output folder of a finished 4-step run with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("finished")
    data = dataset(folder)
    finetune.train(parse_config(flags(tiny_model, data, folder / "out", *SHORT)), single_device())
    return data, folder / "out"


def ended(process, timeout: float = 300) -> tuple[int, str, str]:
    """The process's exit code and output; if it has not ended in time, it and its workers are killed
    (nothing is left running) and the test fails."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        out, err = process.communicate()
        pytest.fail(f"still running after {timeout} s: {err[-3000:]}")
    return process.returncode, out, err


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[1], out)
    return out


# 1. Two runs into one --output-dir


HOLDER = """
import sys, time
from qwen_ft import lock
lock.take(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_held_folder_stops_at_once_naming_the_holder(tmp_path, tiny_model):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        message = str(main_exits(["--model", tiny_model, "--data", "no-such-file.json", "--output-dir", str(out)]))
        assert message.startswith(f"error: {out} is in use by a run: pid {holder.pid} on host {socket.gethostname()}")
        assert "started " in message and "pass another --output-dir" in message
        assert sorted(p.name for p in out.iterdir()) == [lock.LOCK_FILE]  # stopped before anything else
    finally:
        holder.kill()  # kill -9: the kernel lets go of the lock
        holder.wait()
    lock.take(out).release()


def started_then_sleep(started) -> None:
    started.set()
    time.sleep(60)


def test_a_forked_worker_does_not_keep_the_folder_locked(tmp_path):
    held = lock.take(tmp_path)
    context = multiprocessing.get_context("fork")
    started = context.Event()
    worker = context.Process(target=started_then_sleep, args=(started,))
    worker.start()
    try:
        assert started.wait(30)
        held.release()
        lock.take(tmp_path).release()  # while the worker still runs
    finally:
        worker.kill()
        worker.join()


# 2. A full disk


def failing(monkeypatch, module, name: str, error: Exception, when):
    """Make module.name raise error on the calls for which when(*args) is true."""
    real = getattr(module, name)

    def patched(*args, **kwargs):
        if when(*args):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


def test_a_checkpoint_that_finds_the_disk_full_stops_in_one_line_and_keeps_the_last_one(
    tmp_path, tiny_model, monkeypatch
):
    data = dataset(tmp_path)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    failing(monkeypatch, checkpoint, "torch_save", full, lambda obj, path: "tmp-step-00000004" in str(path))
    message = str(main_exits(flags(tiny_model, data, tmp_path / "out", *SHORT)))
    root = tmp_path / "out" / "checkpoints"
    assert message.startswith(f"error: could not save checkpoint step-00000004 in {root}: no space left on device (")
    assert "free, the save needs about 1" in message  # 7 MB of weights and 8 MB of optimizer state: 15 MB
    assert message.endswith(f"the newest complete checkpoint is {root / 'step-00000002'}: run the same command "
                            "with --resume to go on from it")  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # nothing half written
    assert checkpoint.checkpoint_problem(root / "step-00000002", 1, lora=False) is None


def test_a_final_save_on_a_full_disk_waits_for_room_and_otherwise_leaves_no_model(tmp_path, tiny_model, monkeypatch):
    data = dataset(tmp_path)
    args = flags(tiny_model, data, tmp_path / "out", "--max-steps", "1", "--grad-accum", "1", "--save-every", "0")
    real_save, tries = checkpoint.save_model, []

    def full_twice(*args):  # as safetensors says it
        tries.append(1)
        if len(tries) <= 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(*args)

    monkeypatch.setattr(checkpoint, "save_model", full_twice)
    monkeypatch.setattr(checkpoint, "RETRY_S", 0)
    finetune.main(args)  # the third try finds room
    assert len(tries) == 3 and (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / ".tmp-model").exists()

    tries.clear()
    monkeypatch.setattr(checkpoint, "RETRY_S", 10**6)  # not waited for: --full-disk-wait 0
    message = str(main_exits([*args, "--output-dir", str(tmp_path / "lost"), "--full-disk-wait", "0"]))
    assert message.startswith(f"error: could not save the fine-tuned model in {tmp_path / 'lost'}: no space left on")
    assert message.endswith("the trained weights are lost with this process, and no checkpoint had been written")
    assert not {"config.json", "model.safetensors", ".tmp-model"} & {p.name for p in (tmp_path / "lost").iterdir()}


def test_a_run_warns_at_its_start_when_the_disk_cannot_hold_its_checkpoints(tmp_path, monkeypatch, capsys):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights, 8 MB of optimizer state
    monkeypatch.setattr(checkpoint, "free_space", lambda folder: 10**6)
    checkpoint.check_space(tmp_path, model, single_device(), parse_config([]))
    assert capsys.readouterr().err == (
        f"warning: {tmp_path} has 1.0 MB free, and this run may write up to 40.0 MB there (3 checkpoints of 12.0 MB "
        "at once, the model's 4.0 MB): it will stop when the disk is full\n"
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for one checkpoint of the tiny model (15 MB), not two."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_a_real_full_disk(small_disk, tmp_path, tiny_model, capsys):
    data = dataset(tmp_path)
    args = flags(tiny_model, data, small_disk / "out", *SHORT, "--full-disk-wait", "0")
    message = str(main_exits(args))
    assert "it will stop when the disk is full" in capsys.readouterr().err  # said before the first step
    root = small_disk / "out" / "checkpoints"
    assert message.startswith(f"error: could not save checkpoint step-00000004 in {root}: no space left on device")
    assert f"the newest complete checkpoint is {root / 'step-00000002'}" in message
    assert [p.name for p in root.iterdir()] == ["step-00000002"]
    assert checkpoint.checkpoint_problem(root / "step-00000002", 1, lora=False) is None

    # The final save, with 3 MB left: less than the model's 7 MB.
    shutil.rmtree(root)
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free - 3 * 2**20))
    out = small_disk / "final"
    message = str(main_exits([*args, "--save-every", "0", "--max-steps", "2", "--output-dir", str(out)]))
    assert message.startswith(f"error: could not save the fine-tuned model in {out}: no space left on device")
    assert not {"config.json", "model.safetensors", ".tmp-model"} & {p.name for p in out.iterdir()}


# 3. A damaged newest checkpoint


DAMAGES = {
    "a cut-short model.safetensors": ("model.safetensors", "truncate", "its model.safetensors is cut short ("),
    "a cut-short state.pt": ("state.pt", "truncate", "its state.pt is not readable ("),
    "no model.safetensors": ("model.safetensors", "remove", "it has no model.safetensors"),
    "no rng-0.pt": ("rng-0.pt", "remove", "it has no rng-0.pt"),
    "no train_config.json": ("train_config.json", "remove", "it has no train_config.json"),
    "no state.pt": ("state.pt", "remove", "it has no state.pt"),
}


def damage(folder: Path, name: str, how: str) -> None:
    path = folder / name
    if how == "remove":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size * 3 // 4)


@pytest.mark.parametrize("damaged", DAMAGES)
def test_resume_passes_over_a_damaged_checkpoint_to_the_one_before(tmp_path, finished, damaged, capsys):
    out = copy_of(finished, tmp_path)
    name, how, problem = DAMAGES[damaged]
    newest = out / "checkpoints" / "step-00000004"
    damage(newest, name, how)
    assert find_checkpoint("latest", out, single_device(), lora=False) == out / "checkpoints" / "step-00000002"
    err = capsys.readouterr().err
    assert err.startswith(f"warning: checkpoint {newest} is damaged ({problem}")
    assert err.endswith("): trying the one before it\n") and err.count("\n") == 1
    with pytest.raises(ConfigError) as error:  # named by its path: no other is taken instead
        find_checkpoint(str(newest), out, single_device(), lora=False)
    assert str(error.value).startswith(f"--resume {newest}: not a complete checkpoint: {problem}")


def test_resume_says_what_is_wrong_when_no_checkpoint_will_do(tmp_path, finished, capsys):
    out = copy_of(finished, tmp_path)
    damage(out / "checkpoints" / "step-00000004", "model.safetensors", "truncate")
    damage(out / "checkpoints" / "step-00000002", "rng-0.pt", "remove")
    with pytest.raises(ConfigError) as error:
        find_checkpoint("latest", out, single_device(), lora=False)
    assert str(error.value) == (
        f"--resume: {out / 'checkpoints'} holds no complete checkpoint (step-00000004: its model.safetensors is cut "
        f"short ({(out / 'checkpoints' / 'step-00000004' / 'model.safetensors').stat().st_size:,} of "
        f"{(finished[1] / 'checkpoints' / 'step-00000004' / 'model.safetensors').stat().st_size:,} bytes); "
        "step-00000002: it has no rng-0.pt)"
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: checkpoint ") for line in err)


def test_a_checkpoint_of_fewer_processes_says_so_and_a_missing_rng_0_does_not(tmp_path, finished):
    out = copy_of(finished, tmp_path)
    with pytest.raises(ConfigError, match="was written by 1 process and this run has 2: resume it with as many"):
        checkpoint.pick_checkpoint("latest", out, world_size=2, lora=False)
    (out / "checkpoints" / "step-00000004" / "rng-0.pt").rename(out / "checkpoints" / "step-00000004" / "rng-1.pt")
    assert checkpoint.checkpoint_problem(out / "checkpoints" / "step-00000004", 2, False) == "it has no rng-0.pt"


def test_a_resume_past_a_damaged_checkpoint_equals_the_run_never_interrupted(tmp_path, tiny_model, finished, capsys):
    data, reference = finished
    out = copy_of(finished, tmp_path)
    damage(out / "checkpoints" / "step-00000004", "state.pt", "truncate")
    finetune.train(parse_config(flags(tiny_model, data, out, *SHORT, "--resume")), single_device())
    said = capsys.readouterr()
    assert f"warning: checkpoint {out / 'checkpoints' / 'step-00000004'} is damaged" in said.err
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'}" in said.out
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(reference)]
    assert checkpoint.checkpoint_problem(out / "checkpoints" / "step-00000004", 1, False) is None  # written anew


# 7. Signals in every phase


def send_during(monkeypatch, module, name: str, signals, nth: int = 1, also_to_workers: bool = False):
    """Send this process the signals during the nth call of module.name, as `kill` (or Ctrl-C, which reaches
    the DataLoader's workers too: also_to_workers) would."""
    real, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            targets = psutil.Process().children() if also_to_workers else []
            for sig in signals:
                for worker in targets:
                    worker.send_signal(sig)
                os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


def test_a_signal_before_training_stops_at_once(tmp_path, tiny_model, monkeypatch):
    data = dataset(tmp_path)
    send_during(monkeypatch, training, "load_model", [signal.SIGTERM])
    code = main_exits(flags(tiny_model, data, tmp_path / "out"))
    assert code == 128 + signal.SIGTERM
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_signal_during_an_evaluation_with_workers_stops_after_it_with_a_checkpoint(
    tmp_path, tiny_model, monkeypatch, capsys
):
    data = dataset(tmp_path)
    args = flags(tiny_model, data, tmp_path / "out", "--eval-data", data, "--eval-every", "1", "--num-workers", "2")
    # The baseline evaluation runs 3 batches of 2 samples, then step 1 its 2 micro-batches: the 7th forward is
    # the second of the evaluation after step 1.
    send_during(monkeypatch, finetune, "summed_loss", [signal.SIGTERM], nth=3 + 2 + 2, also_to_workers=True)
    finetune.train(parse_config(args), single_device())
    said = capsys.readouterr()
    assert "SIGTERM: stopping after this step, with a checkpoint" in said.err
    assert f"stopped after step 1, saved {tmp_path / 'out' / 'checkpoints' / 'step-00000001'}" in said.out
    assert [p.name for p in complete_checkpoints(tmp_path / "out")] == ["step-00000001"]


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    data = dataset(tmp_path)
    send_during(monkeypatch, finetune, "forward_backward", [signal.SIGINT, signal.SIGINT], nth=2)  # in step 2
    code = main_exits(flags(tiny_model, data, tmp_path / "out", "--save-every", "1", "--grad-accum", "1"))
    assert code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"SIGINT again: stopped at once; the newest complete checkpoint is "
        f"{tmp_path / 'out' / 'checkpoints' / 'step-00000001'}: run the same command with --resume to go on from it"
    )


def slow_count(*args):
    time.sleep(300)


def measure_forever(collator, samples):
    lengths.count = slow_count  # in this process and the workers it forks
    lengths.measure(collator, samples, processes=2)


def test_the_token_counting_workers_die_with_their_parent(tmp_path, processor):
    samples = read_samples(write_json(tmp_path / "many.json", [qa(None, f"{i}?", "yes") for i in range(1100)]))
    collator = Collator(processor, 512)
    parent = multiprocessing.get_context("fork").Process(target=measure_forever, args=(collator, samples))
    parent.start()
    deadline = time.monotonic() + 30
    while len(psutil.Process(parent.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(parent.pid).children()
    assert len(workers) == 2
    parent.kill()  # kill -9: nothing in it runs to end them
    parent.join()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        worker.kill()
    assert not alive


def forked_workers(process, count: int) -> list[psutil.Process]:
    """The first `count` worker processes forked by the process (children running its own command line,
    unlike the short-lived commands some libraries run as they are imported)."""
    parent, deadline = psutil.Process(process.pid), time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            workers = [p for p in parent.children() if p.cmdline() == parent.cmdline()]
            if len(workers) >= count:
                return workers
        assert process.poll() is None, "the run ended before its workers started"
        time.sleep(0.02)
    raise TimeoutError


@pytest.mark.slow
def test_sigterm_during_the_data_check_leaves_no_worker_behind(tmp_path, tiny_model):
    many = write_json(tmp_path / "many.json", [qa(None, f"What is {i} plus {i}?", str(2 * i)) for i in range(6000)])
    process = launch(flags(tiny_model, many, tmp_path / "out"))
    workers = forked_workers(process, 2)
    process.send_signal(signal.SIGTERM)
    code, _, err = ended(process)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGTERM: stopped before training began; nothing to save"
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


@pytest.mark.slow
def test_a_peer_that_dies_is_reported_as_that_with_the_newest_checkpoint(tmp_path, tiny_model):
    data = dataset(tmp_path)
    process = launch(flags(tiny_model, data, tmp_path / "out", "--batch-size", "1"), distributed=True)
    wait_for_steps(process, tmp_path / "out", 6)
    agent = psutil.Process(process.pid)
    ranks = [p for p in agent.children(recursive=True) if "finetune_distributed.py" in " ".join(p.cmdline())]
    rank_1 = next(p for p in ranks if p.environ().get("RANK") == "1")
    rank_1.kill()
    code, _, err = ended(process)
    assert code != 0
    newest = complete_checkpoints(tmp_path / "out")[-1]
    assert "error: rank 0: another process of this job ended" in err
    assert f"the newest complete checkpoint is {newest}" in err
    assert "gloo" not in err and "Connection reset" not in err


@pytest.mark.slow
def test_two_processes_into_one_folder_under_torchrun_and_alone(tmp_path, tiny_model):
    """The issue's case: a run started twice. The second stops at once (alone, or every rank of a torchrun
    job with one line), and the first goes on untouched: one metrics line per step, its checkpoints whole."""
    data = dataset(tmp_path)
    first = launch(flags(tiny_model, data, tmp_path / "out", "--save-every", "2", "--max-steps", "100000"))
    try:
        wait_for_steps(first, tmp_path / "out", 2)
        code, _, err = ended(launch(flags(tiny_model, data, tmp_path / "out")))
        assert code == 1 and f"error: {tmp_path / 'out'} is in use by a run: pid {first.pid}" in err
        code, _, err = ended(launch(flags(tiny_model, data, tmp_path / "out"), distributed=True))
        assert code != 0 and err.count(f"error: {tmp_path / 'out'} is in use by a run: pid {first.pid}") == 1
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        code, out, err = ended(first)
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert code == 0, err[-2000:]
    stopped_at = len(rows(tmp_path / "out"))
    assert [r["step"] for r in rows(tmp_path / "out")] == list(range(1, stopped_at + 1))
    assert f"stopped after step {stopped_at}" in out
    assert checkpoint.checkpoint_problem(complete_checkpoints(tmp_path / "out")[-1], 1, lora=False) is None
    assert not (tmp_path / "out" / lock.LOCK_FILE).exists()  # removed by the run that held it


# 11. Weights that are not finite


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--lr", "nan", "--lr must be a finite number, got nan"),
        ("--lr", "1e39", "--lr must be above 0 and at most 1, got 1e+39"),
        ("--vision-lr", "-1e-5", "--vision-lr must be above 0 and at most 1, got -1e-05"),
        ("--weight-decay", "1e999", "--weight-decay must be a finite number, got inf"),
        ("--max-grad-norm", "-1", "--max-grad-norm must not be negative, got -1.0"),
        ("--lora-dropout", "1.5", "--lora-dropout must be at least 0 and below 1, got 1.5"),
        ("--video-fps", "nan", "--video-fps must be a finite number, got nan"),
        ("--full-disk-wait", "-1", "--full-disk-wait must not be negative, got -1.0"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(flag, value, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config([f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {says}")


def overflow_at(monkeypatch, step: int) -> None:
    """Make the update of this optimizer step overflow: the weights it leaves are infinite."""
    real, calls = finetune.forward_backward, []

    def overflowing(model, *args):
        calls.append(1)
        result = real(model, *args)
        if len(calls) == step:
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))
        return result

    monkeypatch.setattr(finetune, "forward_backward", overflowing)


def test_weights_that_are_no_longer_finite_are_never_saved_and_the_stop_says_so(tmp_path, tiny_model, monkeypatch):
    data = dataset(tmp_path)
    overflow_at(monkeypatch, 2)
    message = str(main_exits(flags(tiny_model, data, tmp_path / "out", *SHORT, "--save-every", "1")))
    root = tmp_path / "out" / "checkpoints"
    assert message == (
        "error: at step 2 some trained weights are no longer finite (an update overflowed: try a lower --lr), so "
        f"checkpoint step-00000002 was not saved; the newest complete checkpoint is {root / 'step-00000001'}: run the "
        "same command with --resume to go on from it"
    )
    assert [p.name for p in root.iterdir()] == ["step-00000001"]
    weights = checkpoint.load_file(root / "step-00000001" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_the_stop_after_non_finite_steps_says_whether_the_weights_are_finite(tmp_path, tiny_model, monkeypatch):
    data = dataset(tmp_path)
    overflow_at(monkeypatch, 1)
    message = str(main_exits(flags(tiny_model, data, tmp_path / "out", *SHORT, "--max-bad-steps", "1")))
    assert message == (
        "error: 1 steps in a row had a non-finite loss or gradient (up to step 2), and their updates were skipped, "
        "but the weights were no longer finite already (an update overflowed); no checkpoint had been written. "
        "Try a lower --lr"
    )


def test_a_checkpoint_is_never_written_from_weights_that_are_not_finite(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.weight.data[0, 0] = float("nan")
    with pytest.raises(RunStopped, match="at step 3 some trained weights are no longer finite"):
        save_checkpoint(tmp_path, 3, model, None, None, single_device(), None, {}, None)
    assert not (tmp_path / "checkpoints").exists()
