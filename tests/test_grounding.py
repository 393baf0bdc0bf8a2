"""Boxes and points: each family writes them by its documented rule, in the numbers the model sees after the
resize; answers read back to the original box; bad boxes stop before training; IoU scoring."""

import json
import math

import pytest
from helpers import run_finetune, write_json
from PIL import Image
from qwen_vl_utils import smart_resize

from qwen_ft import families, generate, grounding, inspect_data
from qwen_ft.collate import Collator
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import DataError, read_samples
from qwen_ft.model import load_processor
from qwen_ft.tiny import FAMILIES

# A wide image that a small --max-pixels resizes to another aspect ratio (476x196 with 28-pixel blocks, 0.41
# rather than 0.42; 480x192 with Qwen3-VL's 32), with a box and a point in pixels of the original.
WIDTH, HEIGHT, MAX_PIXELS = 1200, 500, 100_000
BOX, POINT = [123, 45, 456, 321], [987, 432]


def grounding_sample(image="wide.png"):
    question = [{"type": "image", "image": image}, {"type": "text", "text": "Where are the cat and the dot?"}]
    answer = [{"type": "box", "box": BOX, "label": "cat"}, {"type": "point", "point": POINT, "label": "dot"}]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def expected_numbers(family: str, values: list, processor) -> list[int]:
    """The family's documented rule, from the resize qwen_vl_utils gives: thousandths of the original image
    (Qwen2-VL, Qwen3-VL: round(x / width * 1000)), or pixels of the resized image (Qwen2.5-VL: round(x * new_width
    / width)), as Qwen's process_bbox.ipynb converts a box."""
    if family != "qwen2.5-vl":
        return [round(v / (WIDTH if i % 2 == 0 else HEIGHT) * 1000) for i, v in enumerate(values)]
    image_processor = processor.image_processor
    factor, min_pixels = image_processor.patch_size * image_processor.merge_size, image_processor.size["shortest_edge"]
    new_height, new_width = smart_resize(HEIGHT, WIDTH, factor, min_pixels=min_pixels, max_pixels=MAX_PIXELS)
    return [round(v * (new_width / WIDTH if i % 2 == 0 else new_height / HEIGHT)) for i, v in enumerate(values)]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_writes_boxes_and_points_by_its_documented_rule_and_reads_them_back(tmp_path, family_model, family):
    processor = load_processor(family_model(family), max_pixels=MAX_PIXELS)
    collator = Collator(processor, max_length=4096)
    Image.new("RGB", (WIDTH, HEIGHT), "white").save(tmp_path / "wide.png")
    samples = read_samples(write_json(tmp_path / "data.json", [grounding_sample()]))
    check_media(samples, factor=collator.video_factor)
    box, point = expected_numbers(family, BOX, processor), expected_numbers(family, POINT, processor)
    if family == "qwen2-vl":
        cat = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>({},{}),({},{})<|box_end|>".format(*box)
        expected = cat + "<|object_ref_start|>dot<|object_ref_end|><|box_start|>({},{})<|box_end|>".format(*point)
    else:
        expected = (
            f'```json\n[\n\t{{"bbox_2d": {json.dumps(box)}, "label": "cat"}},\n'
            f'\t{{"point_2d": {json.dumps(point)}, "label": "dot"}}\n]\n```'
        )
    sample = samples[0]
    rendered = collator.render(sample.messages, sample.image_sizes)[1]["content"]
    assert "".join(part["text"] for part in rendered) == expected
    # The batch holds it: the numbers are the ones the model trains on, and in the frame it sees.
    batch = collator([sample])
    assert expected in processor.tokenizer.decode(batch["input_ids"][0])
    patch = processor.image_processor.patch_size
    assert [int(n) * patch for n in batch["image_grid_thw"][0][1:]] == list(collator.resized(HEIGHT, WIDTH))
    new_height, new_width = collator.resized(HEIGHT, WIDTH)
    assert new_width / new_height != WIDTH / HEIGHT

    # Read back, as written and as a generated answer decodes (Qwen2-VL's grounding tokens are special tokens,
    # which decoding drops): the original box and point, within one pixel of the resized image.
    one_pixel = (WIDTH / new_width, HEIGHT / new_height)
    for answer in (expected, grounding.as_decoded(expected)):
        found = grounding.parse(answer, collator.family)
        assert [f.kind for f in found] == ["box", "point"]
        assert [f.label for f in found] == (
            ["cat", "dot"] if answer == expected or family != "qwen2-vl" else [None] * 2
        )
        for f, original in zip(found, (BOX, POINT)):
            read = grounding.original(f.values, (HEIGHT, WIDTH), collator.family, collator.resized)
            assert all(abs(r - o) <= one_pixel[i % 2] for i, (r, o) in enumerate(zip(read, original))), (read, original)


def test_families_sharing_a_processor_write_boxes_alike():
    """A processor tells the collator its family's convention: families with one processor class must share it."""
    for family in families.FAMILIES:
        first = next(f for f in families.FAMILIES if f.processor == family.processor)
        assert (family.box_form, family.box_scale) == (first.box_form, first.box_scale)


def test_boxes_inside_a_line_of_text_and_ms_swift_objects(tmp_path, family_processor):
    """A box in a question is written inline; ms-swift's <ref-object> and <bbox> fill in order, norm1 boxes
    are fractions of the image."""
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    swift = {
        "messages": [
            {"role": "user", "content": "<image>What is at <bbox>? Find <ref-object>."},
            {"role": "assistant", "content": "<bbox>"},
        ],
        "images": ["a.png"],
        "objects": {"ref": ["the dog"], "bbox": [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5]], "bbox_type": "norm1"},
    }
    samples = read_samples(write_json(tmp_path / "data.json", [swift]))
    check_media(samples)
    sample = samples[0]
    assert [p["type"] for p in sample.messages[0]["content"]] == ["image", "text", "box", "text", "ref", "text"]
    assert sample.messages[1]["content"] == [{"type": "point", "point": [0.5, 0.5], "image": 0, "relative": True}]
    written = {}
    for family in ("qwen2-vl", "qwen3-vl"):
        collator = Collator(family_processor(family), max_length=4096)
        rendered = collator.render(sample.messages, sample.image_sizes)
        written[family] = ["".join(p.get("text", "") for p in m["content"]) for m in rendered]
    assert written["qwen2-vl"] == [
        "What is at <|box_start|>(100,200),(500,600)<|box_end|>? Find <|object_ref_start|>the dog<|object_ref_end|>.",
        "<|box_start|>(500,500)<|box_end|>",
    ]
    assert written["qwen3-vl"] == [
        "What is at [100, 200, 500, 600]? Find the dog.",
        '```json\n[\n\t{"point_2d": [500, 500]}\n]\n```',
    ]


BAD = {
    "x2 <= x1": ({"type": "box", "box": [50, 10, 40, 20]}, "box part's 'box' [50, 10, 40, 20] has x2 <= x1"),
    "three numbers": ({"type": "box", "box": [1, 2, 3]}, "box part's 'box' is [1, 2, 3], expected [x1, y1, x2, y2]"),
    "no such image": ({"type": "box", "box": [1, 2, 3, 4], "image": 1}, "a box in image 1, but the sample shows 1"),
    "unknown key": ({"type": "point", "point": [1, 2], "lable": "x"}, "a point part has the key 'lable'"),
    "box outside": ({"type": "box", "box": [10, 10, 120, 50]}, "box [10, 10, 120, 50] is outside image 0, of 112x112"),
    "point outside": ({"type": "point", "point": [5, 113]}, "point [5, 113] is outside image 0, of 112x112 px"),
}


def test_malformed_boxes_stop_with_a_line_naming_the_sample(tmp_path):
    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")
    good = grounding_sample("a.png")
    good["messages"][1]["content"] = [{"type": "box", "box": [0, 0, 112, 112]}]
    bad = []
    for part, _ in BAD.values():
        sample = json.loads(json.dumps(good))
        sample["messages"][1]["content"] = [part]
        bad.append(sample)
    data = write_json(tmp_path / "data.json", [good, *bad])
    # What reading finds (the form of each part), then what the image sizes show (bounds).
    with pytest.raises(DataError) as reading:
        read_samples(data)
    read_problems = str(reading.value).splitlines()
    samples = read_samples(write_json(tmp_path / "bounds.json", [good, *bad[4:]]))
    with pytest.raises(DataError) as bounds:
        check_media(samples)
    bounds_problems = str(bounds.value).splitlines()
    where = [("data.json", k) for k in range(1, 5)] + [("bounds.json", k) for k in (1, 2)]  # good is sample 0
    assert len(read_problems + bounds_problems) == len(BAD)
    for line, (file, number), (_, message) in zip(read_problems + bounds_problems, where, BAD.values()):
        assert line.startswith(f"{tmp_path / file}: sample {number}: message 1: "), line
        assert message in line, line


def test_a_bad_box_stops_finetune_before_the_model_loads(tmp_path, tiny_model):
    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")
    sample = grounding_sample("a.png")
    sample["messages"][1]["content"] = [{"type": "box", "box": [0, 0, 200, 50], "label": "cat"}]
    error = run_finetune(tiny_model, write_json(tmp_path / "data.json", [sample]), tmp_path / "out")
    assert error == (
        f"error: {tmp_path / 'data.json'}: sample 0: message 1: box [0, 0, 200, 50] is outside image 0, of 112x112 px"
    )


def test_iou_scores_against_hand_computed_values():
    assert grounding.iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert grounding.iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert grounding.iou([0, 0, 10, 10], [10, 10, 0, 0]) == 1.0  # corners in either order
    qwen3 = next(f for f in families.FAMILIES if f.name == "qwen3-vl")
    targets = (
        grounding.Target("box", (0.0, 0.0, 100.0, 50.0), 0),  # in a 200x100 image: thousandths are x*5, y*10
        grounding.Target("box", (100.0, 50.0, 200.0, 100.0), 0),
        grounding.Target("point", (150.0, 20.0), 0, bounds=(140.0, 10.0, 160.0, 30.0)),
        grounding.Target("point", (20.0, 80.0), 0),
    )
    reference = grounding.Reference(targets, ((100, 200),), qwen3, resize=None)
    # The first box exactly; a box over the first's right 40% (IoU 0.4 with it, 0 with the second); a point
    # 3 px right of and 4 px below the third target, inside its bounds. The fourth target's nearest guess is
    # the first box's centre, (50, 25).
    answer = (
        '```json\n[\n\t{"bbox_2d": [0, 0, 500, 500], "label": "a"},\n\t{"bbox_2d": [300, 0, 500, 500]},\n'
        '\t{"point_2d": [765, 240]}\n]\n```'
    )
    scores = grounding.scores(answer, reference)
    assert scores["iou"] == pytest.approx((1 + 0) / 2)
    assert scores["iou50"] == 0.5
    assert scores["point_in_box"] == 1.0
    assert scores["point_distance"] == pytest.approx(math.hypot(50 - 20, 80 - 25))
    # One predicted box can't match two references at IoU >= 0.5.
    twice = grounding.Reference(targets[:1] * 2, ((100, 200),), qwen3, resize=None)
    assert grounding.scores(answer, twice)["iou50"] == 0.5
    # Nothing parseable: IoU 0 and the image's diagonal.
    assert grounding.scores("I don't know", reference) == {
        "iou": 0.0, "iou50": 0.0, "point_in_box": 0.0, "point_distance": pytest.approx(math.hypot(200, 100))
    }  # fmt: skip


def test_evaluation_scores_boxes_and_generate_prints_them(tmp_path, family_processor, monkeypatch, capsys):
    """answer_samples reads each answer's boxes back to pixels; the reference is the answer as written, decoded."""
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "wide.png")
    collator = Collator(family_processor("qwen2-vl"), max_length=4096)
    samples = read_samples(write_json(tmp_path / "data.json", [grounding_sample()] * 2))
    check_media(samples)
    answer = collator.render(samples[0].messages, [(HEIGHT, WIDTH)])[1]
    exact = grounding.as_decoded("".join(part["text"] for part in answer["content"]))
    assert exact == "cat(102,90),(380,642)dot(822,864)"  # BOX and POINT in thousandths, without the tokens
    # A third of the box's width (IoU 0.35), and no point: the box's centre, (181, 183) px, is the nearest guess.
    off = "cat(102,90),(200,642)"
    monkeypatch.setattr(generate, "generate_answers", lambda model, collator, questions, tokens: [exact, off])
    results, means = generate.answer_samples(None, collator, samples, batch_size=2, max_new_tokens=8)
    assert [r["reference"] for r in results] == [exact, exact]
    assert means["exact_match"] == 0.5 and means["iou50"] == 0.5
    assert results[0]["iou"] == pytest.approx(1, abs=0.01)
    assert results[1]["iou"] == pytest.approx((240 - 123) / (456 - 122.4))
    assert results[0]["point_distance"] == pytest.approx(0.6, abs=0.01)
    assert results[1]["point_distance"] == pytest.approx(math.hypot(987 - 181.2, 432 - 183))
    assert generate.summary("iou", means["iou"], 2) == f"iou: {means['iou']:.3f} (mean over 2 samples with boxes)"


def test_inspect_data_shows_the_rendered_boxes(tmp_path, family_model, capsys):
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "wide.png")
    data = write_json(tmp_path / "data.json", [grounding_sample()])
    inspect_data.main(["--model", family_model("qwen2.5-vl"), "--data", data, "--max-pixels", str(MAX_PIXELS)])
    box = expected_numbers("qwen2.5-vl", BOX, load_processor(family_model("qwen2.5-vl")))
    assert f'{{"bbox_2d": {json.dumps(box)}, "label": "cat"}}' in capsys.readouterr().out
