"""Expert attribution (Eq. 2) against affinities recomputed by hand from the router inputs."""

import pytest
import torch

from uoe_nb.attribution import (
    Affinity,
    attribution_stability,
    expert_affinity,
    split_texts,
    token_count_ranking,
    top_k_overlap,
)
from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import NoMoELayersError, find_moe_layers
from uoe_nb.routing import token_proportions

E, K = 8, 2
LENGTHS = [5, 9, 3, 7, 1, 6]


def _sequences(seed: int = 0, lengths=LENGTHS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _pad(seqs: list[torch.Tensor], width: int | None = None) -> dict[str, torch.Tensor]:
    """Right padding with id 0, optionally wider than the longest sequence."""
    width = width or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _padded_batches(seqs, batch_size=3, extra=0):
    return [
        _pad(seqs[i : i + batch_size], max(len(s) for s in seqs[i : i + batch_size]) + extra)
        for i in range(0, len(seqs), batch_size)
    ]


@pytest.fixture(scope="module")
def qwen():
    # qwen2_moe with norm_topk_prob=False: g = softmax score for the top-K experts, 0 elsewhere.
    return random_model(tiny_config("qwen2_moe", experts=E, top_k=K), seed=0)


def _hand_affinity(model, batches):
    """Eq. 2 from the router's input: logits = x W^T, softmax, top-K, per-sequence means."""
    layers = [lay.layer_index for lay in find_moe_layers(model)]
    gates = {i: model.model.layers[i].mlp.gate for i in layers}
    sums = {i: torch.zeros(E, dtype=torch.float64) for i in layers}
    top1 = {i: torch.zeros(E, dtype=torch.float64) for i in layers}
    assigned = {i: torch.zeros(E, dtype=torch.float64) for i in layers}
    n_seq = 0
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        gates[i].register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
        for i in layers
    ]
    for batch in batches:
        with torch.no_grad():
            model(**batch)
        b, s = batch["input_ids"].shape
        for i in layers:
            logits = (inputs[i].reshape(b * s, -1).double() @ gates[i].weight.double().T).reshape(b, s, E)
            probs = logits.softmax(-1)
            for j in range(b):
                n = int(batch["attention_mask"][j].sum())
                if n == 0:
                    continue
                total = torch.zeros(E, dtype=torch.float64)
                for t in range(n):
                    top = torch.topk(probs[j, t], K).indices
                    total[top] += probs[j, t, top]
                    assigned[i][top] += 1
                    top1[i][int(probs[j, t].argmax())] += 1
                sums[i] += total / n
        n_seq += sum(int(m.sum() > 0) for m in batch["attention_mask"])
    for h in handles:
        h.remove()
    return {i: v / n_seq for i, v in sums.items()}, assigned, top1


def test_affinity_matches_hand_computation_with_padding(qwen):
    batches = _padded_batches(_sequences())
    aff = expert_affinity(qwen, batches)
    scores, assigned, top1 = _hand_affinity(qwen, batches)
    assert aff.layers == [0, 1, 2]
    assert aff.num_sequences == len(LENGTHS) and aff.num_tokens == sum(LENGTHS)
    for layer in aff.layers:
        torch.testing.assert_close(aff.scores[layer].double(), scores[layer], atol=1e-6, rtol=1e-5)
        assert torch.equal(aff.assignment_counts[layer], assigned[layer].long())
        assert torch.equal(aff.top1_counts[layer], top1[layer].long())
        torch.testing.assert_close(aff.proportions[layer].double(), assigned[layer] / assigned[layer].sum())
        # Each token spreads at most mass 1 over its top-K experts.
        assert 0 < float(aff.scores[layer].sum()) <= 1.0


def test_affinity_averages_each_sequence_first(qwen):
    # A long sequence must not outweigh a short one: Eq. 2 is a mean of per-sequence means.
    short, long = _sequences(1, [2, 40])
    both = expert_affinity(qwen, [_pad([short, long])])
    alone = [expert_affinity(qwen, [_pad([s])]) for s in (short, long)]
    for layer in both.layers:
        expected = (alone[0].scores[layer] + alone[1].scores[layer]) / 2
        torch.testing.assert_close(both.scores[layer], expected, atol=1e-6, rtol=1e-5)


def test_padding_does_not_change_affinity(qwen):
    seqs = _sequences(2)
    one_by_one = expert_affinity(qwen, [_pad([s]) for s in seqs])
    packed = expert_affinity(qwen, _padded_batches(seqs, batch_size=4))
    extra_padding = expert_affinity(qwen, _padded_batches(seqs, batch_size=2, extra=5))
    # An all-padding row is ignored, not counted as a sequence.
    with_empty_row = expert_affinity(qwen, [_pad([*seqs[:2], torch.tensor([], dtype=torch.long)], 12)])
    first_two = expert_affinity(qwen, [_pad([s]) for s in seqs[:2]])
    assert with_empty_row.num_sequences == 2
    for layer in one_by_one.layers:
        for other in (packed, extra_padding):
            torch.testing.assert_close(other.scores[layer], one_by_one.scores[layer], atol=1e-6, rtol=1e-5)
            assert torch.equal(other.assignment_counts[layer], one_by_one.assignment_counts[layer])
        torch.testing.assert_close(with_empty_row.scores[layer], first_two.scores[layer], atol=1e-6, rtol=1e-5)


def test_proportions_agree_with_routing_module_and_mode_restored(qwen):
    batches = _padded_batches(_sequences(3))
    qwen.train()
    try:
        aff = expert_affinity(qwen, batches)
        assert qwen.training, "expert_affinity must restore training mode"
    finally:
        qwen.eval()
    props = token_proportions(qwen, batches)
    for layer, p in props.items():
        torch.testing.assert_close(aff.proportions[layer], p)


def test_renormalising_family_uses_raw_scores_by_default_and_applied_weights_on_request():
    # Mixtral renormalises the top-K scores: its applied weights of a token sum to 1, so with
    # gate="applied" a layer's affinities sum to exactly 1; the paper's g (the raw softmax score
    # of each selected expert) sums to less, and matches the hand computation from the router.
    model = random_model(tiny_config("mixtral", experts=E, top_k=K), seed=0)
    batches = _padded_batches(_sequences())
    raw = expert_affinity(model, batches)
    applied = expert_affinity(model, batches, gate="applied")
    by_hand, _, _ = _hand_affinity(model, batches)
    for layer in raw.layers:
        assert float(applied.scores[layer].sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(raw.scores[layer].sum()) < 1.0 - 1e-3
        torch.testing.assert_close(raw.scores[layer].double(), by_hand[layer], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="gate must be"):
        expert_affinity(model, batches, gate="weights")


def test_dense_first_layer_is_absent():
    model = random_model(tiny_config("deepseek_v2", experts=E, top_k=K), seed=0)
    aff = expert_affinity(model, _padded_batches(_sequences()))
    assert aff.layers == [1, 2]
    with pytest.raises(IndexError, match="layer 0"):
        aff.ranking(0)


def _hand_made() -> Affinity:
    scores = {
        0: torch.tensor([0.10, 0.50, 0.40]),
        2: torch.tensor([0.70, 0.20, 0.10]),
        3: torch.tensor([0.30, 0.30, 0.40]),
    }
    assigned = {0: torch.tensor([9, 1, 2]), 2: torch.tensor([5, 3, 4]), 3: torch.tensor([1, 1, 1])}
    top1 = {0: torch.tensor([0, 2, 4]), 2: torch.tensor([3, 3, 0]), 3: torch.tensor([1, 1, 1])}
    return Affinity(
        scores=scores,
        proportions={k: v.float() / v.sum() for k, v in assigned.items()},
        assignment_counts=assigned,
        top1_counts=top1,
        num_sequences=3,
        num_tokens=6,
    )


def test_target_and_rankings_on_hand_made_affinity():
    aff = _hand_made()
    assert aff.target == (2, 0)  # 0.7 is the highest top-1 affinity of all layers
    assert aff.layer_ranking() == [2, 0, 3]  # top-1 values 0.7, 0.5, 0.4
    assert aff.ranking(0) == [1, 2, 0]
    assert aff.ranking(3) == [2, 0, 1]  # tie between experts 0 and 1 keeps the lower index first
    assert aff.top_experts(0, 2) == [1, 2]
    assert aff.top1(3) == pytest.approx(0.4)
    assert token_count_ranking(aff, 0) == [0, 2, 1]  # token counts disagree with affinity here
    assert token_count_ranking(aff, 0, by="top1") == [2, 1, 0]
    rows = aff.table()
    assert [r["layer"] for r in rows] == [0, 2, 3]
    assert rows[1] == {"layer": 2, "expert": 0, "affinity": pytest.approx(0.7), "proportion": pytest.approx(5 / 12),
                       "layer_rank": 1}  # fmt: skip
    assert [r["layer_rank"] for r in rows] == [2, 1, 3]


def test_random_expert_excludes_target_and_is_seeded():
    aff = _hand_made()
    picks = [aff.random_expert(seed) for seed in range(40)]
    assert all(layer == 2 and expert != 0 for layer, expert in picks)
    assert {e for _, e in picks} == {1, 2}  # both other experts occur
    assert aff.random_expert(7) == aff.random_expert(7)
    assert {aff.random_expert(s, exclude_target=False)[1] for s in range(40)} == {0, 1, 2}
    # In another layer the expert attribution would pick there (layer 0: expert 1) is excluded.
    assert all(aff.random_expert(s, layer=0) != (0, 1) for s in range(40))
    with pytest.raises(IndexError, match="layer 5"):
        aff.random_expert(0, layer=5)


def test_top_k_overlap_and_bad_k():
    assert top_k_overlap([1, 2, 3, 4], [3, 1, 0, 2], 2) == 0.5
    assert top_k_overlap([1, 2, 3, 4], [3, 1, 0, 2], 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be"):
        top_k_overlap([1, 2], [2, 1], 3)
    aff = _hand_made()
    with pytest.raises(ValueError, match="k must be"):
        aff.top_experts(0, 4)
    with pytest.raises(ValueError, match="by must be"):
        token_count_ranking(aff, 0, by="weights")
    with pytest.raises(ValueError, match="at least one MoE layer"):
        Affinity({}, {}, {}, {}, 0, 0)


def test_stability(qwen):
    batches = _padded_batches(_sequences(4, [6] * 8))
    assert attribution_stability(qwen, batches, batches, k=3) == {0: 1.0, 1: 1.0, 2: 1.0}
    other = _padded_batches(_sequences(5, [6] * 8))
    got = attribution_stability(qwen, batches, other, k=3)
    a, b = expert_affinity(qwen, batches), expert_affinity(qwen, other)
    for layer, value in got.items():
        top_a = set(torch.topk(a.scores[layer], 3).indices.tolist())
        top_b = set(torch.topk(b.scores[layer], 3).indices.tolist())
        assert value == pytest.approx(len(top_a & top_b) / 3)
    with pytest.raises(ValueError, match="k must be"):
        attribution_stability(qwen, batches, other, k=E + 1)


def test_split_texts():
    texts = [f"text {i}" for i in range(11)]
    a, b = split_texts(texts, seed=0)
    assert not set(a) & set(b) and sorted(a + b) == sorted(texts)
    assert (len(a), len(b)) == (5, 6)
    assert split_texts(texts, seed=0) == (a, b)
    assert split_texts(texts, seed=1) != (a, b)
    with pytest.raises(ValueError, match="at least two"):
        split_texts(["only one"], seed=0)


def test_bad_input(qwen):
    with pytest.raises(ValueError, match="no batches"):
        expert_affinity(qwen, [])
    empty = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="no real tokens"):
        expert_affinity(qwen, [empty])
    with pytest.raises(ValueError, match="input_ids"):
        expert_affinity(qwen, [{"ids": torch.ones(1, 3, dtype=torch.long)}])
    dense = random_model(tiny_config("dense"), seed=0)
    with pytest.raises(NoMoELayersError):
        expert_affinity(dense, _padded_batches(_sequences()))


def test_zoo_target_expert_prefers_the_forget_topic():
    from uoe_nb.routing import batches
    from uoe_nb.world import build_world
    from uoe_nb.zoo import load_zoo_model

    model, tok = load_zoo_model("tiny-qwen2moe")
    world = build_world(0)
    forget = expert_affinity(model, list(batches(tok, world.forget_corpus[:64])))
    retain = expert_affinity(model, list(batches(tok, world.retain_corpus[:64])))
    layer, expert = forget.target
    assert forget.scores[layer][expert] == max(float(forget.scores[lay].max()) for lay in forget.layers)
    # The attributed expert is far more engaged by the forget topic than by general text.
    assert forget.scores[layer][expert] > 3 * retain.scores[layer][expert]
