"""The deep-model mixing rules and their neighbour cache, on hand-sized examples."""

from __future__ import annotations

import torch

from gossipnode import cache
from gossipnode.mixing import DFedSam, Monna, VarianceCorrected, nna, rescale_variance

torch.set_num_threads(1)


def payload(
    model: list[float], version: float, init: float = 7.0, degree: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(model, dtype=torch.float64), cache.card(version, init, degree))


def test_cache_keeps_one_slot_per_neighbour_and_only_newer_versions() -> None:
    state = {"x": torch.zeros(2)}
    state = cache.store(state, 3, payload([1, 1], 5), now=1.0)
    state = cache.store(state, 3, payload([2, 2], 4), now=2.0)  # older: ignored
    state = cache.store(state, 4, payload([9, 9], 1), now=2.0)
    (a, b) = cache.entries(state)
    assert (a.peer, a.version, a.received, a.model.tolist()) == (3, 5, 1.0, [1, 1])
    assert (b.peer, b.init_id, b.degree) == (4, 7.0, 2.0)
    state = cache.store(state, 3, payload([3, 3], 6), now=3.0)
    assert cache.entries(state)[0].model.tolist() == [3, 3]
    assert [e.peer for e in cache.usable(state, 3.5, max_age=1.0, fresh_only=False)] == [3]


def test_a_used_entry_is_fresh_again_only_with_a_newer_version() -> None:
    state = cache.store({}, 1, payload([1.0], 1), now=0.0)
    state = cache.mark_used(state, cache.usable(state, 0.0, 10, fresh_only=True))
    assert cache.usable(state, 0.0, 10, fresh_only=True) == []
    state = cache.store(state, 1, payload([2.0], 2), now=0.0)
    assert [e.model.item() for e in cache.usable(state, 0.0, 10, fresh_only=True)] == [2.0]
    assert cache.entries(cache.forget(state, 1)) == []


def test_init_id_is_equal_for_equal_models_only() -> None:
    a, b = torch.arange(4.0), torch.arange(4.0)
    assert cache.init_id(a) == cache.init_id(b) != cache.init_id(b + 1)
    assert float(torch.tensor(cache.init_id(a), dtype=torch.float64)) == cache.init_id(a)


def test_nna_drops_the_farthest_and_keeps_the_pivot() -> None:
    f64 = torch.float64
    pivot = torch.tensor([0.0, 0.0], dtype=f64)
    received = [torch.tensor(v, dtype=f64) for v in ([1.0, 0.0], [100.0, 0.0], [0.0, 2.0])]
    assert nna(pivot, received, drop=1).tolist() == [1 / 3, 2 / 3]
    assert nna(pivot, received, drop=0).tolist() == [101 / 4, 2 / 4]
    assert nna(pivot, [], drop=2).tolist() == [0.0, 0.0]


def test_monna_step_by_hand() -> None:
    rule = Monna(lr=0.5, budget=1, max_age=10, degree=2, momentum=0.5, weight_decay=0.0)
    state = rule.init(torch.tensor([1.0, 1.0], dtype=torch.float64))
    state = rule.mix(state, (), payload([1.2, 1.0], 1), now=0.0, peer=1)
    state = rule.mix(state, (), payload([-50.0, 9.0], 1), now=0.0, peer=2)
    grad = torch.tensor([2.0, 0.0], dtype=torch.float64)
    state = rule.apply_gradient(state, grad, now=0.0)
    # m = 0.5 * 0 + 0.5 * g = [1, 0]; half = x - 0.5 m = [0.5, 1]; peer 2 is dropped
    assert state["m"].tolist() == [1.0, 0.0]
    assert state["h"].tolist() == [0.5, 1.0]
    assert torch.allclose(state["x"], torch.tensor([(0.5 + 1.2) / 2, 1.0], dtype=torch.float64))
    sent, info = rule.payload(state, 0.0)
    assert sent is state["h"]
    assert info[0] == 1


def test_monna_with_too_few_models_takes_the_local_step() -> None:
    rule = Monna(lr=1.0, budget=1, max_age=10, degree=1, momentum=0.0, weight_decay=0.0)
    state = rule.init(torch.zeros(1, dtype=torch.float64))
    state = rule.mix(state, (), payload([5.0], 1), now=0.0, peer=1)
    state = rule.apply_gradient(state, torch.ones(1, dtype=torch.float64), now=0.0)
    assert state["x"].tolist() == [-1.0]  # own + 1 received < 2b + 1 = 3


def test_monna_lr_schedule_halves_after_decay_every_steps() -> None:
    rule = Monna(lr=1.0, budget=0, max_age=10, degree=1, momentum=0.0, weight_decay=0.0)
    state = rule.init(torch.zeros(1, dtype=torch.float64))
    for _ in range(50):
        state = rule.apply_gradient(state, torch.ones(1, dtype=torch.float64), now=0.0)
    before = float(state["x"])
    state = rule.apply_gradient(state, torch.ones(1, dtype=torch.float64), now=0.0)
    assert before == -50
    assert float(state["x"]) == -50.5


def test_rescale_variance_restores_the_target_and_keeps_the_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen, dtype=torch.float64)
    out = rescale_variance(x.clone(), ((0, 500),), [4.0])
    assert abs(float(out[:500].var(unbiased=False)) - 4.0) < 1e-9
    assert abs(float(out[:500].mean()) - float(x[:500].mean())) < 1e-12
    assert torch.equal(out[500:], x[500:])


def test_variance_correction_undoes_the_shrinkage_of_averaging_uncorrelated_models() -> None:
    gen = torch.Generator().manual_seed(1)
    models = [torch.randn(2000, generator=gen, dtype=torch.float64) for _ in range(3)]
    segments = ((0, 1000),)
    plain = VarianceCorrected(0.1, segments, 10, 2, correct=False)
    fixed = VarianceCorrected(0.1, segments, 10, 2)
    shrunk = plain.aggregate(models[0], models[1:])
    restored = fixed.aggregate(models[0], models[1:])
    # 0.5 own + 0.5 mean of two: variance 1/4 + 1/8 of the original
    assert abs(float(shrunk[:1000].var()) - 0.375) < 0.05
    assert abs(float(restored[:1000].var(unbiased=False)) - 1.0) < 0.1
    assert torch.equal(restored[1000:], shrunk[1000:])  # not a weight tensor: untouched


def test_variance_corrected_mixes_when_two_fresh_models_are_cached() -> None:
    rule = VarianceCorrected(1.0, (), max_age=10, degree=2)
    state = rule.init(torch.zeros(2, dtype=torch.float64))
    state = rule.mix(state, (), payload([2.0, 2.0], 1), now=0.0, peer=1)
    state = rule.apply_gradient(state, torch.zeros(2, dtype=torch.float64), now=0.0)
    assert state["x"].tolist() == [0.0, 0.0]  # one received: no mix yet
    state = rule.mix(state, (), payload([4.0, 4.0], 1), now=0.0, peer=2)
    state = rule.apply_gradient(state, torch.zeros(2, dtype=torch.float64), now=0.0)
    assert state["x"].tolist() == [1.5, 1.5]  # 0.5 * 0 + 0.5 * mean(2, 4)
    state = rule.apply_gradient(state, torch.zeros(2, dtype=torch.float64), now=0.0)
    assert state["x"].tolist() == [1.5, 1.5]  # the same copies never mix twice


def test_robust_variance_targets() -> None:
    rule = VarianceCorrected(0.1, ((0, 4),), 10, 3, target="median")
    own = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    received = [own, own * 2, own * 100]  # variances 1, 4, 10^4
    assert rule._targets(own, received) == [4.0]
    assert rule._targets(own, received[:2]) == [2.5]  # even count: between the middle two
    clipped = VarianceCorrected(0.1, ((0, 4),), 10, 3, target="clipped")
    assert clipped._targets(own, received) == [2.0]  # the mean, clipped to 2 x own


def test_dfedsam_mixes_q_times_per_round_each_with_fresh_models() -> None:
    rule = DFedSam(lr=1.0, local_steps=2, gossip_steps=2, max_age=10, degree=1)
    state = rule.init(torch.zeros(1, dtype=torch.float64))
    state = rule.mix(state, (), payload([6.0], 1, degree=1), now=0.0, peer=1)
    assert float(state["x"]) == 0.0  # nothing owed before K local steps
    for _ in range(2):
        state = rule.apply_gradient(state, torch.zeros(1, dtype=torch.float64), now=0.0)
    state = rule.mix(state, (), payload([6.0], 1, degree=1), now=0.0, peer=1)
    assert float(state["x"]) == 3.0  # the copy cached meanwhile is unused: Metropolis-Hastings
    state = rule.mix(state, (), payload([6.0], 1, degree=1), now=0.0, peer=1)
    assert float(state["x"]) == 3.0  # the same copy again: no second mix
    state = rule.mix(state, (), payload([4.0], 2, degree=1), now=0.0, peer=1)
    assert float(state["x"]) == 3.5  # w = 1 / (1 + max(1, 1))
    state = rule.mix(state, (), payload([0.0], 3, degree=1), now=0.0, peer=1)
    assert float(state["x"]) == 3.5  # Q = 2 mixes done; the next after K more steps


def test_metropolis_weights_use_the_larger_degree() -> None:
    rule = DFedSam(lr=1.0, local_steps=1, gossip_steps=1, max_age=10, degree=1)
    state = rule.init(torch.zeros(1, dtype=torch.float64))
    state = rule.apply_gradient(state, torch.zeros(1, dtype=torch.float64), now=0.0)
    state = rule.mix(state, (), payload([4.0], 1, degree=3), now=0.0, peer=1)
    assert float(state["x"]) == 1.0  # 4 / (1 + 3)


def test_cached_payloads_are_too_old_after_max_age() -> None:
    rule = Monna(lr=1.0, budget=0, max_age=1.0, degree=1, momentum=0.0, weight_decay=0.0)
    state = rule.init(torch.zeros(1, dtype=torch.float64))
    state = rule.mix(state, (), payload([10.0], 1), now=0.0, peer=1)
    state = rule.apply_gradient(state, torch.zeros(1, dtype=torch.float64), now=5.0)
    assert float(state["x"]) == 0.0
    state = rule.reset_edge(state, 1, now=5.0)
    assert cache.entries(state) == []
