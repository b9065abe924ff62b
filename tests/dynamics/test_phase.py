"""Phase-change fits recover a planted crossing step, with an interval that holds it, and say so
when a metric does not change."""
import numpy as np
import pytest

from vitcircuits.dynamics.phase import PhaseConfig, crossing_step, fit_crossing, fit_lag

STEPS_G = np.unique(np.round(np.logspace(0, 4, 30)))  # log-uniform checkpoints, dense early


def _schedule(center: float, n_images: int = 64, width: float = 0.4, seed: int = 0) -> np.ndarray:
    """Per-image values rising from 0 to a per-image level, half-way at ``center`` on a log axis, plus noise."""
    rng = np.random.default_rng(seed)
    level_I = rng.uniform(0.5, 1.5, n_images)
    rise_G = 1 / (1 + np.exp(-(np.log(STEPS_G) - np.log(center)) / width))
    return level_I[:, None] * rise_G[None] + rng.normal(0, 0.05, (n_images, len(STEPS_G)))


def test_the_crossing_of_a_planted_rise_is_found_within_its_interval():
    fit = fit_crossing(STEPS_G, _schedule(300.0), PhaseConfig(n_boot=400))
    assert fit.step == pytest.approx(300.0, rel=0.15)
    assert fit.lo <= 300.0 <= fit.hi and fit.hi / fit.lo < 1.6
    assert fit.crossed_share == 1.0 and fit.change > 0.5


def test_a_falling_metric_crosses_too():
    fit = fit_crossing(STEPS_G, -_schedule(40.0, seed=1), PhaseConfig(n_boot=200))
    assert fit.step == pytest.approx(40.0, rel=0.15) and fit.change < 0


def test_a_flat_metric_has_no_crossing_and_no_nan():
    fit = fit_crossing(STEPS_G, np.ones((16, len(STEPS_G))), PhaseConfig(n_boot=50))
    assert fit.step is None and fit.lo is None and fit.hi is None and fit.crossed_share == 0.0 and fit.change == 0.0


def test_interpolation_is_linear_in_log_step():
    assert crossing_step(np.array([10.0, 1000.0]), np.array([0.0, 1.0])) == pytest.approx(100.0)
    assert crossing_step(np.array([1.0, 10.0, 100.0]), np.array([0.0, 0.2, 1.0]), fraction=0.2) == pytest.approx(10.0)


def test_the_lag_between_two_rises_is_their_step_ratio():
    a_IG, b_IG = _schedule(100.0, seed=2), _schedule(400.0, seed=3)
    lag = fit_lag(STEPS_G, a_IG, b_IG, PhaseConfig(n_boot=300))
    assert lag.ratio == pytest.approx(4.0, rel=0.25) and lag.lo <= 4.0 <= lag.hi and lag.lo > 1.0
    same = fit_lag(STEPS_G, a_IG, a_IG, PhaseConfig(n_boot=100))
    assert same.ratio == 1.0 and same.lo == same.hi == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="strictly between"):
        PhaseConfig(fraction=1.0)
    with pytest.raises(ValueError, match="positive and increasing"):
        fit_crossing(np.array([0.0, 1.0]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2 checkpoints"):
        fit_crossing(np.array([1.0, 2.0]), np.zeros((3, 3)))
