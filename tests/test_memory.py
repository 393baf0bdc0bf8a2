"""Memory: a tied weight's one gradient gives autograd's loss and gradients, 8-bit optimizer states update as
bitsandbytes' own and resume exactly, and the memory plan counts the weights, gradients and optimizer states
the loaded model holds."""

import copy
import json

import bitsandbytes
import pytest
import torch
from helpers import assert_same_step, clip, collate, loop_step, picture, qa, video_qa, write_json
from test_bench import PUBLISHED

import finetune
from qwen_ft import optim, tiny
from qwen_ft.collate import Collator
from qwen_ft.config import parse_config
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.lora import as_trained, quantization_config
from qwen_ft.model import load_model, one_tied_gradient, set_trainable
from qwen_ft.plan import main as plan_main
from qwen_ft.plan import plan_model, setup_of, vision_patches
from qwen_ft.tiny import FAMILIES


def window(folder, processor) -> list[dict]:
    """Two micro-batches: two image samples of unequal lengths (one padded), and a text-only one."""
    samples = [
        qa(picture(folder, "a.png"), "What colour is the shape?", "red"),
        qa(picture(folder, "b.png", "square", "blue"), "Describe the picture in a few words.", "a blue square"),
        qa(None, "How many corners does a triangle have?", "three"),
    ]
    samples = read_samples(write_json(folder / "data.json", samples))
    check_media(samples)
    collator = Collator(processor, max_length=4096)
    return [collate(collator, samples[:2]), collate(collator, samples[2:])]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tied_weight_with_one_gradient_gets_autograds_loss_and_gradients(tmp_path, family_processor, family):
    config = tiny.make_config(family_processor(family).tokenizer, family)
    config.tie_word_embeddings = True  # as the small published shapes are
    torch.manual_seed(0)
    model = FAMILIES[family].model(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    model.train()
    batches = window(tmp_path, family_processor(family))
    tied = copy.deepcopy(model)
    assert one_tied_gradient(tied) and not one_tied_gradient(copy.deepcopy(model).requires_grad_(False))
    # Two micro-batches: the head's gradient goes into .grad, then is added to it.
    assert_same_step(loop_step(tied, batches), loop_step(model, batches), (0, 0), (1e-6, 1e-7))
    assert tied.get_input_embeddings().weight.grad.layout == torch.strided  # dense: the optimizers' kind


def test_8bit_adamw_over_slices_of_blocks_equals_bitsandbytes_over_the_whole_tensor(monkeypatch):
    monkeypatch.setattr(optim, "CPU_SLICE", optim.MIN_8BIT_SIZE)
    torch.manual_seed(0)
    values = optim.MIN_8BIT_SIZE * 2 + 300  # two slices and a part of one, whose last block is partial
    start = torch.randn(values // 4, 4)
    sliced, whole = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine = optim.AdamW8bit([sliced], lr=1e-2, weight_decay=0.1)
    theirs = bitsandbytes.optim.AdamW8bit([whole], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        gradient = torch.randn_like(sliced)
        sliced.grad, whole.grad = gradient.clone(), gradient.clone()
        mine.step(), theirs.step()
    assert torch.equal(sliced, whole)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(mine.state[sliced][key], theirs.state[whole][key])
    assert mine.state[sliced]["state1"].dtype == torch.uint8


def test_8bit_states_keep_each_parts_learning_rate_and_weight_decay(tiny_model):
    model = load_model(tiny_model, "fp32", "sdpa", torch.device("cpu"))
    set_trainable(model, {"vision": False, "merger": False, "llm": False})
    part_lr = {"vision": 1e-6, "merger": 3e-5}
    groups = [
        [(g["lr"], g["weight_decay"], len(g["params"])) for g in make.param_groups]
        for make in (
            optim.make_optimizer(model, 1e-5, 0.1, torch.device("cpu"), part_lr, name)
            for name in ("adamw", "adamw8bit")
        )
    ]
    assert groups[0] == groups[1] and {lr for lr, _, _ in groups[1]} == {1e-5, 1e-6, 3e-5}


def test_paged_8bit_states_need_cuda(tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [qa(None, "Hi", "hello")])
    with pytest.raises(SystemExit) as exit_info:
        args = ["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path)]
        finetune.main([*args, "--optim", "paged-adamw8bit"])
    assert "needs CUDA" in str(exit_info.value.code) and "--optim adamw8bit" in str(exit_info.value.code)


def stored_bytes(tensors) -> int:
    """Bytes of the storages of these tensors, each storage once."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def set_up(cfg):
    """The model as finetune.py sets it up for cfg, loaded."""
    quantization = quantization_config(cfg.frozen()) if cfg.qlora else None
    return as_trained(load_model(cfg.model, cfg.precision, "sdpa", torch.device("cpu"), quantization), cfg)


@pytest.mark.parametrize(
    "family, flags",
    [(family, []) for family in FAMILIES]
    + [
        ("qwen2-vl", ["--optim", "adamw8bit", "--no-freeze-vision"]),
        ("qwen2-vl", ["--lora", "--optim", "adamw8bit"]),
        ("qwen3-vl", ["--qlora", "--lora-targets", "llm,vision"]),
        ("qwen2.5-vl", ["--precision", "bf16-mixed", "--lora"]),
    ],
)
def test_the_plan_counts_the_weights_gradients_and_optimizer_states_of_the_loaded_model(family_model, family, flags):
    cfg = parse_config(["--model", family_model(family), "--precision", "fp32", "--lora-r", "4", *flags])
    planned = setup_of(plan_model(cfg), cfg).parts  # built on the meta device from config.json

    model = set_up(cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer = optim.make_optimizer(model, 1e-4, 0.0, torch.device("cpu"), {}, cfg.optim)
    optimizer.step()  # the states exist from the first step on
    weights = {}
    for t in [*model.parameters(), *model.buffers()]:
        quant_state = getattr(t, "quant_state", None)
        if quant_state is None:
            weights.setdefault(str(t.dtype), []).append(t)
        else:  # the packed 4-bit values, their scales and tables
            weights.setdefault("4-bit", []).extend(
                [t, quant_state.absmax, quant_state.code, quant_state.offset, *vars(quant_state.state2).values()]
            )
    dtype_names = {"torch.float32": "weights fp32", "torch.bfloat16": "weights bf16", "4-bit": "weights 4-bit"}
    weights = {dtype_names[kind]: stored_bytes(filter(torch.is_tensor, found)) for kind, found in weights.items()}
    states = stored_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    assert {name: size for name, size in planned.items() if name.startswith("weights")} == weights
    assert planned["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trained)
    assert planned["optimizer states"] == states


@pytest.mark.parametrize("family, size", [("qwen2-vl", "2b"), ("qwen2-vl", "7b"), ("qwen3-vl", "8b")])
def test_the_plan_counts_the_published_models_parameters(tmp_path, family, size):
    tiny.make_config(tiny.build_tokenizer(family), family, size).save_pretrained(tmp_path)
    cfg = parse_config(["--model", str(tmp_path)])
    assert setup_of(plan_model(cfg), cfg).counts["parameters"] == PUBLISHED[family, size]


def test_the_plan_as_json_and_what_fits_instead(tmp_path, tiny_model, capsys):
    data = write_json(tmp_path / "data.json", [qa(picture(tmp_path, "a.png"), "Colour?", "red"), qa(None, "Hi", "hi")])
    flags = ["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path / "out"), "--precision", "fp32"]
    flags += ["--lora-r", "2"]  # adapters smaller than the tiny model's layers, as on a real one
    plan_main([*flags, "--json", "--device-memory", "80GB"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["changes"] == [] and plan["device_memory"] == 80 * 2**30
    assert {"weights fp32", "gradients", "optimizer states", "activations", "logits"} <= set(plan["parts"])
    assert plan["peak_bytes"] < sum(plan["parts"].values())  # the parts don't all peak at once

    plan_main([*flags, "--json", "--device-memory", f"{plan['peak_bytes'] * 0.8 / 2**20}MB"])
    small = json.loads(capsys.readouterr().out)
    assert not small["fits"] and small["peak_bytes"] == plan["peak_bytes"]
    changes = {change["change"]: change for change in small["changes"]}
    assert {"--lora", "--qlora", "--optim adamw8bit"} <= set(changes)
    assert changes["--lora"]["peak_bytes"] < plan["peak_bytes"] and changes["--lora"]["fits"]

    plan_main(flags)  # the table
    table = capsys.readouterr().out
    assert "peak" in table and "with --gradient-checkpointing" in table and "fits" in table


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])  # patches of 14 and of 16 pixels
def test_the_plans_vision_patches_are_those_the_collator_gives_the_vision_tower(tmp_path, family_processor, family):
    image = picture(tmp_path, "a.png", size=(150, 90))
    samples = [qa(image, "Colour?", "red"), video_qa(clip(tmp_path)), qa(None, "Hi", "hi")]
    data = write_json(tmp_path / "data.json", samples)
    collator = Collator(family_processor(family), max_length=4096)
    samples = read_samples(data, special_tokens=collator.tokens.all_strings)
    check_media(samples, factor=collator.video_factor)
    patches = [
        sum(batch[key].shape[0] for key in ("pixel_values", "pixel_values_videos") if key in batch)
        for batch in (collate(collator, samples[i : i + 1]) for i in range(len(samples)))
    ]
    assert vision_patches(samples, collator).tolist() == patches and 0 not in patches[:2]
