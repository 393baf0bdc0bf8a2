"""Micro-batches: --batch-size samples each, or as many as fit --max-tokens, in an order fixed by seed and epoch."""

import random

import pytest
from helpers import picture, qa, write_json
from torch.utils.data import DistributedSampler

import finetune
from qwen_ft.data.batching import BatchPlan

RANDOM = random.Random(0)
LENGTHS = tuple(RANDOM.randint(20, 400) for _ in range(300))


def cost(batch, packing) -> int:
    lengths = [LENGTHS[i] for i in batch]
    return sum(lengths) if packing else len(lengths) * max(lengths)


def test_without_a_budget_each_rank_takes_the_distributed_samplers_order():
    for rank in (0, 1):
        plan = BatchPlan(LENGTHS, batch_size=3, shuffle=True, seed=5, rank=rank, world_size=2)
        sampler = DistributedSampler(range(len(LENGTHS)), 2, rank, shuffle=True, seed=5)
        sampler.set_epoch(3)
        order = list(sampler)
        assert plan.epoch(3) == [order[i : i + 3] for i in range(0, len(order), 3)]


@pytest.mark.parametrize("packing", [False, True])
def test_budget_micro_batches_fit_and_hold_every_sample_once_an_epoch(packing):
    plan = BatchPlan(LENGTHS, batch_size=8, max_tokens=900, packing=packing, seed=1)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
        assert all(len(batch) <= 8 and cost(batch, packing) <= 900 for batch in batches)
    assert plan.epoch(1) == BatchPlan(LENGTHS, batch_size=8, max_tokens=900, packing=packing, seed=1).epoch(1)
    assert plan.epoch(1) != plan.epoch(2)
    assert plan.micro_batches_in(3) == sum(len(plan.epoch(epoch)) for epoch in range(3))


def test_grouping_by_length_wastes_less_padding_than_batches_in_random_order():
    budget = BatchPlan(LENGTHS, batch_size=4, max_tokens=4 * 400, seed=1).epoch(0)
    fixed = BatchPlan(LENGTHS, batch_size=4, seed=1).epoch(0)
    padding = [sum(cost(b, packing=False) - cost(b, packing=True) for b in batches) for batches in (budget, fixed)]
    assert padding[0] < padding[1] / 2


def test_every_rank_takes_as_many_budget_micro_batches_and_together_all_samples():
    epochs = [BatchPlan(LENGTHS, 4, 500, False, True, 7, rank, 3).epoch(2) for rank in range(3)]
    assert len({len(batches) for batches in epochs}) == 1
    assert {i for batches in epochs for batch in batches for i in batch} == set(range(len(LENGTHS)))


def test_a_sample_longer_than_the_budget_stops_before_training(tmp_path, tiny_model):
    data = write_json(
        tmp_path / "data.json",
        [qa(None, "Say hi", "hi"), qa(picture(tmp_path, "a.png"), "What colour is the shape?", "red")],
    )
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--model", tiny_model, "--data", data, "--output-dir", str(tmp_path), "--max-tokens", "40"])
    error = str(exit_info.value.code)
    assert f"{data}: sample 1: " in error and "tokens, more than --max-tokens 40" in error
    assert "sample 0" not in error
