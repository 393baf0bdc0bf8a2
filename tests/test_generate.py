import json

from helpers import picture, qa, write_json

from qwen_ft import generate


def test_answers_every_sample_and_scores_exact_match(tmp_path, tiny_model, capsys):
    image = picture(tmp_path, "a.png")
    samples = [
        qa(image, "What colour is the shape?", "red"),
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Shape?"},
                {"role": "assistant", "content": "circle"},
            ]
        },
        qa(None, "Say hi", "hi"),
    ]
    data = write_json(tmp_path / "data.json", samples)
    out = tmp_path / "predictions.jsonl"
    generate.main(
        ["--model", tiny_model, "--data", data, "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2"]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["reference"] for r in rows] == ["red", "circle", "hi"]
    assert all(isinstance(r["prediction"], str) for r in rows)
    correct = sum(r["prediction"] == r["reference"] for r in rows)
    assert f"exact match: {correct}/3" in capsys.readouterr().out


def test_batched_answers_equal_one_at_a_time(tmp_path, tiny_model):
    picture(tmp_path, "a.png")
    picture(tmp_path, "b.png", "square", "blue", "bottom right", size=(140, 84))
    answerer = generate.Answerer(tiny_model, generate.torch.device("cpu"))
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(tmp_path / "a.png")},
                    {"type": "text", "text": "What colour is the shape?"},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(tmp_path / "b.png")}, {"type": "text", "text": "Where?"}],
            }
        ],
        [{"role": "user", "content": [{"type": "text", "text": "How many corners does a triangle have?"}]}],
    ]
    together = answerer.answer(conversations, max_new_tokens=6)
    alone = [answerer.answer([c], max_new_tokens=6)[0] for c in conversations]
    assert together == alone


def test_one_question_about_an_image(tmp_path, tiny_model, capsys):
    picture(tmp_path, "a.png")
    generate.main(
        ["--model", tiny_model, "--image", str(tmp_path / "a.png"), "--prompt", "Colour?", "--max-new-tokens", "3"]
    )
    assert len(capsys.readouterr().out.strip().splitlines()) <= 3
