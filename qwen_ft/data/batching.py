"""Which samples go into each micro-batch: --batch-size of them, or as many as fit --max-tokens.

The plan of an epoch depends only on the seed, the epoch and the samples' lengths (known before
training), so a resumed run and every rank of a distributed run compute the same one.
"""

from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

from qwen_ft.data.read import raise_if_any
from qwen_ft.data.samples import Samples

# Samples are sorted by length within windows of this many micro-batches: neighbours in a window
# have similar lengths (little padding), while the order stays random across windows.
SORT_WINDOW_BATCHES = 64


@dataclass(frozen=True)
class BatchPlan:
    lengths: tuple[int, ...]  # tokens of each sample
    batch_size: int
    max_tokens: int | None = None  # None: batch_size samples per micro-batch
    packing: bool = False  # a packed micro-batch costs the sum of its lengths, not count x longest
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of an epoch, as lists of sample indices."""
        if self.max_tokens is None:
            # DistributedSampler's order, which pads the samples to a multiple of world_size by repeating.
            sampler = DistributedSampler(
                range(len(self.lengths)), self.world_size, self.rank, shuffle=self.shuffle, seed=self.seed
            )
            sampler.set_epoch(epoch)
            order = list(sampler)
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = self.token_budget_batches(epoch)
        # Every rank takes the same number of micro-batches: the first ones fill the last round again.
        batches += [batches[i % len(batches)] for i in range(-len(batches) % self.world_size)]
        return batches[self.rank :: self.world_size]

    def token_budget_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' micro-batches of at most max_tokens tokens and batch_size samples each."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        count = len(self.lengths)
        order = torch.randperm(count, generator=generator).tolist() if self.shuffle else list(range(count))
        window = self.batch_size * SORT_WINDOW_BATCHES
        batches = []
        for start in range(0, count, window):
            batch, total, longest = [], 0, 0
            for index in sorted(order[start : start + window], key=lambda i: self.lengths[i]):
                length = self.lengths[index]
                # The positions the micro-batch would compute: its tokens when packed, else its rows
                # padded to the longest.
                cost = total + length if self.packing else (len(batch) + 1) * max(longest, length)
                if batch and (len(batch) == self.batch_size or cost > self.max_tokens):
                    batches.append(batch)
                    batch, total, longest = [], 0, 0
                batch.append(index)
                total, longest = total + length, max(longest, length)
            batches.append(batch)
        if self.shuffle:  # else a window's batches would go from short to long, every window
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def micro_batches_in(self, epochs: int) -> int:
        """This rank's micro-batches in the first `epochs` epochs (the same count on every rank)."""
        return sum(len(self.epoch(epoch)) for epoch in range(epochs))


def check_token_budget(samples: Samples, max_tokens: int) -> None:
    """DataError naming every sample that would not fit in a micro-batch of max_tokens on its own."""
    raise_if_any(
        [
            f"{samples.where(position)}: {length} tokens, more than --max-tokens {max_tokens}; raise --max-tokens "
            "(or lower --max-length or --max-pixels)"
            for position, length in zip(samples.order.tolist(), samples.lengths.tolist())
            if length > max_tokens
        ]
    )
