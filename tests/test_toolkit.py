"""The kind toolkit's small parts: metrics, controls and their one convention, splits, the untestable rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelprobe.toolkit import controls, metrics
from modelprobe.toolkit.behaviour import rate_summary, untestable_reason
from modelprobe.toolkit.prompts import split_indices

LOGITS = torch.tensor([[2.0, 1.0, 0.0, 3.0], [0.0, 5.0, 5.0, -1.0]])
ANSWERS = torch.tensor([0, 2])


def test_metrics_at_the_last_position():
    assert metrics.logit_diff(LOGITS, ANSWERS, torch.tensor([1, 1])).tolist() == [1.0, 0.0]
    assert metrics.rank(LOGITS, ANSWERS).tolist() == [1, 0]  # a tie does not count against the answer
    assert metrics.accuracy(LOGITS, ANSWERS).tolist() == [0.0, 0.0]  # argmax of a tie is the first
    p = metrics.prob(LOGITS, ANSWERS)
    assert torch.allclose(p, LOGITS.softmax(-1)[[0, 1], [0, 2]])
    assert torch.allclose(metrics.logprob(LOGITS, ANSWERS), p.log())
    assert metrics.kl(LOGITS, LOGITS).tolist() == [0.0, 0.0]
    assert (metrics.kl(LOGITS, LOGITS.flip(-1)) > 0).all()
    with pytest.raises(ValueError, match="needs the wrong tokens"):
        metrics.metric_values(LOGITS, "logit_diff", ANSWERS)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.metric_values(LOGITS, "vibes", ANSWERS)


def test_one_control_convention():
    assert controls.beats_control(controls.ALPHA) and not controls.beats_control(controls.ALPHA + 1e-9)
    assert controls.alternative_for("at_least") == "greater" and controls.alternative_for("at_most") == "less"
    null = np.linspace(0, 1, 99)
    assert controls.empirical_control(2.0, null, "at_least") < 0.05 < controls.empirical_control(0.5, null, "at_least")
    mine, theirs = np.ones(30), np.zeros(30)
    assert controls.paired_control(mine, theirs, "at_least", seed=0) <= controls.ALPHA
    assert controls.paired_control(mine, theirs, "at_most", seed=0) > controls.ALPHA


@pytest.mark.parametrize("planned", [19, 20, 50, 100, 199])
def test_sequential_empirical_null_stops_only_where_the_full_count_agrees(planned):
    """Over many seeded nulls (some far, some near the observation), wherever `null_settled` stops, the
    drawn p-value is on the full count's side of alpha, and it stops early on both sides."""
    rng = np.random.default_rng(planned)
    stopped_beats = stopped_misses = 0
    for trial in range(300):
        null = rng.normal(size=planned) + rng.choice([-3.0, -1.5, 0.0, 1.5])
        full = controls.beats_control(controls.empirical_control(1.0, null, "at_least"))
        for k in range(planned + 1):
            if controls.null_settled(1.0, null[:k], planned, "greater"):
                drawn = controls.beats_control(controls.empirical_control(1.0, null[:k], "at_least"))
                assert drawn == full, (trial, k)
                stopped_beats += k < planned and full
                stopped_misses += k < planned and not full
                break
    assert stopped_misses > 0 and (controls.hit_limit(planned) < 1 or stopped_beats > 0)  # 0: beating needs all


def test_hit_limit_is_the_full_counts_edge():
    for planned in (1, 18, 19, 20, 39, 100, 1000):
        h = controls.hit_limit(planned)
        assert h == -1 or controls.beats_control((1 + h) / (1 + planned))
        assert not controls.beats_control((2 + h) / (1 + planned))
    assert controls.hit_limit(100) == 4 and controls.hit_limit(18) == -1 and controls.hit_limit(19) == 0


def test_draw_sequentially_stops_when_settled_and_counts_what_it_drew():
    calls: list[tuple[int, int]] = []

    def draw(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        return np.arange(start, stop, dtype=float)

    got = controls.draw_sequentially(draw, 20, 8, lambda v: len(v) >= 10)
    assert got.tolist() == list(range(16)) and calls == [(0, 8), (8, 16)]
    calls.clear()
    assert len(controls.draw_sequentially(draw, 20, 8, None)) == 20 and calls == [(0, 20)]
    assert len(controls.draw_sequentially(draw, 20, 8, lambda v: False)) == 20
    detail = controls.sequential_detail(16, 20, True)
    assert detail["drawn"] == 16 and detail["planned"] == 20 and "16 of 20" in detail["sequential"]


def test_random_vectors_sources_and_labels_are_seeded_and_well_formed():
    d = controls.random_unit_directions(5, 16, seed=3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(5)) and torch.equal(d, controls.random_unit_directions(5, 16, 3))
    like = torch.full((16,), 2.0)
    assert torch.allclose(controls.same_norm_vectors(4, like, 0).norm(dim=-1), torch.full((4,), like.norm()))
    src = controls.random_source(50, seed=1)
    assert (src != np.arange(50)).all() and src.min() >= 0 and src.max() < 50
    with pytest.raises(ValueError, match="at least two"):
        controls.random_source(1, 0)
    labels = list("aabbbc")
    shuffled = controls.shuffled_labels(labels, seed=2)
    assert sorted(shuffled) == sorted(labels) and shuffled == controls.shuffled_labels(labels, seed=2)


def test_split_is_one_seeded_permutation_so_twins_stay_paired():
    a = split_indices(20, {"train": 8, "validation": 4, "test": 8}, seed=5)
    b = split_indices(20, {"train": 8, "validation": 4, "test": 8}, seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(20))
    with pytest.raises(ValueError, match="asks for 21 rows of 20"):
        split_indices(20, {"train": 21}, seed=0)


def test_untestable_rule():
    assert untestable_reason("rate_drop", np.array([0] * 19 + [1]), 0.1, "x").startswith("untestable: the base rate "
                                                                                        "on x is 0.05 (1/20)")
    assert untestable_reason("rate_drop", np.array([0, 1] * 10), 0.1, "x") is None
    assert "nothing to induce" in untestable_reason("rate_rise", np.ones(20, dtype=bool), 0.1, "x")
    assert untestable_reason("rate", np.ones(20, dtype=bool), 0.1, "x") is None
    assert rate_summary(np.array([True, False, True, True])) | {"ci": None} == {"rate": 0.75, "ci": None, "k": 3, "n": 4}


def test_states_at_a_token_match_single_runs(tiny_subject):
    from modelprobe.subject import Site
    from modelprobe.toolkit.activations import mean_state, states_at

    subject = tiny_subject("llama")
    ids = subject.encode_all(["how do i make a cake", "tell me", "write a poem about the day now please"])
    sites = [Site("resid_post", 0), Site("attn.z", 1)]
    got = states_at(subject, ids, sites, position=-2, batch_size=2)
    for i, x in enumerate(ids):
        one = subject.forward(subject.make_batch([x], [0]), sites)
        for site in sites:
            assert torch.allclose(got[site][i], one.at(site, -2)[0], atol=1e-5)
    mean = mean_state(subject, ids, sites, position=-2)
    assert torch.allclose(mean[sites[0]], got[sites[0]].mean(0), atol=1e-5)
    assert got[sites[1]].shape == (3, subject.sitemap.n_heads, subject.sitemap.d_head)
