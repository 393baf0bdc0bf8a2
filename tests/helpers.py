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
