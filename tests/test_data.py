import base64
import functools
import http.server
import json
import re
import threading
import tracemalloc
from pathlib import Path

import pytest
from helpers import picture, qa, run_finetune, write_json

from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import TOO_DEEP, DataError, read_samples


def good(tmp_path) -> dict:
    return qa(picture(tmp_path, "ok.png"), "What colour is the shape?", "red")


BAD_SAMPLES = {
    "missing image": (qa("nowhere.png", "What colour?", "red"), "image 'nowhere.png' not found"),
    "unknown role": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        "message 1 has unknown role 'bot'",
    ),
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    "late system message": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
        "only the first message may be one",
    ),
    "content of the wrong type": (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "message 0 has no 'content' string or list",
    ),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "table"}]}, {"role": "assistant", "content": "x"}]},
        "unknown content type 'table'",
    ),
    "special token in text": (qa(None, "hi <|im_start|>assistant", "x"), "contains the special token <|im_start|>"),
    "not a messages object": ({"conversation": []}, 'no "messages", "conversations" or "question" to read'),
    # Another format's media key would otherwise be dropped, and the sample train without its image.
    "an image key beside the messages": (
        {**qa(None, "What colour?", "red"), "image": "ok.png"},
        "the sample has the key 'image', which the messages format does not read",
    ),
    "a placeholder in text": (qa(None, "<image>What colour?", "red"), "text contains the placeholder <image>"),
    "a video placeholder in text": (qa(None, "What moves in <video>?", "a dot"), "the placeholder <video>"),
    "an unread message key": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "loss": False}]},
        "message 1 has the key 'loss', which is not read",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_SAMPLES))
def test_bad_sample_stops_before_training_naming_file_sample_and_problem(tmp_path, tiny_model, problem):
    bad, message = BAD_SAMPLES[problem]
    data = write_json(tmp_path / "data.json", [good(tmp_path), bad])
    error = run_finetune(tiny_model, data, tmp_path / "out")
    assert error.startswith("error: ") and len(error.splitlines()) == 1
    assert f"{data}: sample 1: " in error and message in error


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])  # one object per line, whatever the suffix
def test_jsonl_errors_name_the_line(tmp_path, tiny_model, name):
    data = tmp_path / name
    rows = [json.dumps(good(tmp_path)), "", json.dumps(BAD_SAMPLES["unknown role"][0])]
    data.write_text("\n".join(rows) + "\n")
    error = run_finetune(tiny_model, str(data), tmp_path / "out")
    assert f"{data}: sample 1 (line 3): message 1 has unknown role 'bot'" in error


def test_malformed_json(tmp_path, tiny_model):
    data = tmp_path / "data.json"
    data.write_text('[{"messages": []},\n ]')
    assert f"{data}: malformed JSON" in run_finetune(tiny_model, str(data), tmp_path / "out")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(good(tmp_path)) + '\n{"messages": [\n')
    assert f"{data}: sample 1 (line 2): malformed JSON" in run_finetune(tiny_model, str(data), tmp_path / "out")


@pytest.mark.parametrize(
    "check, content, message",
    [
        ("header", b"not an image at all", "is not an image PIL can read"),
        ("header", b"\xff\xd8\xff\xe0\x00\x10JFIF", "has a broken header"),  # a JPEG that ends in its header
        ("full", None, "cannot be decoded"),  # a truncated JPEG: its header is whole, its pixels are not
    ],
)
def test_unreadable_image(tmp_path, tiny_model, check, content, message):
    picture(tmp_path, "broken.jpg", size=(300, 300))
    path = tmp_path / "broken.jpg"
    path.write_bytes(content if content is not None else path.read_bytes()[:1000])
    data = write_json(tmp_path / "data.json", [good(tmp_path), qa("broken.jpg", "What colour?", "red")])
    error = run_finetune(tiny_model, data, tmp_path / "out", "--check-media", check)
    assert f"{data}: sample 1: image '{path}' {message}" in error


def test_every_bad_sample_is_listed(tmp_path, tiny_model):
    bad = BAD_SAMPLES["missing image"][0]
    data = write_json(tmp_path / "data.json", [bad, good(tmp_path), bad])
    error = run_finetune(tiny_model, data, tmp_path / "out")
    assert [re.search(r": (sample \d+): ", line)[1] for line in error.splitlines()] == ["sample 0", "sample 2"]


def test_missing_data_file(tmp_path, tiny_model):
    assert "data file not found" in run_finetune(tiny_model, str(tmp_path / "nope.json"), tmp_path / "out")


def test_relative_paths_are_found_beside_the_data_or_under_the_media_root(tmp_path, monkeypatch):
    # The layout of train_data/data.json naming "train_data/1.jpeg", run from the repository root.
    root = tmp_path / "repo"
    picture(root / "train_data", "1.jpeg")
    picture(root / "train_data" / "images", "2.png")
    data = write_json(
        root / "train_data" / "data.json", [qa("train_data/1.jpeg", "q", "a"), qa("images/2.png", "q", "a")]
    )
    monkeypatch.chdir(root)
    samples = read_samples(Path(data).relative_to(root))
    assert [s.media() for s in samples] == [
        [str(root / "train_data" / "1.jpeg")],
        [str(root / "train_data" / "images" / "2.png")],
    ]
    monkeypatch.chdir(tmp_path)  # the repository-root path now needs --media-root
    with pytest.raises(DataError, match="sample 0: message 0: image 'train_data/1.jpeg' not found"):
        read_samples(data)
    assert read_samples(data, media_root=root)[0].media() == [str(root / "train_data" / "1.jpeg")]


def test_absolute_file_data_and_http_images(tmp_path):
    picture(tmp_path, "wide.png", size=(150, 60))
    path = tmp_path / "wide.png"
    encoded = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/wide.png"
        refs = [str(path), f"file://{path}", encoded, url]
        samples = read_samples(write_json(tmp_path / "d" / "data.json", [qa(ref, "q", "a") for ref in refs]))
        check_media(samples)
        missing = read_samples(write_json(tmp_path / "m.json", [qa(url.replace("wide", "gone"), "q", "a")]))
        with pytest.raises(DataError, match="sample 0: image 'http.*gone.png' cannot be fetched"):
            check_media(missing)
    finally:
        server.shutdown()
    assert [s.image_sizes for s in samples] == [[(60, 150)]] * 4


def test_an_id_names_a_sample_and_is_allowed(tmp_path):
    data = write_json(tmp_path / "data.json", [{"id": "q-17", **qa(None, "Say hi", "hi")}])
    assert read_samples(data)[0].messages[1]["content"] == [{"type": "text", "text": "hi"}]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_too_deeply_is_one_line_naming_the_file_and_line(tmp_path):
    good_line = json.dumps(qa(None, "Say hi", "hi"))
    deep = '{"messages": ' + nested(100_000) + "}"
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(good_line + "\n" + deep + "\n")
    with pytest.raises(DataError) as error:
        read_samples(jsonl)
    assert str(error.value) == f"{jsonl}: sample 1 (line 2): {TOO_DEEP}"
    whole = tmp_path / "data.json"
    whole.write_text("[" + good_line + ", " + deep + "]")
    with pytest.raises(DataError) as error:
        read_samples(whole)
    assert str(error.value) == f"{whole}: {TOO_DEEP}"


def test_a_sample_over_the_size_limit_is_refused_before_it_is_copied(tmp_path, monkeypatch):
    monkeypatch.setattr("qwen_ft.data.read.MAX_SAMPLE_CHARS", 2**20)  # 1 MiB here; 128 MiB in a run
    answer = "x" * 16 * 2**20  # a 16 MiB answer
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps(qa(None, "Say hi", "hi")) + "\n" + json.dumps(qa(None, "Say hi", answer)) + "\n")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            read_samples(jsonl)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value) == f"{jsonl}: sample 1 (line 2): longer than 1 MiB, which no sample needs: leave it out"
    assert peak < 4 * 2**20  # the line was never read whole, let alone parsed
    # A JSON list is parsed whole; its sample is refused before it is copied into the samples' buffer.
    listed = write_json(tmp_path / "data.json", [qa(None, "Say hi", "hi"), qa(None, "Say hi", answer[: 2 * 2**20])])
    with pytest.raises(DataError) as error:
        read_samples(listed)
    assert str(error.value) == (
        f"{listed}: sample 1: its texts and media references are longer than 1 MiB, which no sample needs: leave it out"
    )
