"""The family table: every tiny family is a supported one, another architecture stops before its weights load."""

import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig, LlamaConfig

import finetune
from qwen_ft import families, generate, inspect_data, tiny
from qwen_ft.families import family_of


def test_every_tiny_family_is_a_supported_family_of_the_same_name():
    assert list(tiny.FAMILIES) == [family.name for family in families.FAMILIES]
    for name, recipe in tiny.FAMILIES.items():
        config = recipe.config()  # the family's own defaults, as a published config.json would give
        assert family_of(config).name == name


ENTRY_POINTS = {
    "finetune": lambda model: finetune.main(["--model", model]),
    "generate": lambda model: generate.main(["--model", model, "--prompt", "Hi"]),
    "inspect_data": lambda model: inspect_data.main(["--model", model]),
}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_another_architecture_stops_before_loading_with_the_supported_families(tmp_path, tiny_model, entry_point):
    # A text-only Llama with a Qwen processor beside it (so only the architecture is wrong) and no weights
    # at all: the message must come from config.json alone.
    folder = tmp_path / "llama"
    llama = LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=2)
    llama.save_pretrained(folder)
    for file in Path(tiny_model).iterdir():
        if file.name.startswith(("processor", "tokenizer", "chat_template")):
            shutil.copy(file, folder)
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[entry_point](str(folder))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1
    assert "not a model qwen-ft trains" in message
    assert all(f"{family.name} ({family.hub_names[0]}" in message for family in families.FAMILIES)
