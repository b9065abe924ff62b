"""A planted schedule through the whole per-checkpoint measurement: synthetic checkpoints of a
planted model whose layer-0 head 0 turns from a global head into a modular one on a known
schedule. The fitted formation step must recover the crossing computed from the construction."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitcircuits.dynamics.formation import formation
from vitcircuits.dynamics.measure import MeasureConfig, measure_checkpoint
from vitcircuits.dynamics.phase import fit_crossing
from vitcircuits.groundtruth.planted import PlantedConfig, build_planted_heads
from vitcircuits.heads.atlas import AtlasConfig
from vitcircuits.heads.offsets import OffsetGeometry
from vitcircuits.organisms.series import checkpoint_steps

LAST, MIDPOINT = 1000, 60.0
STEPS = checkpoint_steps(LAST, 30)
CONFIG = PlantedConfig(n_heads=6)


def gain(step):
    """The share of the modular head's query at a step: 0 at step 1, 1 at the last, a logistic in
    log(step) around MIDPOINT (the head is global at 0: it has no query)."""
    z = lambda t: 1.0 / (1.0 + np.exp(-3.0 * (np.log(t) - np.log(MIDPOINT))))  # noqa: E731
    return (z(np.asarray(step, dtype=np.float64)) - z(1.0)) / (z(LAST) - z(1.0))


def true_neighbour_mass(step):
    """From the construction alone: a patch query with n grid neighbours scores them at
    ``sharpness × gain`` and every other patch at 0, so after renormalising over the P patch keys
    its neighbour mass is ``n e^a / (n e^a + P − n)``; averaged over the queries."""
    geometry = OffsetGeometry(*CONFIG.grid, radius=1)
    n_Q = geometry.neighbour_mask_PP().sum(-1).double().numpy()
    P = len(n_Q)
    a = CONFIG.sharpness * gain(step)[..., None]
    return (n_Q * np.exp(a) / (n_Q * np.exp(a) + P - n_Q)).mean(-1)


def checkpoint(planted, step):
    model = copy.deepcopy(planted.model)
    cfg = model.cfg
    with torch.no_grad():
        W_Q = model.blocks[0].attn.qkv.weight.view(3, cfg.n_heads, cfg.d_head, cfg.d_model)[0]
        W_Q[0] *= float(gain(step))
    return model


@pytest.fixture(scope="module")
def series():
    planted = build_planted_heads(CONFIG)
    assert planted.truth[(0, 0)] == "modular" and planted.truth[(0, 5)] == "global"
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [SimpleNamespace(images_BCHW=images[s : s + 8], indices=tuple(range(s, s + 8)), labels_B=None) for s in (0, 8)]
    config = MeasureConfig(atlas=AtlasConfig(n_boot=20))
    return [measure_checkpoint(checkpoint(planted, step), batches, config, "planted") for step in STEPS]


def test_the_fit_recovers_the_planted_crossing(series):
    fine = np.logspace(0, np.log10(LAST), 200_001)
    truth = true_neighbour_mass(fine)
    known = fine[np.argmax(truth >= (truth[0] + truth[-1]) / 2)]
    assert 20 < known < MIDPOINT  # before the schedule's midpoint: the softmax saturates early
    measured = np.stack([m.heads_ILHM[:, 0, 0, 0] for m in series], axis=1)
    assert np.allclose(measured.mean(0), true_neighbour_mass(np.asarray(STEPS)), atol=2e-3)  # the atlas reads the construction
    fit = fit_crossing(np.asarray(STEPS), measured)
    assert fit.step == pytest.approx(known, rel=0.05) and fit.lo <= fit.step <= fit.hi and fit.crossed_share == 1.0
    assert series[0].atlas.row(0, 0).kind == "global" and series[-1].atlas.row(0, 0).kind == "modular"


def test_heads_that_do_not_change_have_no_crossing_and_the_circuit_follows_the_modular_head(series):
    result = formation(STEPS, series, supported=[], groups={})
    unchanged = result.find("head", "L0H3", "neighbour_mass")  # the planted self head: same weights throughout
    assert unchanged.crossing.step is None and unchanged.crossing.change == 0 and unchanged.crossing.crossed_share == 0
    modular = result.find("head", "L0H0", "modular_score")
    circuit = result.find("circuit", "circuit", "progress")
    assert modular.key and circuit.extra["of"] == "modular heads" and circuit.extra["parts"] == 1
    assert circuit.crossing.step == pytest.approx(modular.crossing.step, rel=0.1)
    assert all(m.crossing.step is None or np.isfinite(m.crossing.step) for m in result.metrics) and result.lags == []
