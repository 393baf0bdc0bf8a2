"""The loss computes logits only where labels train: the same loss and gradients as logits everywhere."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_step, collate, loop_step, picture, qa, write_json

import finetune
from qwen_ft.collate import IGNORE_INDEX, Collator
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.lora import add_lora, quantization_config
from qwen_ft.model import load_model, load_processor, set_trainable
from qwen_ft.tiny import FAMILIES

FROZEN = {"vision": True, "merger": False, "llm": False}


def window(folder, collator) -> list[dict]:
    """Two micro-batches: two image samples of unequal lengths (so one is padded), and a text-only one."""
    samples = [
        qa(picture(folder, "a.png"), "What colour is the shape?", "red"),
        qa(picture(folder, "b.png", "square", "blue"), "Describe the picture in a few words.", "a blue square"),
        qa(None, "How many corners does a triangle have?", "three"),
    ]
    samples = read_samples(write_json(folder / "data.json", samples))
    check_media(samples)
    return [collate(collator, samples[:2]), collate(collator, samples[2:])]


def full_logits_reference(model, window) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients computed the plain way: logits at every position, fp32 cross-entropy over the
    shifted labels, summed over the window and divided by its trained tokens."""
    model.zero_grad()
    trained = sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in window)
    total = torch.zeros(())
    for batch in window:
        batch = dict(batch)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        (loss / trained).backward()
        total += loss.detach()
    return total / trained, [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "family, mode",
    [(family, "full") for family in FAMILIES]
    + [("qwen2-vl", "lora"), ("qwen3.5", "lora"), ("qwen2-vl", "qlora"), ("qwen3-vl", "qlora")],
)
def test_logits_where_labels_train_give_the_loss_and_gradients_of_all_logits(tmp_path, family_model, family, mode):
    model_dir = family_model(family)
    quantization = quantization_config(FROZEN) if mode == "qlora" else None
    model = load_model(model_dir, "fp32", "sdpa", torch.device("cpu"), quantization)
    if mode == "full":
        set_trainable(model, FROZEN)
    else:
        model = add_lora(model, FROZEN, r=4, alpha=8, dropout=0.0, targets="llm", dora=False)
    model.train()  # as in the loop (bitsandbytes' CPU path repacks 4-bit weights for inference in eval mode)
    batches = window(tmp_path, Collator(load_processor(model_dir), max_length=4096))

    trained_positions_only = loop_step(model, batches)
    assert_same_step(trained_positions_only, full_logits_reference(model, batches), (1e-6, 1e-6), (1e-5, 1e-6))


def test_the_chunked_cross_entropy_equals_one_cross_entropy_with_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(11, 50, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    chunked = finetune.cross_entropy_sum(logits, targets, chunk=4)  # chunks of 4, 4 and 3 tokens
    (chunked_gradient,) = torch.autograd.grad(chunked, logits)
    whole = F.cross_entropy(logits, targets, reduction="sum")
    (whole_gradient,) = torch.autograd.grad(whole, logits)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_gradient, whole_gradient, rtol=1e-6, atol=1e-7)
    empty = finetune.cross_entropy_sum(logits[:0], targets[:0])  # a micro-batch with nothing to train
    assert empty.item() == 0 and empty.requires_grad
