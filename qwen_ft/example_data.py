"""Generate the example dataset: pictures of coloured shapes with questions about them.

    python -m qwen_ft.example_data            # rewrites train_data/ and test_data/

Each picture holds one shape (circle, square or triangle) in one colour, in one corner. The
answers can only be read off the picture, so a model that gets them right sees the images.
Besides one-picture questions there are two-picture, multi-turn and text-only samples.
The train and test sets come from different seeds: no test picture is in the train set.
"""

import argparse
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 112  # 8x8 patches of 14 px: 16 image tokens per picture after Qwen's 2x2 merge
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 195, 30)}
SHAPES = ("circle", "square", "triangle")
# Each corner is one 56x56 quarter, 2x2 image tokens; a shape never crosses into another quarter.
CORNERS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the picture?",
    "corner": "Where is the shape?",
}
TEXT_ONLY = [
    ("Which colours can the shapes have?", "red, green, blue or yellow"),
    ("Which shapes can appear in the pictures?", "circle, square or triangle"),
    ("How many corners does a triangle have?", "three"),
    ("How many corners does a square have?", "four"),
]


def draw(shape: str, colour: str, corner: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    fx, fy = CORNERS[corner]
    cx, cy = fx * SIZE + rng.uniform(-4, 4), fy * SIZE + rng.uniform(-4, 4)
    r = rng.uniform(20, 22)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


class Writer:
    """Draws random pictures into OUT/images and collects the samples that use them."""

    def __init__(self, out: Path, seed: int):
        self.out, self.rng, self.samples, self.pictures = out, random.Random(seed), [], 0
        shutil.rmtree(out / "images", ignore_errors=True)
        (out / "images").mkdir(parents=True)

    def picture(self, **fixed) -> tuple[dict, dict]:
        """A new random picture (some attributes may be fixed); returns its facts and its image part."""
        facts = {
            "shape": fixed.get("shape", self.rng.choice(SHAPES)),
            "colour": fixed.get("colour", self.rng.choice(list(COLOURS))),
            "corner": fixed.get("corner", self.rng.choice(list(CORNERS))),
        }
        name = f"images/{self.pictures:04d}.png"
        self.pictures += 1
        draw(facts["shape"], facts["colour"], facts["corner"], self.rng).save(self.out / name)
        return facts, {"type": "image", "image": name}

    def add(self, *turns) -> None:
        """turns: (user content, assistant text) pairs."""
        messages = []
        for user, answer in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        self.samples.append({"messages": messages})

    def single(self, n: int) -> None:
        for _ in range(n):
            facts, image = self.picture()
            attribute = self.rng.choice(list(QUESTIONS))
            self.add(([image, {"type": "text", "text": QUESTIONS[attribute]}], facts[attribute]))

    def two_pictures(self, n: int) -> None:
        for _ in range(n):
            first, second = self.rng.sample(list(COLOURS), 2)
            (_, image1), (_, image2) = self.picture(colour=first), self.picture(colour=second)
            asked, answer = self.rng.choice([(first, "the first"), (second, "the second")])
            question = f"Which picture shows a {asked} shape, the first or the second?"
            self.add(([image1, image2, {"type": "text", "text": question}], answer))

    def multi_turn(self, n: int) -> None:
        for _ in range(n):
            facts, image = self.picture()
            first, second = self.rng.sample(list(QUESTIONS), 2)
            self.add(
                ([image, {"type": "text", "text": QUESTIONS[first]}], facts[first]),
                ([{"type": "text", "text": QUESTIONS[second]}], facts[second]),
            )

    def text_only(self, repeats: int) -> None:
        for _ in range(repeats):
            for question, answer in TEXT_ONLY:
                self.add((question, answer))

    def save(self) -> None:
        self.rng.shuffle(self.samples)
        (self.out / "data.json").write_text(json.dumps(self.samples, indent=1) + "\n")


def generate(out: Path, seed: int, single: int, two_pictures: int, multi_turn: int, text_repeats: int) -> None:
    writer = Writer(out, seed)
    writer.single(single)
    writer.two_pictures(two_pictures)
    writer.multi_turn(multi_turn)
    writer.text_only(text_repeats)
    writer.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", default="train_data", help="where the training set goes")
    parser.add_argument("--test-dir", default="test_data", help="where the held-out test set goes")
    args = parser.parse_args()
    generate(Path(args.train_dir), seed=1, single=800, two_pictures=400, multi_turn=80, text_repeats=5)
    generate(Path(args.test_dir), seed=2, single=150, two_pictures=20, multi_turn=20, text_repeats=1)


if __name__ == "__main__":
    main()
