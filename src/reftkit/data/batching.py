"""Shuffled training batches, optionally grouped by length so little of a batch is padding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

# Examples are sorted by length inside windows of this many batches. Larger windows pad less but
# make batch composition more predictable; 50 is the Hugging Face Trainer's value.
WINDOW_BATCHES = 50


def length_grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                         window_batches: int = WINDOW_BATCHES) -> list[int]:
    """Every index once, in an order whose consecutive runs of `batch_size` have similar lengths.

    Shuffle, sort each window of `window_batches` batches by length, cut it into batches, then
    shuffle the batches. Full batches come first and the one short batch (if any) last: accelerate
    deals out whole batches round-robin to processes and only expects a short batch at the end."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    short = batches.pop() if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled for i in batch] + short


class LengthGroupedSampler(Sampler[int]):
    """Index order of `length_grouped_order`, a pure function of (seed, epoch): the same on every
    process and after --resume, and independent of the global RNG.

    A sampler (not a batch sampler) on purpose: the DataLoader wraps it in a torch BatchSampler,
    and accelerate forwards `set_epoch` to `batch_sampler.sampler` on one process and to
    `batch_sampler.batch_sampler.sampler` when it shards batches over several."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))


def shuffled_loader(dataset: Sequence, lengths: Callable[[], Sequence[int]], batch_size: int, seed: int,
                    group_by_length: bool, collate_fn: Callable | None = None) -> DataLoader:
    """A training DataLoader: random batches, or length-grouped ones. `lengths` is called only
    when grouping (ReFT tokenizes its prompts for it). The loader keeps its own generator either
    way, so a new iterator never draws from the global RNG that also drives sampling."""
    sampler = LengthGroupedSampler(lengths(), batch_size, seed) if group_by_length else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=loader_generator(seed), collate_fn=collate_fn)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the tokens in right- or left-padded batches that are padding."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / padded if padded else 0.0


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own RNG. Without it each new iterator draws from the global torch RNG, which
    also drives sampling, so a resumed run (new iterator after the RNG restore) would sample
    differently from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)
