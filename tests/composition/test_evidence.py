"""Lines of evidence: bootstrap intervals, nulls that cannot degenerate silently, task metrics."""
import numpy as np
import pytest
import torch

from vitcircuits.composition.evidence import MIN_NULL, below_floor, bootstrap_intervals, fill_count, judge
from vitcircuits.composition.task_metric import TaskMetric, margin


def test_bootstrap_matches_a_brute_force_resample_and_holds_the_mean():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=(40, 3))
    lo, hi = bootstrap_intervals(values, n_boot=4000, seed=1)
    brute = np.array([values[rng.integers(0, 40, 40)].mean(0) for _ in range(4000)])
    np.testing.assert_allclose(lo, np.quantile(brute, 0.025, axis=0), atol=0.05)
    np.testing.assert_allclose(hi, np.quantile(brute, 0.975, axis=0), atol=0.05)
    assert (lo <= values.mean(0)).all() and (values.mean(0) <= hi).all()
    one_lo, one_hi = bootstrap_intervals(values[:1])
    assert (one_lo == values[0]).all() and (one_hi == values[0]).all()
    two_lo, two_hi = bootstrap_intervals(values[:2], n_boot=2)
    assert (two_lo <= values[:2].mean(0)).all() and (values[:2].mean(0) <= two_hi).all(), "the estimate lies in its own interval"


def test_judge_passes_beyond_the_95th_percentile_and_the_floor():
    null = np.linspace(0.0, 1.0, MIN_NULL)
    q95 = np.quantile(null, 0.95)
    line = judge(q95 + 0.01, 0.5, 2.0, null, floor=0.1)
    assert line.beyond and line.z == pytest.approx((q95 + 0.01 - null.mean()) / null.std(ddof=1)) and not line.null_degenerate
    assert not judge(q95 - 0.01, q95 - 0.2, q95, null, floor=0.1).beyond
    assert not judge(2.0, 1.9, 2.1, null, floor=3.0).beyond, "under the practical floor"
    with pytest.raises(ValueError, match="at least"):
        judge(1.0, 0.9, 1.1, null[: MIN_NULL - 1], floor=0.0)


def test_a_silent_null_rests_on_the_interval_not_on_a_floored_std():
    silent = np.zeros(MIN_NULL)
    line = judge(0.2, 0.05, 0.3, silent, floor=0.1)
    assert line.null_degenerate and line.z is None and line.null_std == 0.0 and line.beyond
    assert not judge(0.2, 0.0, 0.3, silent, floor=0.1).beyond, "an interval reaching the null's value does not pass"
    assert not judge(0.0, 0.0, 0.0, silent, floor=0.1).beyond
    assert all(np.isfinite(v) for v in line.as_dict().values() if isinstance(v, float))


def test_below_floor_has_no_null_and_refuses_an_effect_over_it():
    line = below_floor(0.01, 0.0, 0.02, 0.1)
    assert not line.beyond and line.n_null == 0 and line.null_q95 is None
    with pytest.raises(ValueError, match="needs a null"):
        below_floor(0.2, 0.1, 0.3, 0.1)
    assert fill_count(3) == MIN_NULL - 3 and fill_count(100) == 0


def test_task_metrics():
    logits = torch.tensor([[3.0, 1.0, -1.0], [0.0, 2.0, 1.0]])
    assert margin(logits, torch.tensor([0, 2])).tolist() == pytest.approx([3.0, 0.0])
    metric = TaskMetric("margin")
    assert metric.targets(logits).tolist() == [0, 1]
    assert metric.targets(logits, torch.tensor([2, 2])).tolist() == [2, 2]
    assert metric.floor(torch.tensor([10.0, 30.0])) == pytest.approx(0.2)
    embedding = TaskMetric("embedding")
    clean = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    moved = torch.tensor([[[3.0, 4.5]], [[0.0, 2.0]]])
    assert embedding.value(moved, embedding.targets(clean)).tolist() == pytest.approx([-0.1, 0.0])
    assert embedding.floor(torch.zeros(2)) == 0.01
    with pytest.raises(ValueError, match="unknown task metric"):
        TaskMetric("accuracy")
    with pytest.raises(ValueError, match="embedding metric"):
        TaskMetric("embedding", torch.zeros(2, 3), torch.zeros(2))
