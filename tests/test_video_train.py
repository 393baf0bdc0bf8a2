"""Video samples from the data file through the checks, the collator and a training step."""

import json
import math
import re

import pytest
from helpers import clip, greedy_answer, picture, qa, reference_labels, transformers_model, video_qa, write_json
from transformers import AutoModelForImageTextToText

import finetune
from qwen_ft import generate, inspect_data
from qwen_ft.collate import Collator
from qwen_ft.config import Config, parse_config
from qwen_ft.data.lengths import measure, token_ids
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.model import load_processor
from qwen_ft.tiny import FAMILIES
from qwen_ft.video import VideoSettings


def mixed_data(folder) -> str:
    return write_json(
        folder / "data.json",
        [
            qa(picture(folder, "a.png"), "What colour is the shape?", "red"),
            video_qa(clip(folder)),
            video_qa("clip.mp4", "What colour is the shape?", "red", fps=4.0, video_start=0.5, video_end=1.5),
            qa(None, "Say hi", "hi"),
        ],
    )


def loaded(data, processor, video=VideoSettings()):
    collator = Collator(processor, 4096, video)
    samples = read_samples(data, special_tokens=collator.tokens.all_strings)
    check_media(samples, video, collator.video_factor)
    return samples, collator


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_mixing_images_and_videos(tmp_path, family_processor, family):
    samples, collator = loaded(mixed_data(tmp_path), family_processor(family))
    batch = collator(samples)
    # One 112x112 picture: 8x8 patches, of 14 px, or of 16 px once Qwen3's resize to multiples of 32 makes it 128x128.
    assert batch["pixel_values"].shape[0] == 64
    # Video 1: 2 s at 2 fps = 4 frames = 2 temporal patches; video 2: 1 s at 4 fps = 4 frames; 8x8 patches as above.
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8], [2, 8, 8]]
    for row, sample in enumerate(samples):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == token_ids(collator, sample)  # the length check's count, without decoding
        labels = batch["labels"][row][: len(ids)].tolist()
        assert labels == reference_labels(sample.messages, collator)
    assert (batch["input_ids"] == collator.tokens.video_pad).sum() == 2 * 2 * 16


def test_per_sample_keys_override_the_run_settings(tmp_path, processor):
    samples, collator = loaded(mixed_data(tmp_path), processor, VideoSettings(fps=1.0, total_pixels=4 * 28 * 28))
    # The run's 1 fps gives 2 frames, raised to min_frames (4); a budget of 4 tokens would shrink the
    # frames below the 56x56 floor (min_pixels), so they stop there.
    assert samples[1].video_plans[0][:3] == (4, 56, 56)
    # The third sample's own fps (4) over its own 1 s range: 4 frames too.
    assert samples[2].video_plans[0][:3] == (4, 56, 56)
    frames, metadata = collator.load_video(samples[2].parts("video")[0])
    assert frames.shape[0] == 4 and metadata.fps == pytest.approx(4.0)
    assert frames.shape[2:] == samples[2].video_plans[0][1:3]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_on_video_samples(tmp_path, family_model, family):
    out = tmp_path / "out"
    args = [
        "--model",
        family_model(family),
        "--data",
        mixed_data(tmp_path),
        "--output-dir",
        str(out),
        "--num-workers",
        "0",
    ]
    args += ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--no-shuffle", "--lr", "1e-3"]
    finetune.train(parse_config(args), single_device())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["trained_tokens"] > 0 for r in rows)


def test_qwen2_5_vl_gets_seconds_per_temporal_patch(tmp_path, family_processor):
    processor = family_processor("qwen2.5-vl")
    samples, collator = loaded(mixed_data(tmp_path), processor)
    batch = collator(samples)
    # A temporal patch spans temporal_patch_size frames taken at the rate the reader took them: 2 fps (the
    # run's setting) for the first video, 4 fps (its own) for the second.
    plans = [plan for sample in samples for plan in sample.video_plans]
    assert [plan.sample_fps for plan in plans] == pytest.approx([2.0, 4.0])
    temporal_patch = processor.video_processor.temporal_patch_size
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([temporal_patch / plan.sample_fps for plan in plans])


def test_qwen3_vl_writes_the_time_of_each_temporal_patch_into_the_text(tmp_path, family_processor):
    samples, collator = loaded(mixed_data(tmp_path), family_processor("qwen3-vl"))
    batch = collator(samples)
    # Seconds from the video's start (not the range's), each temporal patch at the mean of its two frames' times.
    # The 2 s clip at 2 fps: frames at the middles of 4 slices of 0.5 s (0.25, 0.75, 1.25, 1.75 s); 0.5 to 1.5 s
    # at 4 fps: 4 slices of 0.25 s (0.625, 0.875, 1.125, 1.375 s), whose means 0.75 and 1.25 round to even.
    expected = [[], ["<0.5 seconds>", "<1.5 seconds>"], ["<0.8 seconds>", "<1.2 seconds>"], []]
    for row, times in enumerate(expected):
        text = collator.processor.tokenizer.decode(batch["input_ids"][row])
        assert re.findall(r"<[0-9.]+ seconds>", text) == times


PAD = "<|video_pad|>"
QUESTION = "Which way does the shape move?<|im_end|>\n<|im_start|>assistant\n"
# The clip (2 s, 112x112) at 2 fps: 4 frames, 2 temporal patches of 8x8 patches, each 4x4 = 16 tokens once merged.
# Qwen2-VL and Qwen2.5-VL: one pair around all of it. Qwen3-VL, as released: each temporal patch after its time
# (its two frames' mean), in a pair of its own, and no pair around the whole.
QWEN2_VIDEO = "<|vision_start|>" + PAD * 32 + "<|vision_end|>"
QWEN3_VIDEO = (
    f"<0.5 seconds><|vision_start|>{PAD * 16}<|vision_end|><1.5 seconds><|vision_start|>{PAD * 16}<|vision_end|>"
)
RENDERED = {
    "qwen2-vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    + QWEN2_VIDEO
    + QUESTION
    + "right<|im_end|>\n",
    "qwen3-vl": "<|im_start|>user\n" + QWEN3_VIDEO + QUESTION + "right<|im_end|>\n",
    "qwen3.5": "<|im_start|>user\n" + QWEN3_VIDEO + QUESTION + "<think>\n\n</think>\n\nright<|im_end|>\n",
}
RENDERED["qwen2.5-vl"] = RENDERED["qwen2-vl"]
RENDERED["qwen3-vl-moe"] = RENDERED["qwen3-vl"]


def release_rope(ids: list[int], video_pad: int, frame=(4, 4)) -> list[list[int]]:
    """Qwen3-VL's 3-D positions, by the release's rule: a text token one position on all three axes; a frame's
    merged patches, at row r and column c, (p, p + r, p + c) from the position p it starts at, and the next
    token at p + the frame's longer side."""
    positions, p, i = [], 0, 0
    while i < len(ids):
        if ids[i] != video_pad:
            positions.append([p, p, p])
            p, i = p + 1, i + 1
            continue
        positions += [[p, p + r, p + c] for r in range(frame[0]) for c in range(frame[1])]
        p, i = p + max(frame), i + frame[0] * frame[1]
    return positions


@pytest.mark.parametrize("family", FAMILIES)
def test_a_video_renders_as_each_family_was_trained_on_it(tmp_path, family_model, family_processor, family):
    processor = family_processor(family)
    samples, collator = loaded(write_json(tmp_path / "data.json", [video_qa(clip(tmp_path))]), processor)
    measure(collator, samples)
    batch = collator(samples)
    ids = batch["input_ids"][0].tolist()
    assert processor.tokenizer.decode(ids) == RENDERED[family]
    assert ids == processor.tokenizer(RENDERED[family], add_special_tokens=False)["input_ids"]
    assert ids == token_ids(collator, samples[0])  # what the length check predicts, and where the video ends
    video_end = len(ids) - ids[::-1].index(collator.tokens.vision_end)
    assert samples.table["measure"][0, :2].tolist() == [len(ids), video_end]
    if family.startswith("qwen3"):
        model = AutoModelForImageTextToText.from_pretrained(family_model(family))
        grid = batch["video_grid_thw"]
        positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], video_grid_thw=grid)
        assert positions[:, 0].T.tolist() == release_rope(ids, collator.tokens.video_pad)


def run_finetune(tiny_model, data, out) -> str:
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0"])
    assert not (out / "metrics.jsonl").exists()
    return str(exit_info.value.code)


@pytest.mark.parametrize(
    "make, settings, message",
    [
        (None, {}, "video 'gone.mp4' not found"),
        (b"definitely not a video", {}, "cannot be decoded"),
        ("truncated", {}, "cannot be decoded"),
        ("clip", {"video_end": 5.0}, "cannot be cut from start=0 s to end=5 s"),
        ("clip", {"video_start": -1.0}, "cannot be cut from start=-1 s"),
    ],
)
def test_bad_videos_stop_before_training(tmp_path, tiny_model, make, settings, message):
    name = "gone.mp4"
    if make == "clip":
        name = clip(tmp_path)
    elif make == "truncated":
        name = clip(tmp_path, "cut.mp4", frames=60)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    elif make is not None:
        name = "bad.mp4"
        (tmp_path / name).write_bytes(make)
    data = write_json(tmp_path / "data.json", [qa(None, "hi", "hi"), video_qa(name, **settings)])
    error = run_finetune(tiny_model, data, tmp_path / "out")
    assert f"{data}: sample 1: " in error and message in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_inspect_and_generate_handle_video(tmp_path, family_model, family, capsys):
    tiny_model = family_model(family)
    data = mixed_data(tmp_path)
    inspect_data.main(["--model", tiny_model, "--data", data, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video_tokens"] for r in rows] == [0, 32, 32, 0]
    video, prompt = str(tmp_path / "clip.mp4"), "What happens in the video?"
    generate.main(["--model", tiny_model, "--video", video, "--prompt", prompt, "--max-new-tokens", "3"])
    printed = capsys.readouterr().out
    # The model's own greedy generate on the question, its frames read at the default 2 fps.
    collator = Collator(load_processor(tiny_model), 4096, Config().video())
    question = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": prompt}]}]
    inputs = collator.process([question], generation_prompt=True)
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]  # 2 s at 2 fps: 4 frames, 2 temporal patches
    expected = greedy_answer(transformers_model(tiny_model), collator.processor.tokenizer, inputs, max_new_tokens=3)
    assert expected, "a random model's answer, but not an empty one, or printing nothing would pass"
    assert printed == expected + "\n"
    generate.main(["--model", tiny_model, "--data", data, "--max-new-tokens", "3"])
    assert "exact match:" in capsys.readouterr().out
