"""Length-grouped batches: coverage, homogeneity, determinism, sharding over processes, exact resume."""

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from safetensors.torch import load_file
from torch.utils.data import BatchSampler

from conftest import sft_config
from reftkit.data.batching import LengthGroupedSampler, length_grouped_order, padding_fraction, shuffled_loader
from reftkit.trainers import sft as sft_module
from reftkit.trainers.sft import train_sft
from reftkit.training.checkpoints import latest_checkpoint
from reftkit.training.metrics import Metrics

N, BATCH = 1003, 8  # not a multiple of the batch size: one short batch


@pytest.fixture(scope="module")
def lengths():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(20, 300, (N,), generator=g)).tolist()


def batches_of(order, batch_size=BATCH):
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def grouped(lengths, seed=0, epoch=0):
    sampler = LengthGroupedSampler(lengths, BATCH, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_every_example_once_per_epoch_and_only_the_last_batch_short(lengths):
    for epoch in range(3):
        order = grouped(lengths, epoch=epoch)
        assert sorted(order) == list(range(N))
        sizes = [len(b) for b in batches_of(order)]
        assert sizes[:-1] == [BATCH] * (len(sizes) - 1) and sizes[-1] == N % BATCH


def test_batches_are_length_homogeneous_and_pad_less_than_random_ones(lengths):
    order = grouped(lengths)
    random_order = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()

    def mean_spread(o):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches_of(o)) / len(o)

    assert mean_spread(order) < 0.1 * mean_spread(random_order)
    assert padding_fraction(batches_of(order), lengths) < 0.1 * padding_fraction(batches_of(random_order), lengths)
    # Still shuffled: long and short batches are spread over the epoch, not sorted.
    firsts = [lengths[b[0]] for b in batches_of(order)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_order_is_a_function_of_seed_and_epoch_only(lengths):
    torch.manual_seed(123)  # the global RNG plays no part
    a = grouped(lengths, seed=5, epoch=2)
    torch.manual_seed(456)
    assert grouped(lengths, seed=5, epoch=2) == a
    assert grouped(lengths, seed=5, epoch=3) != a
    assert grouped(lengths, seed=6, epoch=2) != a


def test_pure_order_handles_tiny_inputs():
    g = torch.Generator().manual_seed(0)
    assert length_grouped_order([], 4, g) == []
    assert sorted(length_grouped_order([3, 1, 2], 4, g)) == [0, 1, 2]


def shard(lengths, process, processes=2):
    loader = shuffled_loader(list(range(N)), lambda: lengths, BATCH, seed=1, group_by_length=True)
    return prepare_data_loader(loader, num_processes=processes, process_index=process, put_on_device=False,
                               use_seedable_sampler=True)


def test_processes_share_the_batches_of_one_epoch_order(lengths):
    shards = [shard(lengths, p) for p in (0, 1)]
    for epoch in (0, 1):
        expected = batches_of(grouped(lengths, seed=1, epoch=epoch))
        seen = []
        for loader in shards:
            loader.set_epoch(epoch)
            seen.append([b.tolist() for b in loader])
        assert len(seen[0]) == len(seen[1])
        # Round-robin whole batches; accelerate tops up the short last round from the start (even_batches).
        assert seen[0][:-1] == expected[0:-1:2][: len(seen[0]) - 1]
        assert seen[1][:-1] == expected[1:-1:2][: len(seen[1]) - 1]
        assert set(sum(seen[0] + seen[1], [])) == set(range(N))


def test_skipping_batches_resumes_the_same_epoch_order(lengths):
    loader = shard(lengths, 0)
    loader.set_epoch(2)
    full = [b.tolist() for b in loader]
    loader.set_epoch(2)
    assert [b.tolist() for b in skip_first_batches(loader, 5)] == full[5:]


def test_single_process_loader_follows_set_epoch(lengths):
    loader = prepare_data_loader(shuffled_loader(list(range(N)), lambda: lengths, BATCH, 1, True),
                                 put_on_device=False, use_seedable_sampler=True)
    assert isinstance(loader.batch_sampler, BatchSampler)
    loader.set_epoch(3)
    assert [b.tolist() for b in loader] == batches_of(grouped(lengths, seed=1, epoch=3))


def grouped_sft_config(out, model, **kw):
    return sft_config(out, model, batch_size=8, group_by_length=True, save_every=1, **kw)


@pytest.mark.slow
def test_sft_resume_mid_epoch_matches_uninterrupted_run(tmp_path, splits, tiny_checkpoint, monkeypatch):
    train, _ = splits
    batches = []
    real_collate = sft_module.collate_sft
    monkeypatch.setattr(sft_module, "collate_sft", lambda b, pad_id: batches.append(b) or real_collate(b, pad_id))
    full = train_sft(grouped_sft_config(tmp_path / "full", tiny_checkpoint), train)
    # Grouping reached the trainer: its batches pad less than random batches of the same examples.
    examples = [e for b in batches[:6] for e in b]  # epoch 1
    sizes = [len(e.input_ids) for e in examples]
    seen = batches_of(list(range(len(examples))))
    shuffled = batches_of(torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist())
    assert padding_fraction(seen, sizes) < 0.5 * padding_fraction(shuffled, sizes)

    count = {"n": 0}

    def dying_log(self, record, step):
        if count["n"] == 8:  # 6 steps per epoch: dies in epoch 2 after 2 of its batches
            raise KeyboardInterrupt
        count["n"] += 1

    monkeypatch.setattr(Metrics, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        train_sft(grouped_sft_config(tmp_path / "cut", tiny_checkpoint), train)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-8"
    resumed = train_sft(grouped_sft_config(tmp_path / "cut", tiny_checkpoint, resume=True), train)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
