"""Video samples from the data file through the checks, the collator and a training step."""

import json

import pytest
from helpers import picture, qa, reference_labels, write_json

import finetune
from qwen_ft import example_data, generate, inspect_data, tiny
from qwen_ft.collate import Collator
from qwen_ft.config import parse_config
from qwen_ft.data import check_media, read_samples
from qwen_ft.dist import single_device
from qwen_ft.model import load_processor
from qwen_ft.video import VideoSettings


def clip(folder, name="clip.mp4", frames=16) -> str:
    """A 2 s clip (8 fps) of a red circle moving right."""
    pictures = [example_data.draw_at("circle", "red", 0.3 + 0.4 * t / (frames - 1), 0.5, 18) for t in range(frames)]
    folder.mkdir(parents=True, exist_ok=True)
    example_data.write_clip(folder / name, pictures, fps=8)
    return name


def video_qa(video, question="Which way does the shape move?", answer="right", **settings) -> dict:
    content = [{"type": "video", "video": video, **settings}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


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


def test_a_batch_mixing_images_and_videos(tmp_path, processor):
    samples, collator = loaded(mixed_data(tmp_path), processor)
    batch = collator(samples)
    assert batch["pixel_values"].shape[0] == 64  # one 112x112 picture: 8x8 patches
    # Video 1: 2 s at 2 fps = 4 frames = 2 temporal patches; video 2: 1 s at 4 fps = 4 frames.
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8], [2, 8, 8]]
    for row, sample in enumerate(samples):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == collator.token_ids(sample)  # the length check's count, without decoding
        labels = batch["labels"][row][: len(ids)].tolist()
        assert labels == reference_labels(sample.messages, collator)
    assert (batch["input_ids"] == collator.tokens.video_pad).sum() == 2 * 2 * 16


def test_per_sample_keys_override_the_run_settings(tmp_path, processor):
    samples, collator = loaded(mixed_data(tmp_path), processor, VideoSettings(fps=1.0, total_pixels=4 * 28 * 28))
    # The run's 1 fps gives 2 frames, raised to min_frames (4); a budget of 4 tokens would shrink the
    # frames below the 56x56 floor (min_pixels), so they stop there.
    assert samples[1].video_shapes == [(4, 56, 56)]
    # The third sample's own fps (4) over its own 1 s range: 4 frames too.
    assert samples[2].video_shapes == [(4, 56, 56)]
    frames, sample_fps = collator.load_video(samples[2].parts("video")[0])
    assert frames.shape[0] == 4 and sample_fps == pytest.approx(4.0)
    assert frames.shape[2:] == samples[2].video_shapes[0][1:]


def test_a_training_step_on_video_samples(tmp_path, tiny_model):
    out = tmp_path / "out"
    args = ["--model", tiny_model, "--data", mixed_data(tmp_path), "--output-dir", str(out), "--num-workers", "0"]
    args += ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--no-shuffle", "--lr", "1e-3"]
    finetune.train(parse_config(args), single_device())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["trained_tokens"] > 0 for r in rows)


@pytest.fixture(scope="module")
def tiny_qwen25(tmp_path_factory) -> str:
    return str(tiny.build(tmp_path_factory.mktemp("tiny25"), arch="qwen2.5-vl"))


def test_qwen2_5_vl_gets_seconds_per_temporal_patch(tmp_path, tiny_qwen25):
    data = mixed_data(tmp_path)
    samples, collator = loaded(data, load_processor(tiny_qwen25))
    batch = collator(samples)
    # Two frames per temporal patch, at 2 fps (run setting) and at 4 fps (the third sample's own).
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.0, 0.5])
    out = tmp_path / "out"
    args = ["--model", tiny_qwen25, "--data", data, "--output-dir", str(out), "--num-workers", "0", "--max-steps", "1"]
    finetune.train(parse_config(args), single_device())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


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


def test_inspect_and_generate_handle_video(tmp_path, tiny_model, capsys):
    data = mixed_data(tmp_path)
    inspect_data.main(["--model", tiny_model, "--data", data, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video_tokens"] for r in rows] == [0, 32, 32, 0]
    generate.main(
        [
            "--model",
            tiny_model,
            "--video",
            str(tmp_path / "clip.mp4"),
            "--prompt",
            "Which way?",
            "--max-new-tokens",
            "3",
        ]
    )
    generate.main(["--model", tiny_model, "--data", data, "--max-new-tokens", "3"])
    assert "exact match:" in capsys.readouterr().out
