import pytest

from qwen_ft.collate import Collator
from qwen_ft.data.samples import Sample
from qwen_ft.rewards import RewardError, measures_boxes, parse_rewards, score
from qwen_ft.rollout import prompt_and_reference


def samples(count: int) -> list[Sample]:
    return [Sample(source="data.json", index=i, line=None, messages=[]) for i in range(count)]


def rewards_of(spec: str, completions, references, **settings) -> dict[str, list[float]]:
    rewards = parse_rewards(spec, **settings)
    rows = score(rewards, completions, references, samples(len(completions)))
    return {reward.name: row for reward, row in zip(rewards, rows)}


def test_built_in_rewards():
    completions = [" Red\n", "red square", "blue", "It is 1,250.5 km", "about 12", "none"]
    references = ["red", "red", "red", "1250.5", "12.1", "3"]
    got = rewards_of("exact,contains,numeric", completions, references)
    assert got["exact"] == [1, 0, 0, 0, 0, 0]
    assert got["contains"] == [1, 1, 0, 0, 0, 0]
    # The answer's last number within 1% of the reference's: 1250.5 = 1250.5, |12 - 12.1| / 12.1 < 1%.
    assert got["numeric"] == [0, 0, 0, 1, 1, 0]
    assert rewards_of("numeric", ["12"], ["12.5"], numeric_tolerance=0.05)["numeric"] == [1]
    assert rewards_of("numeric", ["12"], ["12.5"], numeric_tolerance=0.01)["numeric"] == [0]


def test_format_reward_matches_the_whole_answer():
    pattern = r"<answer>\w+</answer>"
    got = rewards_of(
        "format",
        ["<answer>red</answer>", " <answer>red</answer>\n", "so <answer>red</answer>"],
        ["", "", ""],
        format_regex=pattern,
    )
    assert got["format"] == [1, 1, 0]
    with pytest.raises(RewardError, match="--format-regex"):
        parse_rewards("exact,format")


def test_weights_and_names():
    rewards = parse_rewards("exact,format:0.2,contains:-1", format_regex=".*")
    assert [(r.name, r.weight) for r in rewards] == [("exact", 1.0), ("format", 0.2), ("contains", -1.0)]
    for bad, message in [
        ("exakt", "unknown reward 'exakt'"),
        ("exact,,contains", "empty item"),
        ("exact,exact:2", "two rewards are called 'exact'"),
    ]:
        with pytest.raises(RewardError, match=message):
            parse_rewards(bad)


def test_a_reward_function_of_ones_own_by_path_and_by_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shorter(completions, references, samples):\n"
        "    return [1.0 / (1 + len(c)) + s.index for c, s in zip(completions, samples)]\n"
    )
    got = rewards_of(f"{tmp_path / 'my_rewards.py'}:shorter:0.5,exact", ["a", "abc"], ["a", "a"])
    assert got == {"shorter": [0.5, 1.25], "exact": [1.0, 0.0]}
    assert parse_rewards(f"{tmp_path / 'my_rewards.py'}:shorter:0.5")[0].weight == 0.5
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards_of("my_rewards:shorter", ["ab"], ["x"]) == {"shorter": [1 / 3]}
    for spec, message in [
        (f"{tmp_path / 'nothere.py'}:f", "not found"),
        (f"{tmp_path / 'my_rewards.py'}:longer", "no function 'longer'"),
        ("no_such_module_here:f", "can't import no_such_module_here"),
    ]:
        with pytest.raises(RewardError, match=message):
            parse_rewards(spec)


def failing(tmp_path, body: str) -> str:
    (tmp_path / "bad.py").write_text(f"def reward(completions, references, samples):\n    {body}\n")
    return f"{tmp_path / 'bad.py'}:reward"


@pytest.mark.parametrize(
    "body, message",
    [
        # Fails on one answer: the sample is found by scoring the answers one at a time.
        (
            "return [1 / len(c) for c in completions]",
            r"reward function .*bad.py:reward raised ZeroDivisionError: division by zero \(on data.json: sample 2\)$",
        ),
        (
            "return [1.0]",
            r"reward function .*bad.py:reward returned 1 rewards for 4 completions \(of data.json: sample 0 and 3 more "
            r"samples\): it must return one float per completion$",
        ),
        (
            "return [float('nan') if c == '' else 1 for c in completions]",
            r"reward function .*bad.py:reward returned nan for a completion of data.json: sample 2: a reward must be a "
            r"finite number$",
        ),
        ("return ['1' for c in completions]", r"returned '1' for a completion of data.json: sample 0"),
    ],
)
def test_a_reward_function_that_fails_stops_with_one_line_naming_it_and_the_sample(tmp_path, body, message):
    rewards = parse_rewards(failing(tmp_path, body))
    with pytest.raises(RewardError, match=message) as error:
        score(rewards, ["a", "b", "", "d"], ["a"] * 4, samples(4))
    assert "\n" not in str(error.value)


def test_iou_reward_is_the_iou_of_the_answers_box_with_the_references(processor):
    """Qwen2-VL writes boxes in thousandths of the image's width and height; the image here is 200 wide and 100
    high, so (x1,y1),(x2,y2) is [x1 / 5, y1 / 10, x2 / 5, y2 / 10] in pixels. Decoding drops its box tokens."""
    collator = Collator(processor, max_length=4096)
    answer = {"role": "assistant", "content": [{"type": "box", "box": [20, 10, 100, 60]}]}  # 80 x 50 pixels
    question = {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Where?"}]}
    boxed = Sample(source="data.json", index=0, line=None, messages=[question, answer], image_sizes=[(100, 200)])
    plain = Sample(source="data.json", index=1, line=None, messages=[question, {**answer, "content": "red"}])
    completions = {
        "(100,100),(500,600)": 1.0,  # the same box
        "it is at (300,300),(700,800)": 40 * 30 / (2 * 80 * 50 - 40 * 30),  # [60, 30, 140, 80]: 40 x 30 shared
        "(100,100),(300,600)": 40 * 50 / (80 * 50),  # [20, 10, 60, 60]: half of it
        "(0,0),(50,50)": 0.0,  # [0, 0, 10, 5]: beside it
        "at the top": 0.0,  # no box
    }
    rewards = parse_rewards("iou,exact", collator=collator)
    prompt, reference = prompt_and_reference(boxed, collator)
    assert prompt == [question] and reference == "(100,100),(500,600)"  # as the model writes it, decoded
    iou, exact = score(rewards, list(completions), [reference] * len(completions), [boxed] * len(completions))
    assert iou == pytest.approx(list(completions.values()), abs=1e-12)
    assert exact == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert score(rewards[:1], ["(100,100),(500,600)"], ["red"], [plain]) == [[0.0]]  # a reference without a box
    assert measures_boxes(rewards) and not measures_boxes(parse_rewards("exact"))
