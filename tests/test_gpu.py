"""What only a GPU shows: the CUDA paths of the loop. Skipped on machines without CUDA."""

import json

import pytest
import torch
from helpers import picture, qa, write_json

import finetune
from qwen_ft.config import parse_config
from qwen_ft.dist import single_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def data(folder) -> str:
    samples = [qa(picture(folder, f"{c}.png", colour=c), "What colour is the shape?", c) for c in ("red", "blue")]
    return write_json(folder / "data.json", samples + [qa(None, "Say hi", "hi")])


def train(tiny_model, folder, *flags):
    args = ["--model", tiny_model, "--data", data(folder), "--output-dir", str(folder / "out")]
    args += ["--max-steps", "20", "--lr", "2e-3", "--batch-size", "3", *flags]  # flags come last and win
    model = finetune.train(parse_config(args), single_device())
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["peak_memory_gib"] > 0 for row in rows)
    return model, [row["loss"] for row in rows]


def test_bf16_mixed_on_cuda_keeps_fp32_weights_and_learns(tmp_path, tiny_model):
    model, losses = train(tiny_model, tmp_path, "--grad-accum", "1")
    assert next(model.parameters()).is_cuda
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert losses[-1] < 0.5 * losses[0]


def test_qlora_on_cuda_quantizes_the_llm_and_learns(tmp_path, tiny_model):
    model, losses = train(tiny_model, tmp_path, "--qlora", "--lr", "1e-2", "--gradient-checkpointing")
    q_proj = model.base_model.model.model.language_model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.is_cuda
    assert losses[-1] < losses[0]
