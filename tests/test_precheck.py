"""What happens before the first step: sources mixed by weight, the header check, and the data index."""

import json
from collections import Counter

import numpy as np
import pytest
from helpers import picture, qa, write_json
from PIL import Image

import finetune
from qwen_ft.collate import Collator
from qwen_ft.config import parse_config
from qwen_ft.data import checked
from qwen_ft.data.index import FOLDER
from qwen_ft.data.read import DataError, mix, read_samples
from qwen_ft.dist import single_device
from qwen_ft.model import load_processor


def numbered(folder, name: str, count: int, image: str | None = None) -> str:
    """A data file of `count` samples whose answers are their numbers in it."""
    return write_json(folder / name, [qa(image, f"Question {i}?", f"{name} {i}") for i in range(count)])


def answers(samples) -> Counter:
    return Counter(sample.messages[-1]["content"][0]["text"] for sample in samples)


def test_weights_draw_whole_copies_and_a_seeded_share(tmp_path):
    a, b = numbered(tmp_path, "a.json", 4), numbered(tmp_path, "b.json", 20)
    samples = read_samples(f"{a}:2,{b}:0.5")
    mixed = mix(samples, seed=1)
    counts = answers(mixed)
    assert len(mixed) == 2 * 4 + 10
    assert all(counts[f"a.json {i}"] == 2 for i in range(4))
    drawn = {answer for answer in counts if answer.startswith("b.json")}
    assert len(drawn) == 10 and all(counts[answer] == 1 for answer in drawn)
    assert set(answers(mix(samples, seed=1))) == set(counts)  # the seed fixes the draw
    assert set(answers(mix(samples, seed=2))) != set(counts)
    assert len(mix(read_samples(f"{a},{b}"), seed=1)) == 24


def test_a_weighted_mix_trains_every_drawn_sample_once_an_epoch(tmp_path, tiny_model):
    a, b = numbered(tmp_path, "a.json", 3), numbered(tmp_path, "b.json", 4)
    out = tmp_path / "out"
    finetune.main(
        ["--model", tiny_model, "--data", f"{a}:2,{b}:0.5", "--output-dir", str(out), "--batch-size", "1",
         "--grad-accum", "1", "--num-workers", "0", "--save-every", "0"]
    )  # fmt: skip
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 * 3 + 2


def test_sources_and_their_errors_are_named(tmp_path, tiny_model):
    a = numbered(tmp_path, "a.json", 2)
    b = write_json(tmp_path / "b.json", [qa(None, "hi", "hello"), {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"b\.json: sample 1: message 0 has unknown role 'bot'"):
        read_samples(f"{a}:3,{b}")
    for spec in (f"{a}:0", f"{a}:-1", f"{a},"):
        with pytest.raises(DataError, match="is not a data file with an optional weight above 0"):
            read_samples(spec)


def truncated_jpeg(folder) -> str:
    picture(folder, "cut.jpg", size=(300, 300))
    path = folder / "cut.jpg"
    path.write_bytes(path.read_bytes()[:1000])  # the header whole, most of the pixels gone
    return "cut.jpg"


def test_the_header_check_lets_a_truncated_jpeg_through_to_training(tmp_path, tiny_model):
    """Found when training loads it: the run stops naming it, or skips and counts it."""
    picture(tmp_path, "ok.png")
    data = write_json(
        tmp_path / "data.json", [qa("ok.png", "Colour?", "red"), qa(truncated_jpeg(tmp_path), "Colour?", "red")]
    )
    flags = ["--model", tiny_model, "--data", data, "--batch-size", "2", "--grad-accum", "1", "--num-workers", "0"]
    with pytest.raises(SystemExit) as stopped:
        finetune.main([*flags, "--output-dir", str(tmp_path / "stop")])
    assert f"{data}: sample 1: image '{tmp_path / 'cut.jpg'}' cannot be decoded" in str(stopped.value.code)
    assert "--skip-bad-samples" in str(stopped.value.code)
    finetune.main([*flags, "--output-dir", str(tmp_path / "skip"), "--skip-bad-samples"])
    record = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_samples"] == 1


class ImagesOpened:
    """Counts PIL.Image.open calls while it is on."""

    def __init__(self, monkeypatch):
        self.count, open_image = 0, Image.open

        def counting(*args, **kwargs):
            self.count += 1
            return open_image(*args, **kwargs)

        monkeypatch.setattr(Image, "open", counting)


def start(tiny_model, data, out, *flags):
    """What a run's start finds about its data: the samples checked_samples gives."""
    cfg = parse_config(["--model", tiny_model, "--data", data, "--output-dir", str(out), *flags])
    collator = Collator(load_processor(tiny_model, cfg.min_pixels, cfg.max_pixels), cfg.max_length, cfg.video())
    return checked.checked_samples(cfg.data, cfg, collator, single_device())


def found(samples) -> list:
    return [(s.image_sizes, s.video_plans, s.length) for s in samples]


def test_a_second_start_on_the_same_data_opens_no_image(tmp_path, tiny_model, monkeypatch):
    for name, size in (("a.png", None), ("b.png", (150, 90))):
        picture(tmp_path, name, size=size)
    samples = [qa("a.png", "Colour?", "red"), qa("b.png", "Shape?", "circle"), qa(None, "Hi", "hello")]
    data = write_json(tmp_path / "data.json", samples)
    first = found(start(tiny_model, data, tmp_path / "run-1"))
    assert list((tmp_path / FOLDER).glob("*.npz"))  # beside the output dir, for any run in this folder

    opened = ImagesOpened(monkeypatch)
    assert found(start(tiny_model, data, tmp_path / "run-2")) == first
    assert opened.count == 0

    start(tiny_model, data, tmp_path / "run-2", "--max-pixels", str(56 * 56))  # a resize setting changed
    assert opened.count == 2
    write_json(tmp_path / "data.json", [*samples, qa("a.png", "Where?", "top left")])  # the data changed
    again = found(start(tiny_model, data, tmp_path / "run-2"))
    assert opened.count == 2 + 2 and again[:3] == first


def test_an_index_is_only_used_for_its_own_source(tmp_path, tiny_model, monkeypatch):
    picture(tmp_path, "a.png")
    a = write_json(tmp_path / "a.json", [qa("a.png", "Colour?", "red")])
    b = write_json(tmp_path / "b.json", [qa("a.png", "Shape?", "circle"), qa("a.png", "Where?", "top left")])
    start(tiny_model, a, tmp_path / "out")
    opened = ImagesOpened(monkeypatch)
    mixed = start(tiny_model, f"{a},{b}", tmp_path / "out")
    assert opened.count == 1  # b's one image file, once for its two samples
    assert np.all(mixed.lengths > 0) and len(mixed) == 3


def test_an_index_that_cant_be_written_is_a_warning(tmp_path, tiny_model, monkeypatch, capsys):
    picture(tmp_path, "a.png")
    data = write_json(tmp_path / "data.json", [qa("a.png", "Colour?", "red")])
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(checked, "index_folder", lambda output_dir: tmp_path / "a-file" / FOLDER)
    assert len(start(tiny_model, data, tmp_path / "out")) == 1
    assert "warning: the data index was not saved" in capsys.readouterr().err


def test_a_full_check_serves_later_header_checks_and_not_the_other_way(tmp_path, tiny_model, monkeypatch):
    picture(tmp_path, "a.png")
    data = write_json(tmp_path / "data.json", [qa("a.png", "Colour?", "red")])
    start(tiny_model, data, tmp_path / "out")
    opened = ImagesOpened(monkeypatch)
    start(tiny_model, data, tmp_path / "out", "--check-media", "full")  # the header check's index won't do
    assert opened.count == 1
    start(tiny_model, data, tmp_path / "out")  # the full check's will
    assert opened.count == 1
