"""Other formats' data files give the samples the same data gives in qwen-ft's messages form."""

import pytest
from helpers import clip, inspected, picture, run_finetune, write_json

from qwen_ft.data.read import DataError, read_samples

# Conversations written once, neutrally: turns of (role, items), an item a text or ("image" | "video", file).
CONVERSATIONS = [
    [("user", [("image", "a.png"), "\nWhat colour is the shape?"]), ("assistant", ["red"])],
    [
        ("system", ["Answer in a word."]),
        ("user", ["Which shows a square, ", ("image", "a.png"), " or ", ("image", "b.png"), "?"]),
        ("assistant", ["the second"]),
        ("user", ["And its colour?"]),
        ("assistant", ["blue"]),
    ],
    [("user", ["How many corners does a triangle have?"]), ("assistant", ["three"])],
]
VIDEO = [("user", [("video", "clip.mp4"), "\nWhich way does it move?"]), ("assistant", ["right"])]
SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}


def media_files(folder):
    picture(folder, "a.png")
    picture(folder, "b.png", shape="square", colour="blue", corner="bottom right", size=(150, 90))
    clip(folder)


def as_messages(turns) -> dict:
    """The reference: qwen-ft's own format."""

    def part(item):
        return {"type": "text", "text": item} if isinstance(item, str) else {"type": item[0], item[0]: item[1]}

    return {"messages": [{"role": role, "content": [part(item) for item in items]} for role, items in turns]}


def media_of(turns, kind) -> list[str]:
    return [item[1] for _, items in turns for item in items if not isinstance(item, str) and item[0] == kind]


def text_of(items, media_text) -> str:
    return "".join(item if isinstance(item, str) else media_text(*item) for item in items)


def as_llava(turns) -> dict:
    conversation = [{"from": SPEAKERS[r], "value": text_of(items, lambda k, f: f"<{k}>")} for r, items in turns]
    sample = {"id": "llava-sample", "conversations": conversation}
    for kind in ("image", "video"):
        files = media_of(turns, kind)
        if files:
            sample[kind] = files[0] if len(files) == 1 else files
    return sample


def as_sharegpt(turns) -> dict:
    """LLaMA-Factory's sharegpt style: the system prompt as a key of its own."""
    conversation = [
        {"from": SPEAKERS[r], "value": text_of(items, lambda k, f: f"<{k}>")} for r, items in turns if r != "system"
    ]
    system = [text_of(items, None) for r, items in turns if r == "system"]
    sample = {"conversations": conversation, "images": media_of(turns, "image"), "videos": media_of(turns, "video")}
    return sample | ({"system": system[0]} if system else {})


def as_openai(turns) -> dict:
    """LLaMA-Factory's openai style."""
    messages = [{"role": r, "content": text_of(items, lambda k, f: f"<{k}>")} for r, items in turns]
    return {"messages": messages, "images": media_of(turns, "image"), "videos": media_of(turns, "video")}


def as_trl(turns) -> dict:
    def part(item):
        return {"type": "text", "text": item} if isinstance(item, str) else {"type": item[0]}

    messages = [{"role": role, "content": [part(item) for item in items]} for role, items in turns]
    return {"messages": messages, "images": media_of(turns, "image")}


def as_qwen_vl(turns) -> dict:
    conversation = [{"from": r, "value": text_of(items, lambda k, f: f"<img>{f}</img>")} for r, items in turns]
    return {"id": "identity_0", "conversations": conversation}


WRITERS = {
    "llava": (as_llava, "llava", True),  # (writer, format detected, with the video sample)
    "sharegpt": (as_sharegpt, "sharegpt", True),
    "openai": (as_openai, "sharegpt", True),
    "trl": (as_trl, "trl", False),
    "qwen-vl": (as_qwen_vl, "qwen-vl", False),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_format_gives_the_samples_of_the_messages_form(tmp_path, tiny_model, capsys, name):
    writer, detected, with_video = WRITERS[name]
    media_files(tmp_path)
    turns = CONVERSATIONS + ([VIDEO] if with_video else [])
    reference = write_json(tmp_path / "messages.json", [as_messages(t) for t in turns])
    data = write_json(tmp_path / f"{name}.json", [writer(t) for t in turns])
    expected, _ = inspected(tiny_model, reference, capsys)
    got, said = inspected(tiny_model, data, capsys)
    assert got == expected
    assert f"{data}: {len(turns)} samples, {detected} format" in said


def test_question_answer_columns(tmp_path, tiny_model, capsys):
    media_files(tmp_path)
    rows = [
        {"query": "What colour is the shape?", "label": ["red"], "picture": "a.png", "source": "synthetic"},
        {"query": "Which shape is it?", "label": ["square"], "picture": "b.png", "source": "synthetic"},
    ]
    reference = [
        as_messages([("user", [("image", row["picture"]), row["query"]]), ("assistant", row["label"])]) for row in rows
    ]
    expected, _ = inspected(tiny_model, write_json(tmp_path / "messages.json", reference), capsys)
    data = write_json(tmp_path / "qa.json", rows)
    got, said = inspected(tiny_model, data, capsys, "--columns", "question=query,answer=label,image=picture")
    assert got == expected
    assert f"{data}: 2 samples, qa format; not read: source" in said


def test_a_literal_tag_needs_the_format_named(tmp_path, tiny_model, capsys):
    """A LLaVA conversation about HTML has an <img> tag in its text: read as Qwen-VL's image, unless told."""
    media_files(tmp_path)
    html = {
        "conversations": [
            {"from": "human", "value": "What does <img>x.png</img> do?"},
            {"from": "gpt", "value": "Shows x."},
        ]
    }
    data = write_json(tmp_path / "llava.json", [as_llava(CONVERSATIONS[0]), html])
    error = run_finetune(tiny_model, data, tmp_path / "out")
    assert f"{data}: sample 1: reads as qwen-vl, the samples before it as llava" in error
    capsys.readouterr()
    rows, said = inspected(tiny_model, data, capsys, "--data-format", "llava")
    assert len(rows) == 2 and "llava format" in said


def llava(value, image="a.png", answer="red"):
    return {"image": image, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}


BAD_SAMPLES = {
    "too many placeholders": (
        llava("<image><image>Colour?"),
        "2 <image> placeholders in the text but 1 image in 'image'",
    ),
    "too few placeholders": (
        llava("<image>Colour?", ["a.png", "b.png"]),
        "1 <image> placeholder in the text but 2 images",
    ),
    "an unknown speaker": (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "{}"}]},
        "message 1 has unknown 'from' 'observation'",
    ),
    "an image in the answer": (llava("Colour?", answer="<image>"), "message 1 (assistant) has media"),
    "a Qwen-VL image in the answer": (
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "<img>a.png</img>"}]},
        "message 1 (assistant) has media",
        as_qwen_vl(CONVERSATIONS[0]),
    ),
    "more image parts than images": (
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], "images": ["a.png"]},
        "2 image parts in the messages but 1 image in 'images'",
        as_trl(CONVERSATIONS[0]),
    ),
    "a media list of the wrong format": (
        {"conversations": [{"from": "human", "value": "<image>hi"}], "image": "a.png", "images": ["a.png"]},
        "the sample has the key 'images', which the llava format does not read",
    ),
    "several answers": (
        {"question": "Colour?", "answer": ["red", "blue"]},
        "needs a 'question' string and an",
        {"question": "Colour?", "answer": "red", "image": "a.png"},
    ),
    "another format than the file's": (
        {
            "conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "x"}],
            "images": ["a.png"],
        },
        "reads as sharegpt, the samples before it as llava",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_SAMPLES))
def test_bad_samples_of_each_format_stop_before_training(tmp_path, tiny_model, problem):
    media_files(tmp_path)
    bad, message, *good = BAD_SAMPLES[problem]  # good: a sample of the bad one's format, where not LLaVA's
    good = good[0] if good else llava("<image>\nColour?")
    data = write_json(tmp_path / "data.json", [good, bad])
    error = run_finetune(tiny_model, data, tmp_path / "out")
    assert error.startswith("error: ") and len(error.splitlines()) == 1
    assert f"{data}: sample 1: " in error and message in error


def test_audio_of_other_tools_is_an_error_not_metadata_or_text(tmp_path, tiny_model):
    """LLaMA-Factory's mllm_audio_demo.json trained (exit 0) on answers about sounds the model never heard: its
    "audios" were read as metadata and its <audio> as text. Every sample of it is now named."""
    demo = [
        {"messages": [{"role": "user", "content": f"<audio>{q}"}, {"role": "assistant", "content": a}], "audios": [f]}
        for q, a, f in [
            ("What's that sound?", "Glass shattering.", "1.mp3"),
            ("What can you hear?", "A cough.", "2.wav"),
        ]
    ]
    data = write_json(tmp_path / "mllm_audio_demo.json", demo)
    error = run_finetune(tiny_model, data, tmp_path / "out")
    no_audio = "Qwen vision-language models take no audio: leave audio samples out of the data"
    assert error.splitlines() == [f"error: {data}: sample 0: the sample has audio ('audios'): {no_audio}"] + [
        f"{data}: sample 1: the sample has audio ('audios'): {no_audio}"
    ]
    user = {"role": "user", "content": "What is it?"}
    answer = {"role": "assistant", "content": "A bird."}
    others = {
        "an <audio> placeholder alone": (
            {"messages": [{"role": "user", "content": "<audio>What is it?"}, answer]},
            f"message 0: text contains the placeholder <audio>, which stands for audio: {no_audio}",
        ),
        "a sharegpt conversation": (
            {
                "conversations": [{"from": "human", "value": "<audio>hi"}, {"from": "gpt", "value": "x"}],
                "audios": ["a.wav"],
            },
            f"the sample has audio ('audios'): {no_audio}",
        ),
        "a question about a sound": (
            {"question": "What is it?", "answer": "A bird.", "audio": "a.wav"},
            f"the sample has audio ('audio'): {no_audio}",
        ),
        "an audio part": (
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, "What?"]}, answer]},
            f"message 0: an audio part: {no_audio}",
        ),
        "an OpenAI audio part": (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, answer]},
            f"message 0: an audio part: {no_audio}",
        ),
    }
    for name, (sample, message) in others.items():
        with pytest.raises(DataError) as error:
            read_samples(write_json(tmp_path / "other.json", [sample]))
        assert str(error.value) == f"{tmp_path / 'other.json'}: sample 0: {message}", name
    # An empty list (a table's empty cell) holds no audio.
    assert len(read_samples(write_json(tmp_path / "none.json", [{"messages": [user, answer], "audios": []}]))) == 1
