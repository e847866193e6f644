"""Every loss against its formula, computed independently with explicit loops in plain Python."""

import math

import pytest
import torch

from uoe_nb import objectives as obj
from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import capture_routing

MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])  # right padding


def _rand(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(requires_grad)


def _real_positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def _log_softmax_row(row):
    m = max(row)
    z = math.log(sum(math.exp(x - m) for x in row)) + m
    return [x - z for x in row]


# ---------------------------------------------------------------------------------------
# NLL, GA, retain NLL
# ---------------------------------------------------------------------------------------


def test_per_sequence_nll_matches_loop():
    logits = _rand(3, 5, 7, seed=1, requires_grad=True)
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    total, count = obj.per_sequence_nll(logits, ids, MASK)
    for b in range(3):
        expected, n = 0.0, 0
        for t in range(4):
            if MASK[b, t] and MASK[b, t + 1]:
                expected -= _log_softmax_row(logits[b, t].tolist())[int(ids[b, t + 1])]
                n += 1
        assert total[b].item() == pytest.approx(expected, rel=1e-5)
        assert count[b].item() == n
    assert count.tolist() == [3, 1, 4]
    total.sum().backward()
    assert logits.grad is not None and logits.grad[1, 2:].abs().sum() == 0  # padding gets no gradient


def test_token_mean_nll_equals_the_model_loss():
    model = random_model(tiny_config("dense"), seed=0)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = model(**batch, labels=ids).loss
        got = obj.token_mean_nll(model, batch)
        total, count = obj.sequence_nll(model, batch)
        from_logits = obj.sequence_nll(model(**batch).logits, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert count.tolist() == [8, 8]
    torch.testing.assert_close(from_logits[0], total)


def test_ga_and_retain_nll_average_over_all_tokens():
    nll_sum = torch.tensor([6.0, 1.0, 8.0], requires_grad=True)
    n_tokens = torch.tensor([3.0, 1.0, 4.0])
    # Token-weighted: 15 / 8, not the mean of per-sequence means (2 + 1 + 2) / 3.
    assert obj.ga_loss(nll_sum, n_tokens).item() == pytest.approx(-15 / 8)
    loss = obj.retain_nll_loss(nll_sum, n_tokens)
    assert loss.item() == pytest.approx(15 / 8)
    loss.backward()
    torch.testing.assert_close(nll_sum.grad, torch.full((3,), 1 / 8))
    with pytest.raises(ValueError, match="no predicted tokens"):
        obj.ga_loss(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        obj.ga_loss(torch.zeros(2), torch.ones(3))


# ---------------------------------------------------------------------------------------
# KL retain term
# ---------------------------------------------------------------------------------------


def test_retain_kl_matches_loop():
    logits = _rand(3, 5, 6, seed=3, requires_grad=True)
    ref = _rand(3, 5, 6, seed=4, requires_grad=True)
    got = obj.retain_kl_loss(logits, ref, MASK)
    terms = []
    for b, t in _real_positions(MASK):
        lp, lr = _log_softmax_row(logits[b, t].tolist()), _log_softmax_row(ref[b, t].tolist())
        terms.append(sum(math.exp(r) * (r - p) for p, r in zip(lp, lr, strict=True)))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert got.item() > 0
    got.backward()
    assert logits.grad.abs().sum() > 0 and ref.grad is None  # the reference is frozen
    same = obj.retain_kl_loss(logits.detach(), logits.detach().clone(), MASK)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # Padding positions do not count: changing them changes nothing.
    moved = ref.detach().clone()
    moved[1, 3] += 10
    assert obj.retain_kl_loss(logits, moved, MASK).item() == pytest.approx(got.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------
# NPO, SimNPO
# ---------------------------------------------------------------------------------------


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_npo_matches_formula():
    cur = torch.tensor([3.0, 5.0, 2.5], requires_grad=True)
    ref = torch.tensor([2.0, 5.5, 2.5], requires_grad=True)
    beta = 0.7
    got = obj.npo_loss(cur, ref, beta)
    expected = -(2 / beta) * sum(_logsig(beta * (c - r)) for c, r in [(3, 2), (5, 5.5), (2.5, 2.5)]) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert cur.grad.abs().sum() > 0 and ref.grad is None
    assert (cur.grad < 0).all()  # lowering the loss raises the forget NLL


def test_npo_at_the_reference_is_two_over_beta_log_two():
    nll = torch.tensor([40.0, 7.0])
    for beta in (0.001, 0.1, 1.0):
        assert obj.npo_loss(nll, nll.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-5)


def test_npo_per_token():
    cur, ref, n = torch.tensor([12.0, 6.0]), torch.tensor([8.0, 6.0]), torch.tensor([4.0, 2.0])
    got = obj.npo_loss(cur, ref, 1.0, per_token=True, n_tokens=n)
    expected = -2 * (_logsig(12 / 4 - 8 / 4) + _logsig(0.0)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Summed NLL saturates where the per-token mean does not.
    big_cur, big_ref, many = torch.tensor([400.0]), torch.tensor([300.0]), torch.tensor([128.0])
    assert obj.npo_loss(big_cur, big_ref, 1.0).item() < 1e-30
    assert obj.npo_loss(big_cur, big_ref, 1.0, per_token=True, n_tokens=many).item() > 0.1
    with pytest.raises(ValueError, match="needs n_tokens"):
        obj.npo_loss(cur, ref, 1.0, per_token=True)
    with pytest.raises(ValueError, match="per_token=True"):
        obj.npo_loss(cur, ref, 1.0, n_tokens=n)
    with pytest.raises(ValueError, match="at least one predicted token"):
        obj.npo_loss(cur, ref, 1.0, per_token=True, n_tokens=torch.tensor([3.0, 0.0]))


def test_simnpo_matches_formula():
    total = torch.tensor([3.0, 12.0, 0.4], requires_grad=True)
    count = torch.tensor([2.0, 4.0, 2.0])  # mean NLL 1.5, 3.0, 0.2
    for beta, delta in ((4.5, 0.0), (2.0, 1.0)):
        got = obj.simnpo_loss(total, count, beta, delta)
        expected = -(2 / beta) * sum(_logsig(beta * (x - delta)) for x in (1.5, 3.0, 0.2)) / 3
        assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert (total.grad < 0).all()
    one = obj.simnpo_loss(torch.tensor([2.0]), torch.tensor([2.0]))
    assert one.item() == pytest.approx(-(2 / 4.5) * _logsig(4.5), rel=1e-6)
    # a sequence of one token predicts nothing: refused instead of an infinite loss
    with pytest.raises(ValueError, match="at least one predicted token"):
        obj.simnpo_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))


def test_top_k_kl_is_exact_on_the_partition_and_below_the_full_kl():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 50, generator=g) * 3
    cur = (ref + torch.randn(2, 5, 50, generator=g)).requires_grad_(True)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    full = obj.retain_kl_loss(cur, ref, mask)
    top = obj.reference_top_k(ref, mask, 8)
    assert top[0].shape == (8, 8) and top[1].shape == (8, 8)  # 8 real tokens, k = 8
    approx = obj.retain_kl_top_k_loss(cur, top, mask)
    assert 0 < approx.item() <= full.item() + 1e-6
    # with k = vocab - 1 the rest bucket is one token: the KL is exact
    exact = obj.retain_kl_top_k_loss(cur, obj.reference_top_k(ref, mask, 49), mask)
    assert exact.item() == pytest.approx(full.item(), rel=1e-4)
    # identical distributions: zero; and it has gradients for the current logits
    assert obj.retain_kl_top_k_loss(ref, top, mask).item() == pytest.approx(0.0, abs=1e-5)
    approx.backward()
    assert cur.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="k must be an int"):
        obj.reference_top_k(ref, mask, 50)


def test_npo_bad_input():
    with pytest.raises(ValueError, match="beta"):
        obj.npo_loss(torch.ones(2), torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="beta"):
        obj.simnpo_loss(torch.ones(2), torch.ones(2), -1.0)
    with pytest.raises(ValueError, match="same shape"):
        obj.npo_loss(torch.ones(2), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        obj.npo_loss(torch.ones(2, 2), torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match="1-D"):
        obj.simnpo_loss(torch.ones(0), torch.ones(0))


# ---------------------------------------------------------------------------------------
# RMU
# ---------------------------------------------------------------------------------------


def test_rmu_control_vector():
    u = obj.rmu_control_vector(64, 6.5, seed=3)
    assert u.shape == (64,) and u.dtype == torch.float32
    assert u.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert (u >= 0).all() and u.std() > 0  # uniform [0, 1) direction, not a constant
    assert torch.equal(u, obj.rmu_control_vector(64, 6.5, seed=3))
    assert not torch.equal(u, obj.rmu_control_vector(64, 6.5, seed=4))
    torch.testing.assert_close(obj.rmu_control_vector(64, 13.0, seed=3), 2 * u)
    assert obj.rmu_control_vector(8, 1.0, seed=0, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="hidden_size"):
        obj.rmu_control_vector(0, 1.0, seed=0)
    with pytest.raises(ValueError, match="coefficient"):
        obj.rmu_control_vector(8, 0.0, seed=0)


def test_rmu_losses_match_loops():
    hidden = _rand(3, 5, 4, seed=5, requires_grad=True)
    frozen = _rand(3, 5, 4, seed=6, requires_grad=True)
    control = obj.rmu_control_vector(4, 3.0, seed=0)
    forget = obj.rmu_forget_loss(hidden, control, MASK)
    retain = obj.rmu_retain_loss(hidden, frozen, MASK)
    pos = _real_positions(MASK)
    expected_f = sum((hidden[b, t, d].item() - control[d].item()) ** 2 for b, t in pos for d in range(4))
    expected_r = sum((hidden[b, t, d].item() - frozen[b, t, d].item()) ** 2 for b, t in pos for d in range(4))
    assert forget.item() == pytest.approx(expected_f / (len(pos) * 4), rel=1e-5)
    assert retain.item() == pytest.approx(expected_r / (len(pos) * 4), rel=1e-5)
    (forget + retain).backward()
    assert hidden.grad[0, 4].abs().sum() == 0 and hidden.grad[0, 0].abs().sum() > 0  # padding: no gradient
    assert frozen.grad is None
    assert obj.rmu_retain_loss(hidden, hidden.detach().clone(), MASK).item() == 0.0
    with pytest.raises(ValueError, match="control"):
        obj.rmu_forget_loss(hidden, torch.zeros(5), MASK)
    with pytest.raises(ValueError, match="same shape"):
        obj.rmu_retain_loss(hidden, frozen[:, :4], MASK)
    with pytest.raises(ValueError, match="mask has shape"):
        obj.rmu_forget_loss(hidden, control, MASK[:, :4])


# ---------------------------------------------------------------------------------------
# Router terms: anchor (Eq. 3) and retain router
# ---------------------------------------------------------------------------------------


def _softmax(logits):
    return logits.softmax(-1)


def test_anchor_loss_matches_eq3_and_released_code():
    scores = _softmax(_rand(3, 5, 6, seed=7)).requires_grad_(True)
    target = 4
    got_sum = obj.anchor_loss(scores, MASK, target)
    got_mean = obj.anchor_loss(scores, MASK, target, reduction="mean")
    pos = _real_positions(MASK)
    per_token = [
        sum((scores[b, t, i].item() - (1.0 if i == target else 0.0)) ** 2 for i in range(6)) for b, t in pos
    ]
    assert got_sum.item() == pytest.approx(sum(per_token) / len(pos), rel=1e-6)
    # The released code: F.mse_loss(onehot, scores) over the real tokens.
    real = scores.detach()[MASK.bool()]
    code = torch.nn.functional.mse_loss(torch.nn.functional.one_hot(torch.full((len(pos),), target), 6).float(), real)
    assert got_mean.item() == pytest.approx(code.item(), rel=1e-6)
    assert got_sum.item() == pytest.approx(6 * got_mean.item(), rel=1e-6)
    got_sum.backward()
    assert scores.grad[:, :, target][MASK.bool()].lt(0).all()  # descent raises the target's score
    assert scores.grad[1, 2:].abs().sum() == 0


def test_anchor_loss_zero_at_one_hot_and_ignores_padding():
    one_hot = torch.nn.functional.one_hot(torch.full((3, 5), 2), 6).float()
    assert obj.anchor_loss(one_hot, MASK, 2).item() == 0.0
    assert obj.anchor_loss(one_hot, MASK, 3).item() == pytest.approx(2.0)
    padded = one_hot.clone()
    padded[1, 4] = torch.tensor([0.5, 0.5, 0, 0, 0, 0])
    assert obj.anchor_loss(padded, MASK, 2).item() == 0.0
    flat = obj.anchor_loss(one_hot.reshape(15, 6), MASK.reshape(15), 3)  # [tokens, E] works too
    assert flat.item() == pytest.approx(2.0)


def test_anchor_loss_trains_the_router_of_a_real_model():
    model = random_model(tiny_config("qwen2_moe", experts=8, top_k=2), seed=0)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with capture_routing(model, layers=[1], detach=False) as cap:
        model(input_ids=ids, attention_mask=mask)
    loss = obj.anchor_loss(cap[1][0].scores, cap[1][0].mask, 5)
    loss.backward()
    router = model.model.layers[1].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert model.model.layers[2].mlp.gate.weight.grad is None


def test_anchor_loss_bad_input():
    scores = torch.full((3, 5, 6), 1 / 6)
    with pytest.raises(ValueError, match="out of range"):
        obj.anchor_loss(scores, MASK, 6)
    with pytest.raises(ValueError, match="out of range"):
        obj.anchor_loss(scores, MASK, -1)
    with pytest.raises(ValueError, match="reduction"):
        obj.anchor_loss(scores, MASK, 0, reduction="none")
    with pytest.raises(ValueError, match="mask has shape"):
        obj.anchor_loss(scores, MASK.T, 0)
    with pytest.raises(ValueError, match="no real token"):
        obj.anchor_loss(scores, torch.zeros_like(MASK), 0)
    with pytest.raises(ValueError, match="num_experts"):
        obj.anchor_loss(torch.ones(6), torch.ones(1), 0)


def test_retain_router_loss():
    scores = _softmax(_rand(3, 5, 6, seed=8)).requires_grad_(True)
    ref = _softmax(_rand(3, 5, 6, seed=9)).requires_grad_(True)
    got = obj.retain_router_loss(scores, ref, MASK)
    pos = _real_positions(MASK)
    expected = sum(sum((scores[b, t, i].item() - ref[b, t, i].item()) ** 2 for i in range(6)) for b, t in pos)
    assert got.item() == pytest.approx(expected / len(pos), rel=1e-6)
    got.backward()
    assert scores.grad.abs().sum() > 0 and ref.grad is None
    assert obj.retain_router_loss(scores, scores.detach().clone(), MASK).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        obj.retain_router_loss(scores, ref[:, :, :5], MASK)
    with pytest.raises(ValueError, match="no real token"):
        obj.retain_router_loss(scores, ref, torch.zeros_like(MASK))


def test_nll_and_kl_bad_input():
    logits = torch.zeros(2, 4, 5)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch, seq, vocab"):
        obj.per_sequence_nll(logits[0], ids)
    with pytest.raises(ValueError, match="do not match"):
        obj.per_sequence_nll(logits, ids[:, :3])
    with pytest.raises(ValueError, match="at least two tokens"):
        obj.per_sequence_nll(logits[:, :1], ids[:, :1])
    with pytest.raises(ValueError, match="no real token"):
        obj.per_sequence_nll(logits, ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="input_ids"):
        obj.sequence_nll(logits, {"ids": ids})
    with pytest.raises(ValueError, match="same shape"):
        obj.retain_kl_loss(logits, logits[:, :3], torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        obj.retain_kl_loss(logits, logits, torch.ones(2, 3))
