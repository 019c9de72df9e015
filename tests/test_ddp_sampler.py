"""GlobalBatchSampler / rank_share / GlobalMeanCrossEntropy: the pure pieces of DDP training (no Ray)."""

from __future__ import annotations

import pytest
import torch

from wsseg_core.train import (GlobalBatchSampler, GlobalMeanCrossEntropy, check_global_batch,
                              rank_share)


def test_rank_share_matches_array_split_by_hand():
    # 10 items over 3 ranks: 4, 3, 3 (the first 10 % 3 = 1 rank takes one more).
    assert [rank_share(10, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert [rank_share(8, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError):
        rank_share(8, 2, 2)


@pytest.mark.parametrize("n,batch,world", [(100, 16, 1), (100, 16, 2), (100, 16, 3), (37, 64, 2),
                                           (64, 64, 4), (5, 2, 2)])
def test_every_rank_runs_the_same_steps_and_the_ranks_tile_each_global_batch(n, batch, world):
    per_rank = [list(GlobalBatchSampler(n, batch, r, world, seed=7)) for r in range(world)]
    steps = {len(b) for b in per_rank}
    assert steps == {1 if n <= batch else n // batch}  # equal steps on every rank, by construction
    assert all(len(GlobalBatchSampler(n, batch, r, world)) == len(per_rank[r]) for r in range(world))
    ref = GlobalBatchSampler(n, batch, 0, 1, seed=7).global_batches()
    for step in range(len(ref)):
        # Concatenating the ranks' batches of one step gives the one-worker global batch, in order.
        assert sum((per_rank[r][step] for r in range(world)), []) == ref[step]
        assert all(len(per_rank[r][step]) >= 1 for r in range(world))
    seen = [i for b in ref for i in b]
    assert len(seen) == len(set(seen)) == min(n, (n // batch) * batch if n > batch else n)


def test_order_is_seeded_per_epoch_and_unshuffled_on_request():
    a = GlobalBatchSampler(50, 10, seed=3)
    b = GlobalBatchSampler(50, 10, seed=3)
    first = a.global_order()
    a.set_epoch(1)
    assert a.global_order() != first  # a new order every epoch ...
    b.set_epoch(1)
    assert a.global_order() == b.global_order()  # ... the same on every rank and after a resume
    assert sorted(first) == list(range(50))
    assert GlobalBatchSampler(6, 4, shuffle=False).global_batches() == [[0, 1, 2, 3]]


def test_batch_smaller_than_workers_is_refused_clearly():
    with pytest.raises(ValueError, match="GLOBAL batch"):
        check_global_batch(1, 2)
    with pytest.raises(ValueError, match="GLOBAL batch"):
        GlobalBatchSampler(100, 3, 0, 4)
    with pytest.raises(ValueError, match="cannot feed"):
        GlobalBatchSampler(1, 4, 0, 2)


def test_global_mean_ce_is_weighted_ce_on_one_worker():
    torch.manual_seed(0)
    logits = torch.randn(12, 2, 5, 5, requires_grad=True)
    y = torch.randint(0, 2, (12, 5, 5))
    w = torch.tensor([1.0, 7.7])
    ours = GlobalMeanCrossEntropy(w, world=1)(logits, y)
    ref = torch.nn.CrossEntropyLoss(weight=w)(logits, y)
    # By hand: sum_i w_{y_i} * -log softmax(x_i)[y_i] / sum_i w_{y_i}.
    logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    hand = -(w[y] * logp).sum() / w[y].sum()
    assert torch.allclose(ours, ref) and torch.allclose(ours, hand)
