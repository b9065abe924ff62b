"""Task-level path ablation of single edges, against a two-pass reference built from plain hooks."""
import pytest
import torch

from vitcircuits.composition.ablation import ZStats, ablation_hooks
from vitcircuits.composition.task_metric import TaskMetric
from vitcircuits.composition.task_patching import all_edges, edge_drops, edge_logits, task_edge_effects
from vitcircuits.inputs import ImageOptions
from vitcircuits.models.loading import load_model


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(1)
    loaded = load_model("bundled:shapes-vit", device="cpu")
    batch = next(iter(ImageOptions(images="bundled:shapes", batch_size=24).open(loaded).batches(progress=False)))
    stats = ZStats.empty(loaded.model)
    stats.update(loaded.model, batch.images_BCHW)
    return loaded.model, batch.images_BCHW, batch.labels_B, stats


def _reference(model, images, edge, stats):
    """Pass 1: the sender's output change from a clean and a mean-ablated run (``hook_result``);
    pass 2: the receiver's input recomputed from the residual plus that change, via ``hook_resid_pre``;
    pass 3: the clean run with only that head's input replaced."""
    sl, sh, rl, rh, kind = edge
    grab = lambda store, key: lambda t, hook: store.__setitem__(key, t.clone())  # noqa: E731
    clean, ablated, patched = {}, {}, {}
    with model.hooks([(f"blocks.{sl}.attn.hook_result", grab(clean, "result")), (f"blocks.{rl}.hook_resid_pre", grab(clean, "resid"))]):
        model(images)
    hooks = ablation_hooks([(sl, sh)], "mean", stats, torch.Generator())
    with model.hooks([*hooks, (f"blocks.{sl}.attn.hook_result", grab(ablated, "result"))]):
        model(images)
    delta = ablated["result"][:, :, sh] - clean["result"][:, :, sh]
    with model.hooks([(f"blocks.{rl}.hook_resid_pre", lambda t, hook: clean["resid"] + delta), (f"blocks.{rl}.attn.hook_{kind}", grab(patched, "input"))]):
        model(images)

    def replace(t, hook):
        t = t.clone()
        t[:, :, rh] = patched["input"][:, :, rh]
        return t

    with model.hooks([(f"blocks.{rl}.attn.hook_{kind}", replace)]):
        return model(images)


@pytest.mark.parametrize("edge", [(0, 1, 1, 2, "q"), (0, 3, 2, 0, "k"), (1, 0, 3, 3, "v"), (2, 2, 3, 1, "k")])
def test_edge_ablation_matches_reference(organism, edge):
    model, images, _, stats = organism
    with torch.no_grad():
        ours, reference, clean = edge_logits(model, images, edge, stats), _reference(model, images, edge, stats), model(images)
    assert (ours - clean).abs().max() > 1e-3, "the edge should change the logits at all"
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_a_sender_that_writes_its_mean_has_no_effect(organism):
    model, images, labels, stats = organism
    edge = (0, 1, 2, 3, "v")
    with model.hooks([("blocks.0.attn.hook_z", lambda z, hook: _set_head(z, 1, stats.mean_LHd()[0, 1]))]):
        effects = task_edge_effects(model, images, labels, [edge], stats)
    assert all(abs(effects[edge][key]) < 1e-5 for key in ("margin_drop", "logprob_drop", "accuracy_drop"))


def _set_head(z_BNHd, head, value_d):
    z_BNHd = z_BNHd.clone()
    z_BNHd[:, :, head] = value_d
    return z_BNHd


def test_all_edges_counts_every_later_receiver(organism):
    model = organism[0]
    edges = all_edges(model)
    assert len(edges) == 3 * 4 * 4 * (3 + 2 + 1) and len(set(edges)) == len(edges)
    assert all(sl < rl for sl, _, rl, _, _ in edges) and {e[4] for e in edges} == {"q", "k", "v"}
    assert len(all_edges(model, [2])) == 3 * 4 * 4
    with pytest.raises(ValueError, match="earlier layer"):
        edge_logits(model, organism[1], (2, 0, 2, 1, "q"), organism[3])


def test_task_images_are_a_uniform_sample_in_stream_order():
    from vitcircuits.composition.scan import _reservoir

    batches = [torch.arange(start, start + 10, dtype=torch.float32).view(10, 1, 1, 1) for start in range(0, 100, 10)]
    counts = torch.zeros(100)
    for seed in range(400):
        (sample,) = _reservoir(iter(batches), [10], seed)
        sample = sample.flatten()
        assert len(sample) == 10 and torch.equal(sample, sample.sort().values)
        counts[sample.long()] += 1
    assert counts.min() > 15 and counts.max() < 70, "each image is kept about 40 times in 400 draws"
    assert torch.equal(_reservoir(iter(batches), [500], 0)[0].flatten(), torch.arange(100, dtype=torch.float32))
    together = _reservoir(iter(batches), [7, 20], 3)
    apart = [_reservoir(iter(batches), [n], 3)[0] for n in (7, 20)]
    assert all(torch.equal(a, b) for a, b in zip(together, apart)), "one pass gives each sample as if drawn alone"


def test_a_random_direction_control_keeps_the_senders_norm_token_by_token(organism):
    """Given the sender's own change as the "random" direction, the control is the ablation itself;
    given a direction, the receiver reads exactly the sender's per-token norm along it."""
    model, images, _, stats = organism
    sl, sh, rl, rh, kind = edge = (0, 3, 3, 0, "k")
    _, cache = model.run_with_cache(images, names_filter=f"blocks.{sl}.attn.hook_z")
    z = cache[f"blocks.{sl}.attn.hook_z"][:, :, sh]
    delta_BND = (stats.mean_LHd()[sl, sh] - z) @ model.W_O[sl, sh]
    with torch.no_grad():
        ablated, own = edge_logits(model, images, edge, stats), edge_logits(model, images, edge, stats, delta_BND / delta_BND.norm(dim=-1, keepdim=True))
        flipped = edge_logits(model, images, edge, stats, -delta_BND / delta_BND.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(own, ablated, atol=1e-4, rtol=1e-4)
    assert (flipped - ablated).abs().max() > 1e-2, "the opposite direction is another change"


def test_edge_drops_add_controls_after_those_already_drawn(organism):
    model, images, labels, stats = organism
    metric = TaskMetric("margin")
    edge = (0, 3, 3, 0, "k")
    once = edge_drops(model, images, labels, [edge], stats, metric, {edge: 4})
    twice = edge_drops(model, images, labels, [edge], stats, metric, {edge: 2})
    edge_drops(model, images, labels, [], stats, metric, {edge: 4}, into=twice)
    assert once.random[edge] == pytest.approx(twice.random[edge]) and len(set(once.random[edge])) == 4
    assert once.drops[edge].shape == (len(images),) and torch.equal(once.drops[edge], twice.drops[edge])
