"""--packing puts a micro-batch in one row without padding: the same loss and gradients as padded."""

from functools import partial

import pytest
import torch
from helpers import assert_same_step, clip, loop_step, picture, qa, video_qa, write_json

import finetune
from qwen_ft.collate import Collator
from qwen_ft.config import ConfigError
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.dist import single_device
from qwen_ft.model import load_model, load_processor, set_trainable
from qwen_ft.packing import rope_index_of
from qwen_ft.tiny import FAMILIES

# Qwen3.5's linear-attention layers can't keep packed samples apart: packing refuses it.
PACKABLE = [family for family in FAMILIES if family != "qwen3.5"]

NO_AUTOCAST = partial(torch.autocast, "cpu", enabled=False)


def samples_of_every_kind(folder) -> list[dict]:
    """Single-image, two-image, video, multi-turn and text-only samples."""
    a, b = picture(folder, "a.png"), picture(folder, "b.png", "square", "blue", "bottom right", size=(140, 84))
    two_images = qa(b, "Which picture shows a blue shape, the first or the second?", "the second")
    two_images["messages"][0]["content"].insert(0, {"type": "image", "image": a})
    multi_turn = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the shape?"},
            {"role": "assistant", "content": "a circle"},
        ]
    }
    return [
        qa(a, "What colour is the shape?", "red"),
        two_images,
        video_qa(clip(folder)),
        multi_turn,
        qa(None, "How many corners does a triangle have?", "three"),
    ]


def batches(folder, model_dir, packed: bool, blank_image=False) -> list[dict]:
    """Two micro-batches (three samples, then two), as the loop gets them."""
    rope_index = rope_index_of(model_dir) if packed else None
    collator = Collator(load_processor(model_dir), 4096, blank_image=blank_image, rope_index=rope_index)
    samples = read_samples(write_json(folder / "data.json", samples_of_every_kind(folder)))
    check_media(samples, factor=collator.video_factor)
    window = [collator(samples[:3]), collator(samples[3:])]
    assert all(batch.pop("bad_samples") == [] for batch in window)
    return window


@pytest.mark.parametrize("family", PACKABLE)
def test_a_packed_step_gives_the_loss_and_gradients_of_the_same_samples_padded(tmp_path, family_model, family):
    model_dir = family_model(family)
    model = load_model(model_dir, "fp32", "sdpa", torch.device("cpu"))
    set_trainable(model, {"vision": False, "merger": False, "llm": False})  # every part, vision included
    model.train()
    padded = batches(tmp_path, model_dir, packed=False)
    packed = batches(tmp_path, model_dir, packed=True)
    assert all(batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch for batch in packed)
    assert sum(b["input_ids"].numel() for b in packed) == sum(int(b["attention_mask"].sum()) for b in padded)

    assert_same_step(loop_step(model, packed), loop_step(model, padded), (1e-5, 1e-6), (1e-4, 1e-5))


@pytest.mark.parametrize("family", PACKABLE)
def test_a_packed_row_is_the_samples_one_after_another_with_positions_restarting(tmp_path, family_model, family):
    tiny_model = family_model(family)
    padded = batches(tmp_path, tiny_model, packed=False)[0]
    packed = batches(tmp_path, tiny_model, packed=True)[0]
    lengths = padded["attention_mask"].sum(1).tolist()
    keep = padded["attention_mask"].bool()
    assert packed["input_ids"][0].tolist() == padded["input_ids"][keep].tolist()
    assert packed["labels"][0].tolist() == padded["labels"][keep].tolist()
    text_positions = packed["position_ids"][0, 0].tolist()
    starts = [i for i, position in enumerate(text_positions) if position == 0]
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]
    # The M-RoPE positions of each sample are those the model gives it in a padded batch.
    model = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    media = {key: padded[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if key in padded}
    reference, _ = model.model.get_rope_index(
        padded["input_ids"], padded["mm_token_type_ids"], attention_mask=padded["attention_mask"], **media
    )
    assert torch.equal(packed["position_ids"][1:, 0], reference[:, keep])


def test_a_blank_image_in_a_packed_batch_changes_nothing(tmp_path, tiny_model):
    model = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    model.train()
    text_only = read_samples(write_json(tmp_path / "t.json", [qa(None, "Say hi", "hi"), qa(None, "Hello?", "hey")]))
    plain = Collator(load_processor(tiny_model), 4096, rope_index=rope_index_of(tiny_model))
    blank = Collator(load_processor(tiny_model), 4096, blank_image=True, rope_index=rope_index_of(tiny_model))
    with_blank, without = blank(text_only), plain(text_only)
    assert "pixel_values" in with_blank and "pixel_values" not in without
    for batch in (with_blank, without):
        batch.pop("bad_samples")

    def named_step(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss_sum, trained = finetune.forward_backward(model, [batch], single_device(), NO_AUTOCAST)
        return loss_sum / trained, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, gradients = named_step(with_blank)
    reference_loss, reference_gradients = named_step(without)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, gradient in gradients.items():  # the vision tower ran on the blank image, and learns nothing
        expected = reference_gradients.get(name, torch.zeros_like(gradient))
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-5)
    assert reference_gradients.keys() < gradients.keys()


def test_packing_refuses_qwen3_5_before_training(tmp_path, family_model):
    model_dir = family_model("qwen3.5")
    with pytest.raises(ConfigError, match="--packing"):
        rope_index_of(model_dir)
    data = write_json(tmp_path / "data.json", [qa(None, "Say hi", "hi")])
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--model", model_dir, "--data", data, "--output-dir", str(tmp_path / "out"), "--packing"])
    message = str(exit_info.value.code)
    assert "--packing" in message and "qwen3.5" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
