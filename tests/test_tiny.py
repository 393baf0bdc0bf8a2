import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from qwen_ft import tiny
from qwen_ft.collate import SpecialTokens


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


def test_special_tokens_and_config_agree(tiny_model):
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


def test_chat_template_is_qwen2_vl_s(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_a_training_step_is_fast_on_the_cpu(tiny_model):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.text_config.hidden_size <= 128 and model.config.text_config.num_hidden_layers <= 4
    ids = torch.randint(0, 500, (4, 64))
    model(input_ids=ids).logits.sum().backward()  # warm-up
    start = time.perf_counter()
    model(input_ids=ids).logits.sum().backward()
    assert time.perf_counter() - start < 1.0
