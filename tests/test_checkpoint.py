"""Checkpoints, exact resume, and runs that survive signals, kill -9, non-finite steps and bad samples."""

import functools
import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import picture, qa, write_json

import finetune
from qwen_ft.checkpoint import complete_checkpoints
from qwen_ft.config import parse_config
from qwen_ft.dist import single_device
from qwen_ft.tiny import FAMILIES

REPO = Path(__file__).resolve().parent.parent
STEPS = 30
TIMEOUT_S = 300
LORA = ["--lora", "--lora-r", "4", "--lr", "1e-2"]  # LoRA dropout stays on: resume must restore the RNG
# Packed micro-batches of at most 300 tokens, whose count varies from epoch to epoch.
PACKED = ["--packing", "--max-tokens", "300", "--batch-size", "4"]
MODES = {"full": [], "lora": LORA, "packed": PACKED, "adamw8bit": ["--optim", "adamw8bit"]}


def dataset(folder) -> str:
    colours = ["red", "green", "blue", "yellow"]
    samples = [qa(picture(folder, f"{c}.png", colour=c), "What colour is the shape?", c) for c in colours]
    samples += [qa(None, "How many corners does a square have?", "four"), qa(None, "Say hi", "hi")]
    return write_json(folder / "data.json", samples)


def flags(tiny_model, data, out, *extra) -> list[str]:
    return [
        "--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0",
        "--precision", "fp32", "--lr", "1e-3", "--warmup-steps", "3", "--max-steps", str(STEPS),
        "--batch-size", "2", "--grad-accum", "2", "--save-every", "4", *extra,
    ]  # fmt: skip


def launch(args, script=None, distributed=False) -> subprocess.Popen:
    if distributed:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += [str(REPO / "finetune_distributed.py"), *args]
    else:
        command = (
            [sys.executable, "-c", script, *args] if script else [sys.executable, str(REPO / "finetune.py"), *args]
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def kill_tree(process) -> None:
    """kill -9 the process and everything it started (torchrun starts its workers in sessions of their own)."""
    parent = psutil.Process(process.pid)
    for each in [*parent.children(recursive=True), parent]:
        each.kill()


def finish(process) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, out, err


def run(args, **kwargs) -> tuple[int, str, str]:
    return finish(launch(args, **kwargs))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(process, out: Path, steps: int) -> None:
    """Until the run has logged `steps` optimizer steps (it must not have finished by then)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.005)
    raise TimeoutError


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The data, and the losses of an uninterrupted run of a mode (run when a test first asks for that mode),
    which every resumed run of it must match exactly."""
    folder = tmp_path_factory.mktemp("reference")
    data = dataset(folder)

    @functools.cache
    def losses(mode: str) -> list[float]:
        code, _, err = run(flags(tiny_model, data, folder / mode, *MODES[mode]))
        assert code == 0, err[-3000:]
        return [r["loss"] for r in rows(folder / mode)]

    return data, losses


@pytest.mark.parametrize(
    "mode, stop",
    [
        # The default run has the in-process version below, for every family.
        pytest.param("full", signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param("lora", signal.SIGINT, marks=pytest.mark.slow),
        pytest.param("packed", signal.SIGTERM, marks=pytest.mark.slow),
    ],
)
def test_a_signal_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, reference, mode, stop):
    data, losses = reference
    args = flags(tiny_model, data, tmp_path / "out", *MODES[mode])
    process = launch(args)
    wait_for_steps(process, tmp_path / "out", 5)
    process.send_signal(stop)
    code, out, _ = finish(process)
    assert code == 0
    assert "--resume" in out
    stopped_at = len(rows(tmp_path / "out"))
    assert stopped_at < STEPS and complete_checkpoints(tmp_path / "out")[-1].name == f"step-{stopped_at:08d}"

    code, _, err = run([*args, "--resume"])
    assert code == 0, err[-3000:]
    resumed = rows(tmp_path / "out")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == losses(mode)  # bit for bit


def signal_during_step(monkeypatch, step: int, stop=signal.SIGTERM) -> None:
    """Send this process a stop signal during an optimizer step, as `kill` would: the loop installs its
    handler, so the run finishes that step, saves a checkpoint and returns."""
    calls = []
    real = finetune.forward_backward

    def forward_backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), stop)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "forward_backward", forward_backward)


@pytest.mark.parametrize(
    "family, mode",
    [(f, "full") for f in FAMILIES] + [("qwen3-vl", "lora"), ("qwen3.5", "lora"), ("qwen2-vl", "adamw8bit")],
)
def test_every_family_resumes_as_if_never_interrupted(tmp_path, family_model, family, mode, monkeypatch, capsys):
    """In-process and shorter than the runs above: each family's weights, adapters and trained mergers, and
    8-bit optimizer states, must come back from a checkpoint exactly."""
    data = dataset(tmp_path)
    steps = ["--max-steps", "8", *MODES[mode]]
    reference_args = flags(family_model(family), data, tmp_path / "reference", *steps)
    reference = finetune.train(parse_config(reference_args), single_device())
    args = flags(family_model(family), data, tmp_path / "out", *steps)
    with monkeypatch.context() as patched:
        signal_during_step(patched, 3)
        finetune.train(parse_config(args), single_device())
    assert len(rows(tmp_path / "out")) == 3
    assert complete_checkpoints(tmp_path / "out")[-1].name == "step-00000003"
    said = capsys.readouterr().out
    assert "stopped after step 3" in said and "--resume" in said and "memory plan: peak" in said
    if mode == "adamw8bit":  # bitsandbytes' 8-bit states and their scales, read back as plain tensors
        state = torch.load(complete_checkpoints(tmp_path / "out")[-1] / "state.pt", weights_only=True)["optimizer"]
        assert any(v.dtype == torch.uint8 for s in state["state"].values() for v in flat_tensors(s))
    resumed = finetune.train(parse_config([*args, "--resume"]), single_device())
    assert [r["loss"] for r in rows(tmp_path / "out")] == [r["loss"] for r in rows(tmp_path / "reference")]
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))


def flat_tensors(state: dict) -> list:
    return [t for v in state.values() for t in (flat_tensors(v) if isinstance(v, dict) else [v]) if torch.is_tensor(t)]


@pytest.mark.parametrize("mode", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_kill_9_between_checkpoints_loses_only_the_steps_since_the_last(tmp_path, tiny_model, reference, mode):
    data, losses = reference
    args = flags(tiny_model, data, tmp_path / "out", *MODES[mode])
    process = launch(args)
    wait_for_steps(process, tmp_path / "out", 6)
    kill_tree(process)
    finish(process)
    last = complete_checkpoints(tmp_path / "out")[-1]
    killed_at = len(rows(tmp_path / "out"))
    assert int(last.name.split("-")[1]) >= killed_at - 4 and killed_at < STEPS

    code, out, err = run([*args, "--resume"])
    assert code == 0, err[-3000:]
    assert f"resuming from {last}" in out
    assert [r["loss"] for r in rows(tmp_path / "out")] == losses(mode)


# Runs finetune.py, killing itself with SIGKILL during its second checkpoint: after the weights are
# written, before the optimizer state.
KILLED_WHILE_SAVING = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import finetune
import qwen_ft.checkpoint as checkpoint

saves = []
write_weights = checkpoint.save_weights

def save_weights(*args, **kwargs):
    write_weights(*args, **kwargs)
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_weights = save_weights
finetune.main(sys.argv[1:])
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tmp_path, tiny_model, reference):
    data, losses = reference
    args = flags(tiny_model, data, tmp_path / "out")
    code, _, _ = run(args, script=KILLED_WHILE_SAVING)
    assert code == -signal.SIGKILL
    root = tmp_path / "out" / "checkpoints"
    assert (root / ".tmp-step-00000008" / "model.safetensors").exists()  # half written
    assert not (root / ".tmp-step-00000008" / "state.pt").exists()
    assert [p.name for p in complete_checkpoints(tmp_path / "out")] == ["step-00000004"]

    code, out, err = run([*args, "--resume"])
    assert code == 0, err[-3000:]
    assert "resuming from" in out and "step-00000004" in out
    assert [r["loss"] for r in rows(tmp_path / "out")] == losses("full")
    assert not list(root.glob(".tmp-*"))  # the next save cleared it


def test_keep_last(tmp_path, tiny_model, reference):
    data, _ = reference
    args = flags(tiny_model, data, tmp_path / "out", "--save-every", "2", "--keep-last", "2", "--max-steps", "10")
    finetune.train(parse_config(args), single_device())
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] in (
        ["step-00000008", "step-00000010"],
        ["step-00000010", "step-00000008"],
    )
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000010"
    assert {"model.safetensors", "config.json", "state.pt", "rng-0.pt", "train_config.json"} <= {
        p.name for p in checkpoint.iterdir()
    }


def nan_after(monkeypatch, calls: int, then=None):
    """Make the loss NaN on every micro-batch after the first `calls` (for `then` micro-batches, or all)."""
    count = []
    real = finetune.cross_entropy_sum

    def cross_entropy_sum(*args, **kwargs):
        count.append(1)
        loss = real(*args, **kwargs)
        poisoned = len(count) > calls and (then is None or len(count) <= calls + then)
        return loss * float("nan") if poisoned else loss

    monkeypatch.setattr(finetune, "cross_entropy_sum", cross_entropy_sum)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, tiny_model, reference, monkeypatch):
    data, _ = reference
    nan_after(monkeypatch, calls=4, then=2)  # step 3's two micro-batches
    args = flags(tiny_model, data, tmp_path / "out", "--max-steps", "6")
    model = finetune.train(parse_config(args), single_device())
    logged = rows(tmp_path / "out")
    assert [r["skipped_step"] for r in logged] == [False, False, True, False, False, False]
    assert logged[-1]["bad_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(logged[3]["loss"])  # finite again after the skip


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_good_checkpoint(
    tmp_path, tiny_model, reference, monkeypatch, capsys
):
    data, _ = reference
    nan_after(monkeypatch, calls=2 * 5)  # from step 6 on
    args = flags(tiny_model, data, tmp_path / "out", "--max-bad-steps", "3")
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(args)
    message = str(exit_info.value.code)
    assert "3 steps in a row had a non-finite loss or gradient (up to step 8)" in message
    assert "so the weights are those of the last good step; the newest checkpoint, " in message
    assert len(rows(tmp_path / "out")) == 8
    kept = complete_checkpoints(tmp_path / "out")
    assert [p.name for p in kept] == ["step-00000004"]  # step 8 was bad: stopped, no checkpoint
    weights = torch.load(kept[0] / "state.pt", weights_only=True)
    assert weights["bad_steps"] == 0


def serve_once(folder):
    """An HTTP server whose files can be fetched once each (by the data check) and then 404."""
    fetched = []

    class Once(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path in fetched:
                self.send_error(404)
            else:
                fetched.append(self.path)
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Once, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_sample_that_breaks_during_training_stops_the_run_or_is_skipped(tmp_path, tiny_model, capsys):
    picture(tmp_path, "gone.png")
    server = serve_once(tmp_path)
    ok = picture(tmp_path, "ok.png")

    def run_with(name: str, *extra) -> tuple[str, str]:
        url = f"http://127.0.0.1:{server.server_address[1]}/gone.png?{name}"  # a new URL: its check succeeds
        data = write_json(tmp_path / f"{name}.json", [qa(ok, "Colour?", "red"), qa(url, "Colour?", "red")])
        args = ["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path / name), "--num-workers", "0"]
        finetune.main([*args, "--batch-size", "1", "--grad-accum", "1", "--max-steps", "4", "--no-shuffle", *extra])
        return data, url

    try:
        with pytest.raises(SystemExit) as exit_info:
            run_with("stop")
        message = str(exit_info.value.code)
        assert "stop.json: sample 1: image 'http" in message and "cannot be fetched" in message
        assert "--skip-bad-samples" in message and len(rows(tmp_path / "stop")) == 1
        run_with("skip", "--skip-bad-samples")
    finally:
        server.shutdown()
    logged = rows(tmp_path / "skip")
    assert [r["skipped_samples"] for r in logged] == [0, 1, 1, 2]  # sample 1 comes up at steps 2 and 4
    assert "2 bad samples skipped" in capsys.readouterr().out


def test_resuming_with_other_settings_refuses_or_says_what_changes(tmp_path, tiny_model, reference, capsys):
    data, _ = reference
    args = flags(tiny_model, data, tmp_path / "out", "--max-steps", "4")
    finetune.train(parse_config(args), single_device())
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*args, "--resume", "--batch-size", "1"])
    message = str(exit_info.value.code)
    assert "--batch-size: 2 -> 1" in message and "Resume with the checkpoint's settings" in message
    capsys.readouterr()
    finetune.main([*args, "--resume", "--max-steps", "6"])
    assert "with changes: --max-steps: 4 -> 6" in capsys.readouterr().out
    assert [r["step"] for r in rows(tmp_path / "out")] == list(range(1, 7))


@pytest.mark.parametrize("mode", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_ddp_kill_9_then_resume_equals_an_uninterrupted_ddp_run(tmp_path, tiny_model, reference, mode):
    data, _ = reference
    extra = ["--batch-size", "1", *(LORA if mode == "lora" else [])]
    code, _, err = run(flags(tiny_model, data, tmp_path / "reference", *extra), distributed=True)
    assert code == 0, err[-3000:]

    args = flags(tiny_model, data, tmp_path / "out", *extra)
    process = launch(args, distributed=True)
    wait_for_steps(process, tmp_path / "out", 6)
    kill_tree(process)  # every process of the job, as a crashed node would
    finish(process)
    assert complete_checkpoints(tmp_path / "out") and len(rows(tmp_path / "out")) < STEPS
    assert {p.name for p in complete_checkpoints(tmp_path / "out")[-1].glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}

    code, _, err = run([*args, "--resume"], distributed=True)
    assert code == 0, err[-3000:]
    assert [r["loss"] for r in rows(tmp_path / "out")] == [r["loss"] for r in rows(tmp_path / "reference")]


def test_out_of_memory_names_the_step_and_what_saves_memory(tmp_path, tiny_model, reference, monkeypatch):
    data, _ = reference
    calls = []
    forward_backward = finetune.forward_backward

    def running_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(finetune, "forward_backward", running_out)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(flags(tiny_model, data, tmp_path / "out"))
    message = str(exit_info.value.code)
    assert "ran out of memory at step 3" in message
    assert all(flag in message for flag in ("--gradient-checkpointing", "--batch-size", "--grad-accum", "--qlora"))


def test_a_fresh_run_replaces_the_checkpoints_an_earlier_run_left_in_its_folder(tmp_path, tiny_model):
    data = dataset(tmp_path)
    args = flags(tiny_model, data, tmp_path / "out", "--max-steps", "4", "--save-every", "2")
    finetune.main(args)
    earlier = torch.load(tmp_path / "out" / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    finetune.main([*args, "--seed", "7"])  # not --resume: a new run over the old one's checkpoints
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert state["step"] == 4 and rows(tmp_path / "out")[-1]["step"] == 4
    assert not torch.equal(state["optimizer"]["state"][0]["exp_avg"], earlier["optimizer"]["state"][0]["exp_avg"])
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
