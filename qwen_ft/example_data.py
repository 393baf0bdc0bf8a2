"""Generate the example dataset: pictures of coloured shapes with questions about them.

    python -m qwen_ft.example_data            # rewrites train_data/ and test_data/

Each picture holds one shape (circle, square or triangle) in one colour, in one corner. The
answers can only be read off the picture, so a model that gets them right sees the images.
Besides one-picture questions there are two-picture, multi-turn and text-only samples, and short
videos of a shape that moves or changes colour, whose answers need more than one frame.
The train and test sets come from different seeds: no test picture is in the train set.

The grounding split (train_data/grounding/, test_data/grounding/) asks where the shape is, in pictures of
varied sizes and aspect ratios with a shape at a random place and of a random size, and answers with its box,
in pixels of the picture: each model family writes it in its own convention when it trains (grounding.py).
"""

import argparse
import json
import random
import shutil
from pathlib import Path

import av
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
    fx, fy = CORNERS[corner]
    return draw_at(shape, colour, fx + rng.uniform(-4, 4) / SIZE, fy + rng.uniform(-4, 4) / SIZE, rng.uniform(20, 22))


def draw_at(shape: str, colour: str, fx: float, fy: float, r: float) -> Image.Image:
    """A white picture with one shape of radius r px centred at (fx, fy), fractions of the side."""
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    cx, cy = fx * SIZE, fy * SIZE
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


VIDEO_FPS, VIDEO_FRAMES = 8, 16  # 2-second clips: 4 frames at finetune.py's default 2 fps
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTIONS = {"move": "Which way does the shape move?", "turn": "What colour does the shape turn?"}


def write_clip(path: Path, pictures: list[Image.Image], fps: int = VIDEO_FPS) -> None:
    """An H.264 video of the pictures (MPEG-4 part 2 where this PyAV has no H.264 encoder)."""
    codec = "libx264" if "libx264" in av.codec.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for picture in pictures:
            container.mux(stream.encode(av.VideoFrame.from_image(picture)))
        container.mux(stream.encode())


class Writer:
    """Draws random pictures into OUT/images and collects the samples that use them."""

    def __init__(self, out: Path, seed: int):
        self.out, self.rng, self.samples, self.pictures = out, random.Random(seed), [], 0
        shutil.rmtree(out / "images", ignore_errors=True)
        shutil.rmtree(out / "videos", ignore_errors=True)
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

    def videos(self, n: int) -> None:
        """Clips of a shape that moves across the picture, or that changes colour halfway."""
        (self.out / "videos").mkdir(exist_ok=True)
        for i in range(n):
            shape, colour = self.rng.choice(SHAPES), self.rng.choice(list(COLOURS))
            name = f"videos/{i:03d}.mp4"
            if i % 2 == 0:
                answer = self.rng.choice(list(DIRECTIONS))
                dx, dy = DIRECTIONS[answer]
                steps = [(t / (VIDEO_FRAMES - 1) - 0.5) * 0.5 for t in range(VIDEO_FRAMES)]  # -0.25 .. 0.25
                pictures = [draw_at(shape, colour, 0.5 + dx * step, 0.5 + dy * step, 18) for step in steps]
                question = VIDEO_QUESTIONS["move"]
            else:
                answer = self.rng.choice([c for c in COLOURS if c != colour])
                pictures = [
                    draw_at(shape, colour if t < VIDEO_FRAMES // 2 else answer, 0.5, 0.5, 21)
                    for t in range(VIDEO_FRAMES)
                ]
                question = VIDEO_QUESTIONS["turn"]
            write_clip(self.out / name, pictures)
            self.add(([{"type": "video", "video": name}, {"type": "text", "text": question}], answer))

    def text_only(self, repeats: int) -> None:
        for _ in range(repeats):
            for question, answer in TEXT_ONLY:
                self.add((question, answer))

    def save(self) -> None:
        self.rng.shuffle(self.samples)
        (self.out / "data.json").write_text(json.dumps(self.samples, indent=1) + "\n")


GROUNDING_SIDES = (112, 224)  # each side of a grounding picture, in pixels: 16 to 64 image tokens
GROUNDING_RADIUS = (0.15, 0.3)  # of the picture's shorter side


def grounding(out: Path, seed: int, samples: int) -> None:
    """Pictures of a shape at a random place and size, and "Where is the red triangle?" answered with the
    shape's box (the box of the drawn shape, in pixels): out/data.json and out/images/."""
    rng = random.Random(seed)
    shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True)
    written = []
    for number in range(samples):
        width, height = (rng.randint(*GROUNDING_SIDES) for _ in range(2))
        image = Image.new("RGB", (width, height), (255, 255, 255))
        pen = ImageDraw.Draw(image)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        r = round(rng.uniform(*GROUNDING_RADIUS) * min(width, height))
        cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            pen.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            pen.rectangle(box, fill=COLOURS[colour])
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        name = f"images/{number:04d}.png"
        image.quantize(len(COLOURS) + 1).save(out / name)  # flat colours: a palette PNG, a fifth of the size
        label = f"{colour} {shape}"
        question = [{"type": "image", "image": name}, {"type": "text", "text": f"Where is the {label}?"}]
        answer = [{"type": "box", "box": box, "label": label}]
        written.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    (out / "data.json").write_text(json.dumps(written, indent=1) + "\n")


def generate(
    out: Path, seed: int, single: int, two_pictures: int, multi_turn: int, videos: int, text_repeats: int
) -> None:
    writer = Writer(out, seed)
    writer.single(single)
    writer.two_pictures(two_pictures)
    writer.multi_turn(multi_turn)
    writer.videos(videos)
    writer.text_only(text_repeats)
    writer.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", default="train_data", help="where the training set goes")
    parser.add_argument("--test-dir", default="test_data", help="where the held-out test set goes")
    args = parser.parse_args()
    generate(Path(args.train_dir), seed=1, single=800, two_pictures=400, multi_turn=80, videos=24, text_repeats=5)
    generate(Path(args.test_dir), seed=2, single=150, two_pictures=20, multi_turn=20, videos=2, text_repeats=1)
    grounding(Path(args.train_dir) / "grounding", seed=3, samples=1000)
    grounding(Path(args.test_dir) / "grounding", seed=4, samples=200)


if __name__ == "__main__":
    main()
