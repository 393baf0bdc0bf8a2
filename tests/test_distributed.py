"""finetune_distributed.py under torchrun on the CPU (gloo), against one process with the same global batch."""

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import picture, qa, write_json
from transformers import AutoModelForImageTextToText

import finetune
from qwen_ft.config import parse_config
from qwen_ft.dist import single_device
from qwen_ft.tiny import FAMILIES

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def dataset(folder, n=8) -> str:
    """Pictures at even indices, text-only samples at odd ones: with 2 ranks and no shuffling, rank 1
    gets only text-only micro-batches while rank 0 gets pictures."""
    colours = ["red", "green", "blue", "yellow"]
    samples = [
        qa(picture(folder, f"{i}.png", colour=colours[i % 4]), "What colour is the shape?", colours[i % 4])
        if i % 2 == 0
        else qa(None, f"How many corners does shape {i} have?", "four" if i % 4 == 1 else "three")
        for i in range(n)
    ]
    return write_json(folder / "data.json", samples)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, extra_launch=()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", *extra_launch]
    if not extra_launch:
        command += ["--standalone"]
    command += ["--nproc-per-node", str(nproc), str(REPO / "finetune_distributed.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def flags(tiny_model, data, out, *extra) -> list[str]:
    return [
        "--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0", "--no-shuffle",
        "--precision", "fp32", "--lr", "1e-3", "--warmup-steps", "0", "--max-steps", "6", *extra,
    ]  # fmt: skip


def single_process(tiny_model, data, out, *extra):
    return finetune.train(parse_config(flags(tiny_model, data, out, *extra)), single_device())


LORA = ["--lora", "--lora-dropout", "0", "--lora-r", "4", "--lr", "1e-2"]
MODES = {"full": [], "lora": LORA, "packed": ["--packing"]}


@pytest.mark.parametrize(
    "family, mode",
    # Qwen2-VL's DDP run in the default tests is the packed one; its full and LoRA runs are slow ones.
    [pytest.param("qwen2-vl", mode, marks=pytest.mark.slow) for mode in ("full", "lora")]
    + [("qwen2-vl", "packed")]
    + [(family, "full") for family in FAMILIES if family != "qwen2-vl"],
)
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, family_model, family, mode):
    tiny_model, mode = family_model(family), MODES[mode]
    data = dataset(tmp_path)
    single_process(tiny_model, data, tmp_path / "one", "--batch-size", "2", "--grad-accum", "2", *mode)
    run = torchrun(*flags(tiny_model, data, tmp_path / "two", "--batch-size", "1", "--grad-accum", "2", *mode))
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert run.stdout.count("saved the fine-tuned model") == 1  # rank 0 alone saves and prints


@pytest.mark.slow
def test_uneven_sample_counts_and_qlora_finish(tmp_path, tiny_model):
    data = dataset(tmp_path, n=5)  # 3 samples on rank 0, 2 (padded to 3 by the sampler) on rank 1
    run = torchrun(*flags(tiny_model, data, tmp_path / "out", "--batch-size", "2", "--qlora", "--max-steps", "3"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(losses(tmp_path / "out")) == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family", ["qwen2-vl", pytest.param("qwen3-vl", marks=pytest.mark.slow)])
def test_fsdp_equals_one_process_and_saves_a_transformers_checkpoint(tmp_path, family_model, family):
    tiny_model = family_model(family)
    data = dataset(tmp_path)
    single_process(tiny_model, data, tmp_path / "one", "--batch-size", "2", "--grad-accum", "1")
    run = torchrun(*flags(tiny_model, data, tmp_path / "fsdp", "--batch-size", "1", "--grad-accum", "1", "--fsdp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    sharded = AutoModelForImageTextToText.from_pretrained(tmp_path / "fsdp", dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(tmp_path / "one", dtype=torch.float32)
    # AdamW divides each gradient by its running RMS, so where a gradient is near 0 the different order of
    # FSDP's reductions can move a weight by a fraction of the lr (1e-3) per step: a tenth of it is allowed.
    for (name, a), b in zip(sharded.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path, tiny_model):
    data = dataset(tmp_path)
    single_process(tiny_model, data, tmp_path / "one", "--batch-size", "2", "--grad-accum", "1")
    endpoint = f"127.0.0.1:{free_port()}"
    args = flags(tiny_model, data, tmp_path / "nodes", "--batch-size", "1", "--grad-accum", "1")

    def node(rank):
        launch = ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
        return torchrun(*args, nproc=1, extra_launch=launch)

    results = [None, None]
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, node(r))) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert losses(tmp_path / "nodes") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_bad_data_stops_every_rank_with_one_message(tmp_path, tiny_model):
    """Each rank checks a share of the samples (rank 0 the even ones); the message lists every problem."""
    good = qa(picture(tmp_path, "ok.png"), "What colour?", "red")
    bad = [qa(f"missing-{i}.png", "What colour?", "red") for i in (1, 2)]
    data = write_json(tmp_path / "data.json", [good, *bad])
    run = torchrun(*flags(tiny_model, data, tmp_path / "out"))
    assert run.returncode != 0
    assert run.stderr.count("error: ") == 1
    first = run.stderr.index("sample 1: message 0: image 'missing-1.png' not found")
    assert run.stderr.index("sample 2: message 0: image 'missing-2.png' not found") > first


def test_a_rank_that_fails_mid_run_takes_the_job_down_without_hanging(tmp_path, tiny_model):
    """An image URL that serves both ranks' checks, then is gone when rank 1 loads it to train."""
    picture(tmp_path, "flaky.png")
    fetches = []

    class TwiceOnly(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            fetches.append(self.path)
            if len(fetches) > 2:
                self.send_error(404)
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(TwiceOnly, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        flaky = f"http://127.0.0.1:{server.server_address[1]}/flaky.png"
        local = picture(tmp_path, "ok.png")
        # No shuffling: rank 0 trains on samples 0 and 2, rank 1 on 1 and 3.
        samples = [qa(local, "What colour?", "red"), qa(flaky, "What colour?", "red")] * 2
        samples[3] = qa(local, "What colour?", "red")
        data = write_json(tmp_path / "data.json", samples)
        run = torchrun(*flags(tiny_model, data, tmp_path / "out", "--batch-size", "1", "--grad-accum", "1"))
    finally:
        server.shutdown()
    assert len(fetches) == 3  # the two checks, then the failed load
    assert run.returncode != 0
    assert "cannot be fetched" in run.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()
