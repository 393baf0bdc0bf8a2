"""The benchmark models have the published shapes, and the throughput benchmark runs finetune.py as it says."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_ft.tiny import FAMILIES, build_tokenizer, make_config

REPO = Path(__file__).resolve().parent.parent


# Parameter counts on the model cards of the Qwen/*-Instruct models (safetensors metadata): the configs
# must describe those models, or the benchmarks measure another one.
PUBLISHED = {
    ("qwen2-vl", "2b"): 2_208_985_600,
    ("qwen2-vl", "7b"): 8_291_375_616,
    ("qwen2.5-vl", "3b"): 3_754_622_976,
    ("qwen2.5-vl", "7b"): 8_292_166_656,
    ("qwen3-vl", "2b"): 2_127_532_032,
    ("qwen3-vl", "4b"): 4_437_815_808,
    ("qwen3-vl", "8b"): 8_767_123_696,
}


@pytest.mark.parametrize("family, size", PUBLISHED)
def test_full_sizes_have_the_published_parameter_counts(family, size):
    with torch.device("meta"):  # shapes only, no memory
        model = FAMILIES[family].model(make_config(build_tokenizer(family), family, size))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[family, size]


def test_every_size_the_builder_offers_is_checked_above():
    assert set(PUBLISHED) == {(family, size) for family, recipe in FAMILIES.items() for size in recipe.sizes}


@pytest.mark.slow
def test_throughput_benchmark_trains_on_samples_of_the_asked_length(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--size", "tiny", "--mode", "lora"]
    command += ["--tokens", "200", "--image-tokens", "16", "--steps", "3", "--warmup", "1", "--work-dir", str(tmp_path)]
    run = subprocess.run([*command, "--", "--lora-r", "4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = next(line for line in run.stdout.splitlines() if line.startswith("| CPU |"))
    assert "| tiny | lora | 200 (16) | --lora-r 4 |" in row
    metrics = (tmp_path / "run-tiny-lora-200-python" / "out" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in metrics]
    assert [s["tokens"] for s in steps] == [200, 200, 200]
    assert float(row.split("|")[7]) == round(statistics.median(s["tokens_per_s"] for s in steps[1:]))
