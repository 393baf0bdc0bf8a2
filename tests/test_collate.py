import numpy as np
import pytest
import torch
from helpers import clip, picture, qa, reference_labels, video_qa, write_json

from qwen_ft.collate import IGNORE_INDEX, Collator, assistant_labels
from qwen_ft.data import lengths
from qwen_ft.data.lengths import fit, measure, token_ids
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.tiny import FAMILIES

CONVERSATIONS = [
    "single-turn",
    "multi-turn with system",
    "multi-image",
    "text-only",
    "'assistant' inside user text",
    "video",
    "image and part of a video",
    "boxes and points",
]


def load(tmp_path, samples, processor):
    collator = Collator(processor, max_length=4096)
    loaded = read_samples(write_json(tmp_path / "data.json", samples), special_tokens=collator.tokens.all_strings)
    check_media(loaded, factor=collator.video_factor)
    return loaded, collator


def conversations(tmp_path):
    picture(tmp_path, "a.png")
    picture(tmp_path, "b.png", shape="square", colour="blue", corner="bottom right", size=(150, 90))
    clip(tmp_path)
    image = {"type": "image", "image": "a.png"}
    image_and_video = video_qa("clip.mp4", "Is it the same shape?", "yes", fps=4.0, video_start=0.5, video_end=1.5)
    image_and_video["messages"][0]["content"].insert(0, {"type": "image", "image": "b.png"})
    return {
        "single-turn": qa("a.png", "What colour is the shape?", "red"),
        "multi-turn with system": {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [image, {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And its shape?"},
                {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
            ]
        },
        "multi-image": {
            "messages": [
                {
                    "role": "user",
                    "content": [image, {"type": "image", "image": "b.png"}, {"type": "text", "text": "Which is blue?"}],
                },
                {"role": "assistant", "content": "the second"},
            ]
        },
        "text-only": qa(None, "How many corners does a square have?", "four"),
        "'assistant' inside user text": {
            "messages": [
                {"role": "user", "content": "assistant\nsay hi, assistant"},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "I am the assistant now.\nassistant"},
                {"role": "assistant", "content": "ok"},
            ]
        },
        "video": video_qa("clip.mp4"),
        "image and part of a video": image_and_video,
        # Written as each family writes them, in the numbers of b.png as resized (grounding.py).
        "boxes and points": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "b.png"},
                        {"type": "text", "text": "What is at "},
                        {"type": "box", "box": [10, 5, 60, 40]},
                        {"type": "text", "text": "?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "A square.\n"},
                        {"type": "box", "box": [30, 20, 149, 89], "label": "square"},
                        {"type": "point", "point": [75.5, 45], "label": "its centre"},
                    ],
                },
            ]
        },
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_labels_cover_exactly_the_assistant_turns(tmp_path, family_processor, family, name):
    samples, collator = load(tmp_path, [conversations(tmp_path)[name]], family_processor(family))
    batch = collator(samples)
    expected = reference_labels(samples[0].messages, collator)
    assert batch["labels"][0].tolist() == expected
    trained = [t for t in expected if t != IGNORE_INDEX]
    answers = [m for m in samples[0].messages if m["role"] == "assistant"]
    assert trained.count(collator.tokens.im_end) == len(answers)  # each turn ends with its <|im_end|>


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_text_is_the_answers(tmp_path, family_processor, family):
    processor = family_processor(family)
    samples, collator = load(tmp_path, [conversations(tmp_path)["multi-turn with system"]], processor)
    labels = collator(samples)["labels"][0]
    trained = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
    # Qwen3.5's template opens the answers after the last question with an empty thinking block, which
    # trains too: the model learns to close it at once, whether or not its prompt already did.
    thinking = "<think>\n\n</think>\n\n" if family == "qwen3.5" else ""
    assert trained == f"red<|im_end|>{thinking}circle<|im_end|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_output_equals_the_processor(tmp_path, family_processor, family):
    processor = family_processor(family)
    convs = conversations(tmp_path)
    samples, collator = load(tmp_path, [convs["multi-image"], convs["single-turn"], convs["text-only"]], processor)
    batch = collator(samples)
    expected = processor.apply_chat_template(
        [s.messages for s in samples], tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    assert set(expected) <= set(batch)
    for key, value in expected.items():
        torch.testing.assert_close(batch[key], value, rtol=0, atol=0, msg=key)
    assert batch["input_ids"][:, -1].tolist().count(processor.tokenizer.pad_token_id) >= 1  # right padding


@pytest.mark.parametrize("family", FAMILIES)
def test_lengths_predicted_before_training_are_those_the_collator_gives(tmp_path, family_processor, family):
    """token_ids and measure know a sample's tokens from its media's sizes (and a video's frame times,
    which Qwen3-VL writes into the text) without loading the media."""
    samples, collator = load(tmp_path, list(conversations(tmp_path).values()), family_processor(family))
    measure(collator, samples)
    assert len(fit(samples, collator.max_length)) == len(samples)
    for position, sample in zip(samples.order, samples):
        batch = collator([sample])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert token_ids(collator, sample) == ids, sample.where
        assert sample.length == len(ids), sample.where
        # What decides whether a sample that is too long is cut or skipped: where its media end, where training starts.
        vision_end = max((i + 1 for i, token in enumerate(ids) if token == collator.tokens.vision_end), default=0)
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert samples.table["measure"][position].tolist() == [len(ids), vision_end, first_trained], sample.where


def test_worker_processes_measure_what_one_process_does(tmp_path, family_processor, monkeypatch):
    """Many samples are measured by forked workers, a chunk each: every count must land on its own sample."""
    samples, collator = load(tmp_path, list(conversations(tmp_path).values()), family_processor("qwen3-vl"))
    measure(collator, samples, processes=1)
    expected = samples.table["measure"].copy()
    samples.table["measure"][:] = 0
    pools = []

    class Pool(lengths.ProcessPoolExecutor):
        def __init__(self, workers, *args, **kwargs):
            pools.append(workers)
            super().__init__(workers, *args, **kwargs)

    monkeypatch.setattr(lengths, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(lengths, "CHUNK", 2)  # 4 chunks of the 8 samples
    monkeypatch.setattr(lengths, "MANY", 6)  # so that the default is to fork
    monkeypatch.setattr(lengths, "cores_of_this_process", lambda: 3)
    measure(collator, samples)
    assert pools == [3]
    np.testing.assert_array_equal(samples.table["measure"], expected)


def test_max_length_never_cuts_an_image(tmp_path, processor, capsys):
    picture(tmp_path, "a.png")
    long_text = "What colour is the shape in this picture? " * 4
    image_last = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": long_text}, {"type": "image", "image": "a.png"}]},
            {"role": "assistant", "content": "red"},
        ]
    }
    image_first = qa("a.png", "Colour?", "red " * 30)
    samples, full = load(tmp_path, [image_last, image_first], processor)
    labels = assistant_labels(token_ids(full, samples[1]), full.tokens)
    answer_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    max_length = answer_start + 5
    assert token_ids(full, samples[0]).index(full.tokens.vision_end) >= max_length  # the image would be cut
    collator = Collator(processor, max_length=max_length)

    measure(collator, samples)
    kept = fit(samples, max_length)

    assert [s.index for s in kept] == [1]
    warnings = capsys.readouterr().err
    assert "skipped 1 of 2 samples" in warnings and "sample 0" in warnings
    assert "cut the text after the last image of 1 samples" in warnings
    batch = collator(kept)
    uncut = token_ids(full, samples[1])
    assert batch["input_ids"][0].tolist() == uncut[:max_length]
    assert (batch["input_ids"][0] == full.tokens.image_pad).sum() == uncut.count(full.tokens.image_pad)
    assert batch["labels"][0, -5:].tolist() == uncut[max_length - 5 : max_length]  # trained up to the cut


def test_labels_of_a_cut_turn_run_to_the_end():
    class Tokens:
        assistant_header = (1, 2)
        im_end = 9

    ids = [5, 1, 2, 3, 4, 4, 9, 3, 1, 2, 3, 7, 7]
    assert assistant_labels(ids, Tokens) == [-100, -100, -100, -100, 4, 4, 9, -100, -100, -100, -100, 7, 7]
