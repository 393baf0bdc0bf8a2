"""Hugging Face datasets on disk (parquet, arrow shards, save_to_disk) as --data, images stored inline."""

import json

import datasets
import numpy as np
import pytest
from helpers import inspected, picture, qa, run_finetune, write_json
from PIL import Image

import finetune
from qwen_ft.data.media import load_image
from qwen_ft.data.read import read_samples

QUESTIONS = [("a.png", "What colour is the shape?", "red"), ("b.png", "What shape is it?", "square")]


def pictures(folder) -> dict[str, bytes]:
    picture(folder, "a.png")
    picture(folder, "b.png", shape="square", colour="blue", corner="bottom right", size=(150, 90))
    return {name: (folder / name).read_bytes() for name in ("a.png", "b.png")}


def chartqa_like(folder) -> datasets.Dataset:
    """Columns as ChartQA has them: an inline image, a query, a one-element list of labels, and metadata."""
    images = pictures(folder)
    rows = {
        "image": [{"bytes": images[name], "path": None} for name, _, _ in QUESTIONS],
        "query": [question for _, question, _ in QUESTIONS],
        "label": [[answer] for _, _, answer in QUESTIONS],
        "human_or_machine": [0, 1],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": datasets.List(datasets.Value("string")),
            "human_or_machine": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def reference(tmp_path, tiny_model, capsys) -> list[dict]:
    """The same questions in the messages form, the images as files."""
    data = write_json(tmp_path / "messages.json", [qa(name, question, answer) for name, question, answer in QUESTIONS])
    return inspected(tiny_model, data, capsys)[0]


COLUMNS = ["--columns", "question=query,answer=label"]


def test_a_parquet_file_with_inline_images_reads_as_the_messages_form(tmp_path, tiny_model, capsys):
    chartqa_like(tmp_path).to_parquet(tmp_path / "train.parquet")
    got, said = inspected(tiny_model, tmp_path / "train.parquet", capsys, *COLUMNS)
    assert got == reference(tmp_path, tiny_model, capsys)
    assert "train.parquet: 2 samples, qa format; not read: human_or_machine" in said


def test_a_parquet_dataset_trains_with_dataloader_workers(tmp_path, tiny_model):
    chartqa_like(tmp_path).to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "out"
    finetune.main(
        ["--model", tiny_model, "--data", str(tmp_path / "train.parquet"), *COLUMNS, "--output-dir", str(out),
         "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--num-workers", "1"]
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["skipped_samples"] == 0
    assert all(record["trained_tokens"] > 0 for record in records)


def test_save_to_disk_folder_in_trl_format(tmp_path, tiny_model, capsys):
    images = pictures(tmp_path)
    rows = {
        "images": [[{"bytes": images[name], "path": None}] for name, _, _ in QUESTIONS],
        "messages": [
            [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
            for _, question, answer in QUESTIONS
        ],
    }
    dataset = datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))
    dataset.save_to_disk(tmp_path / "trl")
    got, said = inspected(tiny_model, tmp_path / "trl", capsys)
    assert got == reference(tmp_path, tiny_model, capsys)
    assert "trl: 2 samples, trl format" in said


def test_a_folder_of_shards_is_one_dataset_and_several_splits_need_one_named(tmp_path, tiny_model, capsys):
    dataset = chartqa_like(tmp_path)
    (tmp_path / "shards").mkdir()
    for i in range(2):
        dataset.select([i]).to_parquet(tmp_path / "shards" / f"train-{i:05d}-of-00002.parquet")
    got, said = inspected(tiny_model, tmp_path / "shards", capsys, *COLUMNS)
    assert got == reference(tmp_path, tiny_model, capsys)
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(tmp_path / "splits")
    error = run_finetune(tiny_model, str(tmp_path / "splits"), tmp_path / "out", *COLUMNS)
    assert "a dataset with several splits (test, train): pass the split's folder" in error


def test_a_broken_inline_image_names_its_sample(tmp_path, tiny_model):
    dataset = chartqa_like(tmp_path)
    broken = dataset.to_dict()
    broken["image"][1] = {"bytes": b"not an image", "path": None}
    datasets.Dataset.from_dict(broken, features=dataset.features).to_parquet(tmp_path / "broken.parquet")
    error = run_finetune(tiny_model, str(tmp_path / "broken.parquet"), tmp_path / "out", *COLUMNS)
    assert f"{tmp_path / 'broken.parquet'}: sample 1: image 'dataset:" in error
    assert "row=1&column=image' is not an image PIL can read" in error


@pytest.mark.parametrize("raw", [True, False])
def test_images_as_raw_bytes_or_paths(tmp_path, tiny_model, capsys, raw):
    """A plain parquet (no datasets features): a column of bytes, or of image paths beside the file."""
    images = pictures(tmp_path)
    column = [images[name] for name, _, _ in QUESTIONS] if raw else [name for name, _, _ in QUESTIONS]
    rows = {"image": column, "question": [q for _, q, _ in QUESTIONS], "answer": [a for _, _, a in QUESTIONS]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "plain.parquet")
    got, _ = inspected(tiny_model, tmp_path / "plain.parquet", capsys)
    assert got == reference(tmp_path, tiny_model, capsys)
    # Each sample holds its own picture, pixel for pixel.
    samples = read_samples(str(tmp_path / "plain.parquet"))
    for sample, (name, _, _) in zip(samples, QUESTIONS, strict=True):
        (media,) = sample.media()
        assert np.array_equal(np.asarray(load_image(media)), np.asarray(Image.open(tmp_path / name).convert("RGB")))
