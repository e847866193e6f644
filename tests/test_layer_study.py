"""The design-ablation helpers of Chapter 5: variants, anchor targets, runs on copies, overlap means."""

import math

import pytest
import torch

from uoe_nb import routing, scopes
from uoe_nb.attribution import expert_affinity
from uoe_nb.layer_study import (
    Variant,
    expert_variant,
    layer_rank_variants,
    mean_overlap,
    overlap_curve,
    random_expert_variant,
    run_variant,
)
from uoe_nb.moe import changed_parameters, find_moe_layers
from uoe_nb.unlearn import StepRecord, UnlearnConfig
from uoe_nb.world import build_world
from uoe_nb.zoo import load_zoo_model


@pytest.fixture(scope="module")
def setup():
    world = build_world(0)
    model, tok = load_zoo_model("tiny-qwen2moe")
    aff = expert_affinity(model, routing.batches(tok, world.forget_corpus[:64], batch_size=16, max_length=128))
    return world, model, tok, aff


def test_layer_rank_variants_follow_the_affinity_ranking(setup):
    _, _, _, aff = setup
    order = aff.layer_ranking()
    variants = layer_rank_variants(aff, (1, 2, -1))
    assert [v.target for v in variants] == [(order[0], aff.ranking(order[0])[0]),
                                            (order[1], aff.ranking(order[1])[0]),
                                            (order[-1], aff.ranking(order[-1])[0])]  # fmt: skip
    assert variants[0].target == aff.target
    for v in variants:
        assert v.scope.kind == "uoe" and (v.scope.layer, v.scope.expert) == v.target
    # the same layer twice is kept once; ranks out of range are refused
    assert len(layer_rank_variants(aff, (1, -len(order)))) == 1
    with pytest.raises(IndexError):
        layer_rank_variants(aff, (0,))
    with pytest.raises(IndexError):
        layer_rank_variants(aff, (len(order) + 1,))


def test_random_expert_variant_is_seeded_and_never_the_target(setup):
    _, _, _, aff = setup
    picks = {random_expert_variant(aff, seed).target for seed in range(12)}
    assert all(layer == aff.target[0] for layer, _ in picks)
    assert aff.target not in picks
    assert len(picks) > 1
    assert random_expert_variant(aff, 3) == random_expert_variant(aff, 3)


def test_run_variant_trains_in_place_gives_the_model_back_and_keeps_a_patch(setup):
    from uoe_nb.patches import apply_patch, revert_patch

    world, model, tok, aff = setup
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    variant = random_expert_variant(aff, 0)
    layer, expert = variant.target
    cfg = UnlearnConfig(method="ga", lr=3e-3, steps=3, eval_every=3, monitor_docs=8, seed=0)
    seen = {}

    def inspect(result):  # runs while the model is unlearned
        seen["same model"] = result.model is model
        return changed_parameters(result.model, before)

    row, result = run_variant(model, tok, world.forget_corpus[:16], world.retain_corpus[:16], variant, cfg,
                              affinity=aff, inspect=inspect, keep_patch=True, base_name="tiny")  # fmt: skip
    # trained in place (no copy), then given back bitwise; the result holds no model
    assert seen["same model"] and result.model is None
    assert not changed_parameters(model, before)
    changed = result.inspected
    lay = next(m for m in find_moe_layers(model) if m.layer_index == layer)
    assert changed and set(changed) <= set(lay.expert_parameters()) | set(lay.router_parameters())
    for name in lay.expert_parameters():
        if name in changed:
            assert changed[name].nonzero().flatten().tolist() == [expert]
    # the patch holds exactly that change: applied, the unlearned model is back
    assert set(result.patch.names) == set(changed)
    assert (result.patch.info.layer, result.patch.info.expert) == variant.target
    apply_patch(model, result.patch)
    assert set(changed_parameters(model, before)) == set(changed)
    revert_patch(model, result.patch)
    assert not changed_parameters(model, before)
    assert result.target == variant.target  # the anchor points at the trained expert
    assert row["variant"] == variant.label and row["step"] == 3
    assert math.isnan(row["FA"])  # no evaluator given
    assert row["overlap forget"] == pytest.approx(mean_overlap(result.best, "forget"))
    assert {f"overlap_forget/{i}" for i in aff.layers} <= set(row)


def test_run_variant_with_a_scope_that_uses_the_attributed_target(setup):
    world, model, tok, aff = setup
    variant = Variant("top-3", scopes.k_experts(aff.target[0], 3), group="k")
    cfg = UnlearnConfig(method="ga", lr=3e-3, steps=2, eval_every=2, monitor_docs=8)
    row, result = run_variant(model, tok, world.forget_corpus[:8], world.retain_corpus[:8], variant, cfg,
                              affinity=aff)  # fmt: skip
    assert result.target == aff.target
    assert result.scope.experts == {aff.target[0]: sorted(aff.top_experts(aff.target[0], 3))}
    assert row["group"] == "k" and row["trainable"] == result.scope.num_trainable


def test_expert_variant_with_shared_experts():
    v = expert_variant("shared", 0, 2, include_shared=True)
    assert v.scope.include_shared and v.target == (0, 2)


def test_mean_overlap_and_curve():
    rec = StepRecord(step=0, overlap_forget={0: 1.0, 1: 0.5}, overlap_retain={0: 0.25, 1: 0.75})
    assert mean_overlap(rec) == pytest.approx(0.75)
    assert mean_overlap(rec, "retain") == pytest.approx(0.5)
    assert mean_overlap(rec, layers=[1]) == pytest.approx(0.5)
    assert math.isnan(mean_overlap(StepRecord(step=1)))
    with pytest.raises(ValueError):
        mean_overlap(rec, "other")

    class _Result:
        history = [rec, StepRecord(step=10, overlap_forget={0: 0.5, 1: 0.0})]

    curve = overlap_curve(_Result())
    assert [r["step"] for r in curve] == [0, 10]
    assert curve[1]["mean"] == pytest.approx(0.25) and curve[1]["layer 1"] == 0.0
    assert torch.tensor([r["mean"] for r in curve]).le(1).all()


def test_run_variant_refuses_a_patch_of_a_lora_run_before_training(setup):
    world, model, tok, aff = setup
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(method="ga", lr=3e-3, steps=1, monitor_docs=4)
    with pytest.raises(ValueError, match="LoRA run has no patch"):
        run_variant(model, tok, world.forget_corpus[:4], world.retain_corpus[:4], Variant("lora", scopes.lora()),
                    cfg, affinity=aff, keep_patch=True)  # fmt: skip
    assert not changed_parameters(model, before)


def test_compare_variants_attributes_once_and_gives_the_model_back(setup):
    world, model, tok, aff = setup
    from uoe_nb.layer_study import compare_variants

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(method="ga", lr=3e-3, steps=2, eval_every=2, monitor_docs=4, max_length=64)
    variants = [Variant("UOE", scopes.uoe(), group="UOE"),
                Variant("every layer", scopes.per_layer_experts("all"), group="layers")]  # fmt: skip

    def evaluate(m):
        return {"forget_accuracy": 0.5, "utility_accuracy": 0.5}

    table, affinity = compare_variants(model, tok, world.forget_corpus[:64], world.retain_corpus[:8], variants, cfg,
                                       evaluate=evaluate, attribution_docs=64)  # fmt: skip
    assert affinity.target == aff.target  # the same 64 documents as the fixture's attribution
    assert list(table.index) == ["UOE", "every layer"]
    n_layers = len(find_moe_layers(model))
    assert table.loc["every layer", "trainable"] == n_layers * table.loc["UOE", "trainable"]
    assert not changed_parameters(model, state)
    with pytest.raises(ValueError, match="no variants"):
        compare_variants(model, tok, world.forget_corpus[:8], [], [], cfg, evaluate=evaluate)


def _two_runs():
    from types import SimpleNamespace

    def run(kept):
        history = [StepRecord(step=0, overlap_forget={0: 1.0, 1: 1.0}),
                   StepRecord(step=10, overlap_forget=kept)]  # fmt: skip
        return SimpleNamespace(history=history, best=history[-1])

    return {"UOE": run({0: 0.5, 1: 0.25}), "every layer": run({0: 0.75, 1: 1.0})}


def test_plot_layer_overlap_bars_per_layer_and_curves():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.layer_study import plot_layer_overlap

    fig = plot_layer_overlap(_two_runs(), target_layer=0)
    kept, curve = fig.axes
    assert [p.get_height() for p in kept.patches] == [0.5, 0.25, 0.75, 1.0]  # run by run, layer by layer
    assert [t.get_text() for t in kept.get_xticklabels()] == ["layer 0", "layer 1"]
    lines = curve.get_lines()
    assert len(lines) == 2 and lines[0].get_ydata().tolist() == [1.0, 0.375]
    with pytest.raises(ValueError, match="target layer 5"):
        plot_layer_overlap(_two_runs(), target_layer=5)
    with pytest.raises(ValueError, match="no runs"):
        plot_layer_overlap({})


def test_plot_kept_one_point_per_variant():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.layer_study import plot_kept

    rows = {"UOE": {"FA": 0.3, "UT": 0.7}, "3 experts": {"FA": 0.25, "UT": 0.6}}
    fig = plot_kept(rows, {"forget_accuracy": 0.9, "utility_accuracy": 1.0}, target=0.35)
    ax = fig.axes[0]
    points = [c.get_offsets().tolist() for c in ax.collections]
    assert points == [[[0.3, 0.7]], [[0.25, 0.6]], [[0.9, 1.0]]]
    assert ax.get_legend_handles_labels()[1] == ["UOE", "3 experts", "before unlearning"]
    assert list(ax.get_lines()[0].get_xdata()) == [0.35, 0.35]
    assert len(plot_kept(rows).axes[0].collections) == 2


def test_beside_paper_puts_the_papers_values_first_and_nan_where_it_has_none():
    from uoe_nb.layer_study import PAPER_TABLE5, PAPER_TABLE6, beside_paper

    ours = {1: {"FA": 0.3, "UT": 0.7, "step": 20, "trainable": 10}, 2: {"FA": 0.2, "UT": 0.6, "step": 30, "trainable": 20}}
    table = beside_paper(ours, PAPER_TABLE5, index="experts", source="paper model", label="ours (tiny)",
                         columns=("FA", "UT", "trainable"))  # fmt: skip
    assert table.index.name == "experts" and list(table.index) == [1, 2]
    assert list(table.columns) == ["paper UT (paper model)", "ours (tiny) FA", "ours (tiny) UT", "ours (tiny) trainable"]
    assert table.loc[1, "paper UT (paper model)"] == 0.51 and math.isnan(table.loc[2, "paper UT (paper model)"])
    assert table.loc[2, "ours (tiny) trainable"] == 20
    named = beside_paper({"random": ours[1]}, PAPER_TABLE6, index="expert", source="Qwen, RMU", label="ours",
                         names={"random": "random (3)"})  # fmt: skip
    assert list(named.index) == ["random (3)"] and named.loc["random (3)", "paper FA (Qwen, RMU)"] == 0.3505
    with pytest.raises(KeyError, match="step"):
        beside_paper({1: {"FA": 0.3, "UT": 0.7}}, PAPER_TABLE5, index="k", source="s", label="ours")
    with pytest.raises(ValueError, match="no rows"):
        beside_paper({}, PAPER_TABLE5, index="k", source="s", label="ours")


def test_rank_table_ranks_layers_by_top1_affinity():
    from uoe_nb.attribution import Affinity
    from uoe_nb.layer_study import rank_table

    scores = {0: torch.tensor([0.1, 0.2]), 1: torch.tensor([0.9, 0.3]), 3: torch.tensor([0.4, 0.5])}
    counts = {k: torch.tensor([1, 1]) for k in scores}
    aff = Affinity(scores=scores, proportions={k: v / 2 for k, v in counts.items()}, assignment_counts=counts,
                   top1_counts=counts, num_sequences=1, num_tokens=2)  # fmt: skip
    runs = {(1, 0): {"FA": 0.3, "UT": 0.8, "step": 10}, (0, 1): {"FA": 0.3, "UT": 0.5, "step": 40}}
    table = rank_table(aff, runs, label="ours")
    assert list(table.index) == ["1 of 3", "3 of 3"]
    assert table.loc["3 of 3", "layer"] == 0 and table.loc["3 of 3", "expert"] == 1
    assert table.loc["1 of 3", "top-1 affinity"] == pytest.approx(0.9) and table.loc["3 of 3", "ours UT"] == 0.5
    with pytest.raises(ValueError, match="layer 2"):
        rank_table(aff, {(2, 0): runs[(1, 0)]}, label="ours")


def test_variants_table_puts_the_papers_note_for_each_design_choice_beside_ours():
    from uoe_nb.layer_study import paper_notes, variants_table

    def row(group, fa):
        return {"group": group, "trainable": 10, "step": 20, "FA": fa, "UT": 0.7, "overlap forget": 0.5,
                "overlap retain": 0.6}  # fmt: skip

    rows = {"UOE": row("UOE", 0.3), "3 experts": row("experts", 0.25), "mine": row("custom", 0.2)}
    notes = paper_notes(rows)
    assert notes["UOE"] == "GA+UOE .5012 (Qwen) / .51 (DeepSeek); Table 5: .51"
    assert notes["3 experts"] == "Table 5: 3 experts .4856, 6 experts .4652" and notes["mine"] == ""
    assert paper_notes({"r": row("layer rank", 0.3)})["r"] == "Table 7: UT falls for the lowest ranks (.4262, .2355)"
    table = variants_table(rows, label="ours (tiny)")
    assert list(table.index) == ["UOE", "3 experts", "mine"]
    assert table.loc["3 experts", "ours (tiny) FA"] == 0.25 and table.loc["mine", "overlap retain"] == 0.6
    with pytest.raises(ValueError, match="no variants"):
        variants_table({}, label="ours")
