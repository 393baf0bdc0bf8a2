import json
import shutil

import pytest
from helpers import greedy_answer, picture, qa, transformers_model, write_json
from transformers import AutoProcessor

import finetune
from qwen_ft import generate
from qwen_ft.config import parse_config
from qwen_ft.dist import single_device
from qwen_ft.tiny import FAMILIES


def user(image, text: str) -> dict:
    """A user message as transformers' chat template takes it: an image (path) when given, then the text."""
    media = [{"type": "image", "image": str(image)}] if image else []
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_answers_every_sample_and_scores_exact_match(tmp_path, family_model, family, capsys):
    tiny_model = family_model(family)
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
    # Each sample cut after its last user message, answered one at a time by transformers' own generate.
    processor, model = AutoProcessor.from_pretrained(tiny_model), transformers_model(tiny_model)
    questions = [
        [user(tmp_path / image, "What colour is the shape?")],
        [user(tmp_path / image, "Colour?"), {"role": "assistant", "content": "red"}, user(None, "Shape?")],
        [user(None, "Say hi")],
    ]
    expected = []
    for question in questions:
        inputs = processor.apply_chat_template(
            question, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        expected.append(greedy_answer(model, processor.tokenizer, inputs, max_new_tokens=4))
    assert [r["prediction"] for r in rows] == expected
    correct = sum(r["prediction"] == r["reference"] for r in rows)
    assert f"exact match: {correct}/3" in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_answers_equal_one_at_a_time(tmp_path, family_model, family):
    picture(tmp_path, "a.png")
    picture(tmp_path, "b.png", "square", "blue", "bottom right", size=(140, 84))
    answerer = generate.Answerer(family_model(family), generate.torch.device("cpu"))
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
    printed = capsys.readouterr().out
    processor = AutoProcessor.from_pretrained(tiny_model)
    question = [user(tmp_path / "a.png", "Colour?")]
    inputs = processor.apply_chat_template(
        question, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = greedy_answer(transformers_model(tiny_model), processor.tokenizer, inputs, max_new_tokens=3)
    assert expected, "a random model's answer, but not an empty one, or printing nothing would pass"
    assert printed == expected + "\n"


@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpoint_answers_as_the_final_output_of_the_same_step(tmp_path, tiny_model, lora):
    image = picture(tmp_path, "a.png")
    data = write_json(tmp_path / "data.json", [qa(image, "What colour is the shape?", "red"), qa(None, "Hi", "hi")])
    out = tmp_path / "out"
    flags = ["--model", tiny_model, "--data", data, "--output-dir", str(out), "--num-workers", "0"]
    flags += ["--max-steps", "2", "--save-every", "2", "--lr", "1e-3"] + (["--lora"] if lora else [])
    finetune.train(parse_config(flags), single_device())
    checkpoint = out / "checkpoints" / "step-00000002"

    def predictions(folder) -> list[str]:
        where = ["--model", tiny_model, "--adapter", str(folder)] if lora else ["--model", str(folder)]
        generate.main([*where, "--data", data, "--out", str(tmp_path / "p.jsonl"), "--max-new-tokens", "5"])
        return [json.loads(line)["prediction"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]

    assert predictions(checkpoint) == predictions(out)
    if lora:  # an adapter is not a model: the error says how to use it
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--model", str(checkpoint), "--prompt", "Hi"])
        assert "holds a LoRA adapter" in str(exit_info.value.code) and "--adapter" in str(exit_info.value.code)


def test_a_low_temperature_samples_the_greedy_answer_and_a_high_one_does_not(tmp_path, tiny_model):
    """Sampling is over the whole distribution, even where the model's generation_config.json narrows it to the
    top token as Qwen's do (top_k 1, top_p 0.001): temperature means what it says."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, "top_k": 1, "top_p": 0.001}))
    answerer = generate.Answerer(str(model), generate.torch.device("cpu"))
    question = [[generate.user_message("How many corners does a triangle have?")]]
    greedy = answerer.answer(question, max_new_tokens=16)
    generate.torch.manual_seed(0)
    assert answerer.answer(question, max_new_tokens=16, temperature=1e-3) == greedy
    generate.torch.manual_seed(0)
    assert answerer.answer(question, max_new_tokens=16, temperature=5.0) != greedy
    with pytest.raises(SystemExit):  # --data scores greedy answers
        generate.main(["--model", tiny_model, "--data", "data.json", "--temperature", "0.7"])
