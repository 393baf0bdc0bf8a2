"""Small builders of test data shared by the test modules."""

import json
import random
from pathlib import Path

from qwen_ft import example_data


def picture(folder: Path, name: str, shape="circle", colour="red", corner="top left", size=None) -> str:
    """Draw an example-data picture into folder/name and return the name."""
    image = example_data.draw(shape, colour, corner, random.Random(0))
    if size:
        image = image.resize(size)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return name


def write_json(path: Path, samples) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples))
    return str(path)


def qa(image: str | None, question: str, answer: str) -> dict:
    """A one-turn sample, with an image when given."""
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def reference_labels(messages, collator) -> list[int]:
    """Labels built another way than assistant_labels: render the conversation up to each assistant
    turn and measure.

    The trained span of assistant turn k starts where the prompt for it (messages[:k] plus the
    generation prompt) ends, and ends with the <|im_end|> that closes messages[:k+1].
    """

    def length(conversation, generation_prompt=False) -> int:
        return collator.process([conversation], generation_prompt)["input_ids"].shape[1]

    full = collator.process([messages])["input_ids"][0].tolist()
    labels = [-100] * len(full)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = length(messages[:k], generation_prompt=True)
            end = length(messages[: k + 1]) - 1  # the template's newline after <|im_end|> is not trained
            labels[start:end] = full[start:end]
    return labels


def collate(collator, samples) -> dict:
    """The collator's batch as the loop hands it to the model: no sample failed, the list of failures removed."""
    batch = collator(samples)
    assert batch.pop("bad_samples") == []
    return batch
