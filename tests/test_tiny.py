import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from qwen_ft import tiny
from qwen_ft.collate import SpecialTokens
from qwen_ft.tiny import FAMILIES

REPO = Path(__file__).resolve().parent.parent


def test_builds_a_complete_checkpoint_offline_in_seconds(tmp_path):
    start = time.perf_counter()
    out = tiny.build(tmp_path / "tiny")
    assert time.perf_counter() - start < 60
    names = {p.name for p in Path(out).iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert "processor_config.json" in names or "preprocessor_config.json" in names


@pytest.mark.parametrize("family", FAMILIES)
def test_the_command_line_builds_each_family_as_transformers_loads_it(tmp_path, family, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["qwen_ft.tiny", str(tmp_path / family), "--family", family])
    tiny.main()
    assert capsys.readouterr().out.strip() == str(tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / family)
    processor = AutoProcessor.from_pretrained(tmp_path / family)
    assert type(model) is FAMILIES[family].model and type(processor) is FAMILIES[family].processor
    assert processor.image_processor.patch_size == model.config.vision_config.patch_size


def test_python_m_qwen_ft_tiny_runs(tmp_path):
    command = [sys.executable, "-m", "qwen_ft.tiny", str(tmp_path / "model"), "--family", "qwen3.5"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "qwen3_5"


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_and_config_agree(family_model, family):
    tiny_model = family_model(family)
    processor = AutoProcessor.from_pretrained(tiny_model)
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tiny.SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(tiny.SPECIAL_TOKENS)
    assert all(tokenizer.decode([i]) == token for token, i in ids.items())
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["text_config"]["vocab_size"] >= len(tokenizer)
    generation = GenerationConfig.from_pretrained(tiny_model)
    assert ids["<|im_end|>"] in generation.eos_token_id
    assert generation.pad_token_id == tokenizer.pad_token_id == ids["<|endoftext|>"]
    SpecialTokens.from_tokenizer(tokenizer)  # everything the collator relies on is there


QWEN2_VL_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n"
)
QWEN3_VL_CHAT = (  # no default system prompt
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
    "<|im_start|>assistant\nHello<|im_end|>\n"
)
QWEN3_5_CHAT = (  # and the answer after the last question opens with an (empty) thinking block
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
)


# What the published models' chat templates render for a conversation without tools.
@pytest.mark.parametrize(
    "family, rendered",
    [
        ("qwen2-vl", QWEN2_VL_CHAT),
        ("qwen2.5-vl", QWEN2_VL_CHAT),
        ("qwen3-vl", QWEN3_VL_CHAT),
        ("qwen3-vl-moe", QWEN3_VL_CHAT),
        ("qwen3.5", QWEN3_5_CHAT),
    ],
)
def test_chat_template_is_the_familys(family_model, family, rendered):
    processor = AutoProcessor.from_pretrained(family_model(family))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == rendered


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_model_is_small_and_trains(family_model, family):
    # Small enough for the suite's many steps on the CPU (speed itself is measured in bench/, not here).
    model = AutoModelForImageTextToText.from_pretrained(family_model(family))
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.text_config.hidden_size <= 128 and model.config.text_config.num_hidden_layers <= 4
    model(input_ids=torch.randint(0, 500, (4, 64))).logits.sum().backward()
    assert all(p.grad is not None for p in model.model.language_model.parameters())
