"""Attribution reports: Spearman against a hand computation, agreement and specificity rows on
hand-made affinities, and subset stability on a zoo model against direct affinity calls."""

import math
import random
import re

import numpy as np
import pytest
import torch

from uoe_nb.attribution import Affinity, expert_affinity, top_k_overlap
from uoe_nb.attribution_report import ranking_agreement, spearman, subset_stability, target_specificity
from uoe_nb.routing import batches


def _affinity(
    scores: dict[int, list[float]], counts: dict[int, list[int]], top1: dict[int, list[int]]
) -> Affinity:
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()}
    c = {k: torch.tensor(v) for k, v in counts.items()}
    return Affinity(
        scores=t,
        proportions={k: v.double() / v.sum() for k, v in c.items()},
        assignment_counts=c,
        top1_counts={k: torch.tensor(v) for k, v in top1.items()},
        num_sequences=1,
        num_tokens=10,
    )


def test_spearman_matches_pearson_of_average_ranks():
    a = [0.3, 0.1, 0.1, 0.5, 0.2]
    b = [4, 1, 3, 5, 2]
    ranks_a = [4, 1.5, 1.5, 5, 3]  # the two 0.1 share ranks 1 and 2
    expected = np.corrcoef(ranks_a, b)[0, 1]
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_undefined_and_bad_input():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least two"):
        spearman([1], [1])


def test_ranking_agreement_rows():
    aff = _affinity(
        scores={0: [0.5, 0.1, 0.3, 0.2], 2: [0.1, 0.2, 0.3, 0.4]},
        counts={0: [9, 1, 5, 3], 2: [1, 9, 3, 5]},
        top1={0: [6, 0, 3, 1], 2: [0, 4, 2, 3]},
    )
    rows = {r["layer"]: r for r in ranking_agreement(aff, k=2)}
    assert rows[0]["spearman_assignments"] == pytest.approx(1.0)
    assert rows[0]["top_k_overlap"] == 1.0 and rows[0]["same_top1"]
    # Layer 2: affinity ranks 3, 2, 1, 0; counts rank 1, 3, 2, 0.
    assert rows[2]["top_k_overlap"] == 0.5 and not rows[2]["same_top1"]
    assert rows[2]["spearman_assignments"] == pytest.approx(spearman([0.1, 0.2, 0.3, 0.4], [1, 9, 3, 5]))


def test_target_specificity_rows():
    forget = _affinity(
        scores={1: [0.05, 0.4, 0.1], 3: [0.3, 0.0, 0.2]},
        counts={1: [1, 1, 1], 3: [1, 1, 1]},
        top1={1: [1, 1, 1], 3: [1, 1, 1]},
    )
    retain = _affinity(
        scores={1: [0.3, 0.1, 0.2], 3: [0.0, 0.5, 0.1]},
        counts={1: [1, 1, 1], 3: [1, 1, 1]},
        top1={1: [1, 1, 1], 3: [1, 1, 1]},
    )
    rows = {r["layer"]: r for r in target_specificity(forget, retain)}
    assert forget.target == (1, 1)
    assert rows[1] == {
        "layer": 1,
        "expert": 1,
        "forget_affinity": pytest.approx(0.4),
        "retain_affinity": pytest.approx(0.1),
        "ratio": pytest.approx(4.0),
        "retain_rank": 3,
        "is_target": True,
    }
    assert rows[3]["expert"] == 0 and rows[3]["ratio"] == math.inf and not rows[3]["is_target"]
    other = _affinity({1: [1.0, 0.0]}, {1: [1, 1]}, {1: [1, 1]})
    with pytest.raises(ValueError, match="different layers"):
        target_specificity(forget, other)


@pytest.fixture(scope="module")
def zoo_qwen():
    from uoe_nb.world import build_world
    from uoe_nb.zoo import load_zoo_model

    model, tok = load_zoo_model("tiny-qwen2moe")
    return model, tok, build_world(0).forget_corpus[:24]


def test_subset_stability_matches_direct_affinities(zoo_qwen):
    model, tok, texts = zoo_qwen
    rows = subset_stability(model, tok, texts, sizes=(2, 8), seeds=(0, 1), k=3, batch_size=8)
    full = expert_affinity(model, batches(tok, texts, batch_size=8))
    assert len(rows) == 2 * 2 * len(full.layers)
    assert {(r["size"], r["seed"]) for r in rows} == {(2, 0), (2, 1), (8, 0), (8, 1)}

    # Recompute one draw by hand: the seeded shuffle, then the first and the next `size` texts.
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)
    a = expert_affinity(model, batches(tok, [texts[i] for i in order[:8]], batch_size=8))
    b = expert_affinity(model, batches(tok, [texts[i] for i in order[8:16]], batch_size=8))
    for r in rows:
        assert 0.0 <= r["disjoint_overlap"] <= 1.0 and 0.0 <= r["full_overlap"] <= 1.0
        if r["size"] == 8 and r["seed"] == 1:
            layer = r["layer"]
            assert r["tokens"] == a.num_tokens
            assert r["disjoint_overlap"] == top_k_overlap(a.ranking(layer), b.ranking(layer), 3)
            assert r["full_overlap"] == top_k_overlap(a.ranking(layer), full.ranking(layer), 3)
            assert r["target"] == a.target
            assert r["same_target"] == (a.target == full.target)


def test_subset_stability_rejects_bad_sizes_and_k(zoo_qwen):
    model, tok, texts = zoo_qwen
    with pytest.raises(ValueError, match="disjoint subsets"):
        subset_stability(model, tok, texts, sizes=(13,), seeds=(0,))
    with pytest.raises(ValueError, match="positive"):
        subset_stability(model, tok, texts, sizes=(0,), seeds=(0,))
    with pytest.raises(ValueError, match="k must be"):
        subset_stability(model, tok, texts, sizes=(2,), seeds=(0,), k=99)
    with pytest.raises(ValueError, match="seed"):
        subset_stability(model, tok, texts, sizes=(2,), seeds=())


def _two_layer_affinity(scale: float = 1.0) -> Affinity:
    return _affinity({0: [0.1 * scale, 0.5 * scale, 0.2 * scale], 1: [0.9 * scale, 0.3 * scale, 0.4 * scale]},
                     {0: [1, 5, 2], 1: [8, 1, 3]}, {0: [0, 3, 1], 1: [6, 0, 1]})  # fmt: skip


def test_stability_by_size_sums_up_layers_and_seeds():
    from uoe_nb.attribution_report import stability_by_size

    rows = [{"size": s, "seed": seed, "tokens": 10 * s + seed, "layer": layer, "disjoint_overlap": d,
             "full_overlap": f, "same_target": seed == 0}
            for s, seed, layer, d, f in [(1, 0, 0, 0.5, 0.5), (1, 0, 1, 0.0, 0.5), (1, 1, 0, 1.0, 1.0),
                                        (1, 1, 1, 0.5, 0.5), (4, 0, 0, 1.0, 1.0), (4, 0, 1, 1.0, 0.5)]]  # fmt: skip
    table = stability_by_size(rows, target_layer=1)
    assert list(table.index) == [1, 4]
    assert table.loc[1, "tokens"] == pytest.approx(10.5) and table.loc[1, "disjoint_mean"] == pytest.approx(0.5)
    assert table.loc[1, "same_target"] == pytest.approx(0.5) and table.loc[4, "same_target"] == 1.0
    assert table.loc[1, "disjoint_overlap (target layer)"] == pytest.approx(0.25)
    assert table.loc[4, "full_overlap (target layer)"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="layer 3"):
        stability_by_size(rows, target_layer=3)
    with pytest.raises(ValueError, match="no subset_stability rows"):
        stability_by_size([], target_layer=0)


def test_attribution_figures_draw_what_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.attribution_report import plot_affinity, plot_share_vs_affinity, plot_subset_stability

    forget, retain = _two_layer_affinity(), _two_layer_affinity(0.5)
    assert forget.target == (1, 0)
    fig = plot_affinity(forget, retain)
    layer0, layer1 = fig.axes
    assert [p.get_height() for p in layer0.patches] == pytest.approx([0.5, 0.2, 0.1])  # by forget affinity
    red = [p.get_facecolor()[:3] for p in layer1.patches]
    assert red[0] == pytest.approx(matplotlib.colors.to_rgb("tab:red"))  # the target, first in layer 1
    assert red[1] == pytest.approx(matplotlib.colors.to_rgb("tab:blue"))
    assert layer1.get_lines()[0].get_ydata() == pytest.approx([0.45, 0.2, 0.15])  # retain, same order
    other = _affinity({0: [1.0, 0.0, 0.0]}, {0: [1, 0, 0]}, {0: [1, 0, 0]})
    with pytest.raises(ValueError, match="different layers"):
        plot_affinity(forget, other)

    rows = [{"size": s, "seed": seed, "tokens": 100 * s, "layer": layer, "disjoint_overlap": 0.5 + 0.1 * s,
             "full_overlap": 1.0, "same_target": True} for s in (1, 2) for seed in (0, 1) for layer in (0, 1)]  # fmt: skip
    fig = plot_subset_stability(rows, 1, k=1, num_experts=3)
    left, right = fig.axes
    labels = left.get_legend_handles_labels()[1]
    assert labels[:2] == ["chance (1/3)", "paper: 0.87 (100k-token subsets)"]  # the lines, then the curves
    assert labels[2:] == ["layer 0", "layer 1 (target)"]
    assert left.get_xscale() == "log" and right.get_lines()[0].get_ydata() == pytest.approx([1.0, 1.0])
    no_paper = plot_subset_stability(rows, 1, k=1, num_experts=3, paper=None)
    assert "paper" not in " ".join(no_paper.axes[0].get_legend_handles_labels()[1])
    with pytest.raises(ValueError, match="k must be"):
        plot_subset_stability(rows, 1, k=4, num_experts=3)

    fig = plot_share_vs_affinity(forget)
    points = fig.axes[0].collections
    assert len(points) == 3  # one per layer and the circled target
    assert points[-1].get_offsets().tolist() == [[pytest.approx(8 / 12), pytest.approx(0.9)]]


def test_attribution_summary_agrees_with_the_pieces_it_sums_up(zoo_qwen):
    from uoe_nb.attribution_report import attribution_summary, paper_comparison
    from uoe_nb.world import build_world

    model, tok, texts = zoo_qwen
    retain = build_world(0).retain_corpus[:16]
    row = attribution_summary(model, tok, texts, retain, name="qwen", top_k=3, seeds=(0, 1), batch_size=8)
    full = expert_affinity(model, batches(tok, texts, batch_size=8))
    layer, expert = full.target
    assert row["target (layer, expert)"] == f"({layer}, {expert})" and row["tokens"] == full.num_tokens
    assert row["top-1 affinity"] == pytest.approx(full.top1(layer)) and row["k"] == 3
    halves = [r for r in subset_stability(model, tok, texts, (12,), seeds=(0, 1), k=3, batch_size=8, full=full)
              if r["layer"] == layer]  # fmt: skip
    assert row["disjoint halves, top-k overlap"] == pytest.approx(np.mean([r["disjoint_overlap"] for r in halves]))
    assert row["halves choosing the target"] == pytest.approx(np.mean([r["same_target"] for r in halves]))
    assert row["forget / retain affinity"] > 0 and 0 < row["UOE trainable fraction (%)"] < 100
    assert sum(int(n) for n in re.findall(r" x(\d+)", row["targets of the halves"])) == 2  # one per seed
    table = paper_comparison(row, label="ours")
    assert table.loc["tokens used for attribution", "ours"] == f"{full.num_tokens:,}"
    assert table.loc["top-6 overlap, two disjoint subsets", "paper (Qwen1.5-MoE / DeepSeek-V2-Lite)"] == "0.87 (v2)"
    assert table.loc["parameters UOE trains"].iloc[0] == "0.06 % (Table 3)"
    assert table.loc["top-1 affinity of the chosen layer"].iloc[0] == "0.211 (Table 7, RWKU)"
