import json

import pytest
from helpers import picture, qa, write_json

from qwen_ft import inspect_data
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.model import load_processor

# A 112x112 picture is 16 tokens in every family: 8x8 patches of 14 px (Qwen2) or, resized to 128x128, of 16 px
# (Qwen3), 2x2 of which merge into a token.
ONE_PER_GENERATION = ["qwen2-vl", "qwen3-vl"]


@pytest.mark.parametrize("family", ONE_PER_GENERATION)
def test_json_output_is_one_object_per_sample_matching_the_collator(tmp_path, family_model, family, capsys):
    tiny_model = family_model(family)
    data = write_json(
        tmp_path / "data.json",
        [qa(picture(tmp_path, "a.png"), "What colour is the shape?", "red"), qa(None, "Say hi", "hi")],
    )
    inspect_data.main(["--model", tiny_model, "--data", data, "--json"])
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    samples = read_samples(data)
    check_media(samples)
    collator = Collator(load_processor(tiny_model), 4096)
    assert [r["index"] for r in rows] == [0, 1]
    for row, sample in zip(rows, samples):
        batch = collator([sample])
        assert row["input_ids"] == batch["input_ids"][0].tolist()
        assert row["labels"] == batch["labels"][0].tolist()
        assert row["trained_tokens"] == sum(label != IGNORE_INDEX for label in row["labels"])
    assert rows[0]["image_tokens"] == 16 and rows[1]["image_tokens"] == 0


@pytest.mark.parametrize("family", ONE_PER_GENERATION)
def test_text_output_marks_the_trained_spans(tmp_path, family_model, family, capsys):
    tiny_model = family_model(family)
    data = write_json(tmp_path / "data.json", [qa(picture(tmp_path, "a.png"), "What colour is the shape?", "red")])
    inspect_data.main(["--model", tiny_model, "--data", data])
    out = capsys.readouterr().out
    assert "[[red<|im_end|>]]" in out
    assert "<|image_pad|>*16" in out
    assert "16 image tokens" in out and "2 trained tokens" in out


def test_limit_shows_the_first_samples_and_the_totals_add_them_up(tmp_path, tiny_model, capsys):
    samples = [qa(picture(tmp_path, "a.png"), "What colour is the shape?", "red"), qa(None, "Say hi", "hi")]
    data = write_json(tmp_path / "data.json", samples + [qa(None, "Never shown", "no")])
    inspect_data.main(["--model", tiny_model, "--data", data, "--json", "--limit", "2"])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    tokens, image_tokens, trained = (sum(r[key] for r in rows) for key in ("tokens", "image_tokens", "trained_tokens"))
    assert captured.err.strip().splitlines()[-1] == (
        f"2 samples: {tokens} tokens, {tokens - image_tokens} text tokens, {image_tokens} image tokens, "
        f"0 video tokens, {trained} trained tokens"
    )


def test_help_lists_only_the_flags_that_shape_the_data(capsys):
    with pytest.raises(SystemExit):
        inspect_data.main(["--help"])
    help_text = capsys.readouterr().out
    assert "--max-pixels" in help_text and "--limit" in help_text and "--json" in help_text
    assert "--lr" not in help_text and "--lora" not in help_text and "--save-every" not in help_text
