"""GRIP and TRACE (uoe_nb.stability, UnlearnConfig options): definitions, hand computations, refusals."""

import pytest
import torch

from uoe_nb import objectives, stability
from uoe_nb.attribution import expert_affinity
from uoe_nb.moe import capture_routing
from uoe_nb.routing import batches as make_batches
from uoe_nb.unlearn import UnlearnConfig, unlearn
from uoe_nb.world import build_world
from uoe_nb.zoo import load_zoo_model


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def _logits(model, tok, texts, layer):
    with torch.no_grad(), capture_routing(model, layers=[layer]) as cap:
        for b in make_batches(tok, texts, batch_size=4, max_length=128):
            model(**b)
    return torch.cat([r.logits[r.mask.bool()] for r in cap[layer]])


def _grip_run(world, grip, retain):
    model, tok = load_zoo_model("tiny-qwen2moe")
    cfg = UnlearnConfig(method="ga", scope="uoe", lr=3e-2, steps=15, eval_every=15, monitor_docs=4, grip=grip,
                        grip_energy=1.0, grip_docs=len(retain), batch_size=4)  # fmt: skip
    forget = world.forget_corpus[:16]
    layer = expert_affinity(model, make_batches(tok, forget, batch_size=4, max_length=128)).target[0]
    before = (_logits(model, tok, retain, layer), _logits(model, tok, forget, layer))
    result = unlearn(model, forget, retain, cfg, tokenizer=tok)
    after = (_logits(model, tok, retain, layer), _logits(model, tok, forget, layer))
    return result, before, after


def test_grip_keeps_retain_router_logits_and_moves_forget_ones(world):
    # few short retain documents: their router inputs span fewer directions than the hidden size
    retain = [t[:60] for t in world.retain_corpus[:3]]
    result, (r0, f0), (r1, f1) = _grip_run(world, True, retain)
    grip = result.stability["grip"]
    (layer, rank), = grip.ranks().items()
    assert 0 < rank < 64 and grip.bases[layer].shape == (64, rank)
    assert (r1 - r0).abs().max() < 1e-4, "GRIP let the router logits on its retain inputs move"
    assert (f1 - f0).abs().max() > 1e-2, "the router did not train on forget inputs"
    _, (r0, _), (r1, _) = _grip_run(world, False, retain)
    assert (r1 - r0).abs().max() > 1e-2, "without GRIP the retain logits should move"


def test_subspace_basis_energy():
    x = torch.tensor([[3.0, 0, 0], [0, 1.0, 0], [0, 0, 0.1]])
    gram = x.T @ x  # energies 9, 1, 0.01
    assert stability.subspace_basis(gram, 0.5).shape == (3, 1)
    assert stability.subspace_basis(gram, 0.95).shape == (3, 2)
    u = stability.subspace_basis(gram, 1.0)
    assert u.shape == (3, 3) and torch.allclose(u.T @ u, torch.eye(3), atol=1e-6)


def test_null_space_projection_with_bias():
    router = torch.nn.Linear(4, 3, bias=True)
    x = torch.randn(2, 4)
    aug = torch.cat([x, torch.ones(2, 1)], 1)
    ns = stability.RouterNullSpace(bases={0: stability.subspace_basis(aug.T @ aug, 1.0)}, energy=1.0)
    ns._targets[0] = (router.weight, router.bias)
    ns._start[0] = ns._joined(router.weight, router.bias).detach().clone()
    before = router(x).detach()
    with torch.no_grad():
        router.weight.add_(torch.randn(3, 4))
        router.bias.add_(torch.randn(3))
    ns.project()
    assert torch.allclose(router(x), before, atol=1e-5)


def test_match_frequencies_one_expert_by_hand():
    sel = torch.tensor([True, True] + [False] * 8).unsqueeze(1)  # retain frequency 0.2
    w = stability.match_frequencies(sel, torch.tensor([0.5]))
    # f_F / f_R = 0.5 / 0.2 on its tokens, (1 - 0.5) / (1 - 0.2) on the rest; mean already 1
    assert torch.allclose(w, torch.tensor([2.5, 2.5] + [0.625] * 8))
    # cut at 2: [2, 2, 0.625 x 8] has mean 0.9, so the weights become those / 0.9
    w = stability.match_frequencies(sel, torch.tensor([0.5]), max_weight=2.0)
    assert torch.allclose(w, torch.tensor([2.0, 2.0] + [0.625] * 8) / 0.9)


def test_match_frequencies_two_experts_match_targets():
    g = torch.Generator().manual_seed(0)
    sel = torch.rand(200, 2, generator=g) < torch.tensor([0.1, 0.3])
    target = torch.tensor([0.3, 0.4])
    w = stability.match_frequencies(sel, target, max_weight=100.0).double()
    got = (w.unsqueeze(1) * sel.double()).sum(0) / w.sum()
    assert torch.allclose(got, target.double(), atol=1e-6)
    assert abs(float(w.mean()) - 1) < 1e-6


def test_critical_experts_rule():
    forget = {1: torch.tensor([0.5, 0.1, 0.3, 0.2])}
    retain = {1: torch.tensor([0.1, 0.2, 0.3, 0.0])}
    # expert 0 exceeds, 1 does not, 2 ties (not above), 3 has no retain token to weight
    assert stability.critical_experts(forget, retain, {1: [0, 1, 2, 3]}) == [(1, 0)]
    assert stability.critical_experts(forget, retain, {1: [0, 1, 2, 3]}, ratio=6.0) == []
    assert stability.critical_experts(forget, retain, {1: [1, 2]}) == []


def test_weighted_retain_nll_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ones = mask.float()
    plain = objectives.retain_nll_loss(*objectives.per_sequence_nll(logits, ids, mask))
    assert torch.allclose(stability.weighted_retain_nll(logits, ids, mask, ones), plain)
    w = torch.tensor([[2.0, 1, 1, 1, 0], [0.5, 3, 0, 0, 0]])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none")
    counted = (mask[:, 1:] * mask[:, :-1]).reshape(-1).float()
    by_hand = (w[:, :-1].reshape(-1) * counted * nll).sum() / counted.sum()
    assert torch.allclose(stability.weighted_retain_nll(logits, ids, mask, w), by_hand)
    ref = torch.randn(2, 5, 7, generator=g)
    kl = objectives.retain_kl_loss(logits, ref, mask)
    assert torch.allclose(stability.weighted_retain_kl(logits, ref, mask, ones), kl)
    top = objectives.reference_top_k(ref, mask, 3)
    assert torch.allclose(stability.weighted_retain_kl_top_k(logits, top, mask, ones),
                          objectives.retain_kl_top_k_loss(logits, top, mask))  # fmt: skip
    h, h0 = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    assert torch.allclose(stability.weighted_rmu_retain(h, h0, mask, ones), objectives.rmu_retain_loss(h, h0, mask))


def test_trace_weights_in_a_run(world):
    model, tok = load_zoo_model("tiny-qwen2moe")
    cfg = UnlearnConfig(method="graddiff", scope="uoe", lr=1e-3, steps=3, eval_every=3, monitor_docs=4, trace=True,
                        trace_max_weight=100.0)  # fmt: skip
    result = unlearn(model, world.forget_corpus[:32], world.retain_corpus[:32], cfg, tokenizer=tok)
    trace = result.stability["trace"]
    layer, expert = result.target
    assert trace.critical == [(layer, expert)], "UOE's target expert is forget-heavy by construction"
    assert trace.forget[layer, expert] > trace.retain[layer, expert]
    assert abs(trace.weighted[layer, expert] - trace.forget[layer, expert]) < 1e-5
    real = torch.cat([w[w > 0] for w in trace.weights])
    assert abs(float(real.mean()) - 1) < 1e-4 and result.steps_run == 3


def test_defaults_off_and_validation():
    cfg = UnlearnConfig()
    assert cfg.grip is False and cfg.trace is False
    with pytest.raises(ValueError, match="method 'ga' has none"):
        UnlearnConfig(method="ga", trace=True).validate()
    with pytest.raises(ValueError, match="weight is 0"):
        UnlearnConfig(method="graddiff", trace=True, retain_weight=0.0).validate()
    with pytest.raises(ValueError, match="trains no router"):
        UnlearnConfig(scope="experts", grip=True).validate()
    with pytest.raises(ValueError, match="trains no router"):
        UnlearnConfig(scope="lora", grip=True).validate()
    for bad in ({"grip_energy": 0.0}, {"grip_energy": 1.5}, {"grip_docs": 0}, {"trace_ratio": -1.0},
                {"trace_max_weight": 0.5}, {"grip": 1}):  # fmt: skip
        with pytest.raises(ValueError):
            UnlearnConfig(**bad).validate()
    UnlearnConfig(method="rmu", trace=True, grip=True).validate()  # RMU+UOE: both apply


def test_refusals_at_run_time(world):
    model, tok = load_zoo_model("tiny-qwen2moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="retain set"):
        unlearn(model, world.forget_corpus[:8], [], UnlearnConfig(grip=True, steps=1), tokenizer=tok)
    with pytest.raises(ValueError, match="retain set"):
        unlearn(model, world.forget_corpus[:8], [], UnlearnConfig(method="npo", trace=True, steps=1), tokenizer=tok)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a refused run changed the model"


def test_study_frame_means_over_seeds_and_counts_the_operating_point():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.stability_study import StabilityRun, plot_study, stabilisers, study_frame

    labels = [s.label for s in stabilisers(alpha=1.0, retain_router_weight=10.0)]
    assert labels == ["none", "anchor (α=1)", "GRIP", "TRACE", "retain-router (10)"]
    assert stabilisers()[2].options == {"anchor_weight": 0.0, "grip": True}

    def run(label, seed, fa, ut, reached):
        row = {"FA": fa, "UT": ut, "reached": reached, "overlap forget": 0.5, "overlap retain": 0.8,
               "routing share": 0.1 * seed}  # fmt: skip
        return StabilityRun("m", label, seed, 1e-2, row, [(0, 0.9, 0.9), (10, fa, ut)])

    runs = [run("GRIP", 0, 0.4, 0.9, False), run("GRIP", 1, 0.2, 0.7, True), run("none", 0, 0.3, 0.6, True)]
    frame = study_frame(runs, {"m": {"oracle": {"FA": 0.25, "UT": 1.0}}})
    assert list(frame.index) == [("m", "oracle"), ("m", "GRIP"), ("m", "none")]
    assert frame.loc[("m", "GRIP"), "FA"] == pytest.approx(0.3)
    assert frame.loc[("m", "GRIP"), "UT"] == pytest.approx(0.8)
    assert frame.loc[("m", "GRIP"), "reached"] == "1/2" and frame.loc[("m", "none"), "reached"] == "1/1"
    assert frame.loc[("m", "GRIP"), "routing share"] == pytest.approx(0.05)
    fig = plot_study(runs)
    assert len(fig.axes[0].get_lines()) == 2 + 2  # GRIP and none (first seed), two marker lines
