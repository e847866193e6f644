"""The fast path: stopping after layer L, caching layer L's input, running from it.

Every result of the fast path is compared with an ordinary full forward (and backward)
of the same model on the same padded batch.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from uoe_nb.families import random_model, tiny_config
from uoe_nb.fastpath import (
    FastPathMismatchError,
    LayerInputCache,
    batch_key,
    forward_from_layer,
    hidden_after_layer,
    stop_after_layer,
)
from uoe_nb.moe import capture_routing, decoder_layers, find_moe_layers
from uoe_nb.trainable import make_trainable

FAMILIES = ["qwen2_moe", "mixtral", "olmoe", "deepseek_v2"]
NUM_LAYERS = 4


def _batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _labels(batch):
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model = random_model(tiny_config(request.param, layers=NUM_LAYERS, experts=8, top_k=2), seed=0)
    _freeze(model)
    return request.param, model


def _targets(model):
    """L = 0, a middle layer and the last MoE layer."""
    moe = [lay.layer_index for lay in find_moe_layers(model)]
    return sorted({0, NUM_LAYERS // 2, moe[-1]})


class _CallCounter:
    def __init__(self, modules):
        self.counts = [0] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(*_):
            self.counts[i] += 1

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------
# hidden_after_layer / stop_after_layer
# --------------------------------------------------------------------------------------


def test_hidden_after_layer_equals_hidden_states_and_stops(family_model):
    _, model = family_model
    batch = _batch()
    _, layers = decoder_layers(model)
    last_out = {}
    h = layers[-1].register_forward_hook(lambda _m, _a, out: last_out.update(h=out))
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
    h.remove()
    for index in range(NUM_LAYERS):
        counter = _CallCounter([*layers, model.lm_head])
        try:
            with torch.no_grad():
                got = hidden_after_layer(model, batch, index)
        finally:
            counter.remove()
        # hidden_states[i + 1] is layer i's output, except the last entry (after the final norm).
        want = full.hidden_states[index + 1] if index < NUM_LAYERS - 1 else last_out["h"]
        assert got.shape == (3, 10, model.config.hidden_size)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert counter.counts[: index + 1] == [1] * (index + 1)
        assert counter.counts[index + 1 :] == [0] * (NUM_LAYERS - index - 1) + [0]  # later layers, lm_head
    # The last layer's raw output is not the normed hidden state the model reports.
    assert not torch.allclose(last_out["h"], full.hidden_states[-1])


def test_stop_after_layer_swallows_only_its_own_stop_and_cleans_up(family_model):
    _, model = family_model
    batch = _batch()
    _, layers = decoder_layers(model)
    hooks_before = [len(layer._forward_hooks) for layer in layers]
    reached = []
    with torch.no_grad(), stop_after_layer(model, 1) as stop:
        model(**batch, use_cache=False)
        reached.append(True)  # never runs: the forward ended at layer 1
    assert stop.stopped and not reached
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before
    # Other errors pass through, and the hook is removed then too.
    with pytest.raises(ZeroDivisionError), stop_after_layer(model, 1):
        _ = 1 / 0
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before
    # A later ordinary forward runs every layer again.
    counter = _CallCounter(list(layers))
    with torch.no_grad():
        model(**batch)
    counter.remove()
    assert counter.counts == [1] * NUM_LAYERS


def test_hidden_after_layer_keeps_the_graph_for_rmu(family_model):
    _, model = family_model
    target = find_moe_layers(model)[-1]
    selection = make_trainable(model, {target.layer_index: [0, 1]})
    try:
        h = hidden_after_layer(model, _batch(), target.layer_index)
        assert h.requires_grad
        h.pow(2).mean().backward()
        grads = [p.grad for p in selection.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        selection.remove()
        _freeze(model)


# --------------------------------------------------------------------------------------
# forward_from_layer: exact logits, lower layers skipped
# --------------------------------------------------------------------------------------


def test_forward_from_layer_matches_full_forward(family_model):
    _, model = family_model
    batch = _batch()
    _, layers = decoder_layers(model)
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
    for index in _targets(model):
        cache = LayerInputCache(index)
        with torch.no_grad():
            forward_from_layer(model, batch, index, cache, key="b0")  # fills the cache, checks exactness
            assert cache.verified
            counter = _CallCounter(list(layers))
            try:
                out = forward_from_layer(model, batch, index, cache, key="b0", output_layer_hidden=True)
            finally:
                counter.remove()
            want_hidden = hidden_after_layer(model, batch, index)
        torch.testing.assert_close(out.logits, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.layer_hidden, want_hidden, atol=1e-6, rtol=0)
        # Below L nothing runs (the real layers are not even called); L and above run once.
        assert counter.counts == [0] * index + [1] * (NUM_LAYERS - index)
        assert cache.hits == 1 and cache.misses == 1
    # The model is left as it was: its own layers, in order, and a full forward still matches.
    assert list(decoder_layers(model)[1]) == list(layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, use_cache=False).logits, full, atol=0, rtol=0)


def test_run_above_false_runs_only_layer_l(family_model):
    _, model = family_model
    batch = _batch(seed=3)
    _, layers = decoder_layers(model)
    index = NUM_LAYERS // 2
    cache = LayerInputCache(index)
    with torch.no_grad():
        want = hidden_after_layer(model, batch, index)
        forward_from_layer(model, batch, index, cache, key=0, run_above=False)
        counter = _CallCounter([*layers, model.lm_head])
        try:
            out = forward_from_layer(model, batch, index, cache, key=0, run_above=False)
        finally:
            counter.remove()
    assert out.logits is None and out.outputs is None
    torch.testing.assert_close(out.layer_hidden, want, atol=1e-6, rtol=0)
    assert counter.counts == [0, 0, 1, 0, 0]  # layer L only; no layer above, no LM head


def test_gradients_match_full_backward(family_model):
    """GA + the router anchor on layer L (and L+1): the cached path gives the same gradients."""
    _, model = family_model
    batch = _batch(seed=1)
    labels = _labels(batch)
    target = NUM_LAYERS // 2
    with torch.no_grad(), capture_routing(model, [target, target + 1]) as cap:
        model(**batch)
    busy = {i: int(cap.tokens(i, "weights").sum(0).argmax()) for i in (target, target + 1)}
    selection = make_trainable(model, {i: [e] for i, e in busy.items()}, routers=[target, target + 1])
    num_experts = find_moe_layers(model)[0].num_experts
    one_hot = torch.nn.functional.one_hot(torch.tensor(busy[target]), num_experts).float()

    def loss_of(run):
        with capture_routing(model, [target], detach=False) as cap:
            out = run()
        assert len(cap[target]) == 1  # the exactness check's extra forwards are invisible to hooks
        scores = cap.tokens(target, "scores")
        return -out.loss + torch.nn.functional.mse_loss(scores, one_hot.expand_as(scores))

    try:
        full_loss = loss_of(lambda: model(**batch, labels=labels, use_cache=False))
        full_loss.backward()
        want = {n: p.grad.clone() for n, p in zip(selection.names, selection.parameters(), strict=True)}
        model.zero_grad(set_to_none=True)
        cache = LayerInputCache(target)
        fast_loss = loss_of(lambda: forward_from_layer(model, batch, target, cache, 0, labels=labels).outputs)
        fast_loss.backward()
        got = {n: p.grad for n, p in zip(selection.names, selection.parameters(), strict=True)}
        assert torch.allclose(fast_loss, full_loss, atol=1e-6)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
            assert want[name].abs().sum() > 0, f"{name} got no gradient: the comparison would be vacuous"
        # Nothing below L received gradient; the cached tensor carries no graph.
        _, layers = decoder_layers(model)
        below = [p for i in range(target) for p in layers[i].parameters()]
        below += list(model.get_input_embeddings().parameters())
        assert all(p.grad is None for p in below)
        cached = cache.get(model, batch, 0)
        assert not cached.requires_grad and cached.grad_fn is None
    finally:
        selection.remove()
        _freeze(model)


def test_rmu_gradient_from_cached_input_matches(family_model):
    _, model = family_model
    batch = _batch(seed=2)
    target = find_moe_layers(model)[-1].layer_index
    selection = make_trainable(model, {target: list(range(8))})
    u = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    try:
        h = hidden_after_layer(model, batch, target)
        torch.nn.functional.mse_loss(h, u.expand_as(h)).backward()
        want = [p.grad.clone() for p in selection.parameters()]
        model.zero_grad(set_to_none=True)
        cache = LayerInputCache(target)
        h = forward_from_layer(model, batch, target, cache, 0, run_above=False).layer_hidden
        torch.nn.functional.mse_loss(h, u.expand_as(h)).backward()
        for got, ref in zip([p.grad for p in selection.parameters()], want, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    finally:
        selection.remove()
        _freeze(model)


def test_zoo_model_fast_path():
    from uoe_nb.routing import batches
    from uoe_nb.world import build_world
    from uoe_nb.zoo import load_zoo_model

    model, tok = load_zoo_model("tiny-qwen2moe")
    _freeze(model)
    world = build_world(0)
    texts = [t[: 40 + 25 * i] for i, t in enumerate(world.forget_corpus[:4])]  # different lengths: padding
    batch = next(batches(tok, texts, batch_size=4, max_length=48))
    assert (batch["attention_mask"] == 0).any()
    labels = _labels(batch)
    target = 2
    with torch.no_grad(), capture_routing(model, [target]) as cap:
        full = model(**batch, labels=labels)
    expert = int(cap.tokens(target, "weights").sum(0).argmax())
    selection = make_trainable(model, {target: [expert]}, routers=[target])
    try:
        full = model(**batch, labels=labels)
        (-full.loss).backward()
        want = [p.grad.clone() for p in selection.parameters()]
        model.zero_grad(set_to_none=True)
        cache = LayerInputCache(target)
        fast = forward_from_layer(model, batch, target, cache, batch_key(batch), labels=labels).outputs
        (-fast.loss).backward()
        torch.testing.assert_close(fast.logits, full.logits, atol=1e-5, rtol=0)
        for p, ref in zip(selection.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-5)
        assert want[0].abs().sum() > 0
    finally:
        selection.remove()


def test_dense_model_works_too():
    model = random_model(tiny_config("dense", layers=3), seed=0)
    _freeze(model)
    batch = _batch()
    cache = LayerInputCache(2)
    with torch.no_grad():
        out = forward_from_layer(model, batch, 2, cache, 0)
        torch.testing.assert_close(out.logits, model(**batch).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def test_cache_is_keyed_and_evicts_least_recently_used(family_model):
    _, model = family_model
    _, layers = decoder_layers(model)
    cache = LayerInputCache(2, max_items=2)
    b = [_batch(seed=s) for s in range(3)]
    with torch.no_grad():
        want = [hidden_after_layer(model, x, 1) for x in b]  # input of layer 2 = output of layer 1
        torch.testing.assert_close(cache.get(model, b[0], "a"), want[0], atol=0, rtol=0)
        torch.testing.assert_close(cache.get(model, b[1], "b"), want[1], atol=0, rtol=0)
        cache.get(model, b[0], "a")  # "a" is now the most recently used
        counter = _CallCounter(list(layers))
        cache.get(model, b[2], "c")  # evicts "b"
        counter.remove()
    assert counter.counts == [1, 1, 0, 0]  # a miss runs the layers below L only
    assert cache.keys() == ["a", "c"] and "b" not in cache and len(cache) == 2
    assert (cache.hits, cache.misses, cache.evictions) == (1, 3, 1)
    assert cache.nbytes == 2 * 3 * 10 * model.config.hidden_size * 4
    torch.testing.assert_close(cache.get(model, b[2], "c"), want[2], atol=0, rtol=0)
    with torch.no_grad():
        cache.get(model, b[1], "b")  # recomputed after eviction
    assert cache.misses == 4 and cache.keys() == ["c", "b"]
    cache.clear()
    assert len(cache) == 0


def test_cache_rejects_misuse(family_model):
    _, model = family_model
    batch = _batch()
    cache = LayerInputCache(1)
    with torch.no_grad():
        cache.get(model, batch, 0)
        other = _batch(seed=9)
        with pytest.raises(ValueError, match="different batch"):
            cache.get(model, other, 0)
        masked = dict(batch, attention_mask=batch["attention_mask"].clone())
        masked["attention_mask"][0, -1] = 0
        with pytest.raises(ValueError, match="different batch"):
            cache.get(model, masked, 0)
        another_model = random_model(tiny_config("mixtral", layers=NUM_LAYERS), seed=5)
        with pytest.raises(ValueError, match="another model"):
            cache.get(another_model, batch, 1)
        with pytest.raises(ValueError, match="inputs of layer 1, not of layer 2"):
            forward_from_layer(model, batch, 2, cache, 0)
    with pytest.raises(ValueError, match="max_items"):
        LayerInputCache(1, max_items=0)
    with pytest.raises(ValueError, match="non-negative"):
        LayerInputCache(-1)


def test_cache_computes_in_eval_mode_and_restores_training_mode(family_model):
    _, model = family_model
    batch = _batch()
    seen = []
    _, layers = decoder_layers(model)
    handle = layers[0].register_forward_hook(lambda m, *_: seen.append(m.training))
    model.train()
    try:
        with torch.no_grad():
            LayerInputCache(2).get(model, batch, 0)
    finally:
        handle.remove()
    assert seen == [False] and model.training
    model.eval()


def test_batch_key_depends_on_ids_and_mask():
    b = _batch()
    same = {k: v.clone() for k, v in b.items()}
    assert batch_key(b) == batch_key(same)
    same["attention_mask"][0, 0] = 0
    assert batch_key(b) != batch_key(same)
    assert batch_key(b) != batch_key(_batch(seed=1))


# --------------------------------------------------------------------------------------
# Bad input and families the cache cannot replay
# --------------------------------------------------------------------------------------


def test_bad_input(family_model):
    _, model = family_model
    batch = _batch()
    with pytest.raises(IndexError, match="4 decoder layers"):
        hidden_after_layer(model, batch, 4)
    with pytest.raises(IndexError, match="out of range"):
        with stop_after_layer(model, -1):
            pass
    with pytest.raises(IndexError, match="out of range"):
        forward_from_layer(model, batch, 7, LayerInputCache(7), 0)
    with pytest.raises(KeyError, match="input_ids"):
        forward_from_layer(model, {"attention_mask": batch["attention_mask"]}, 1, LayerInputCache(1), 0)
    # A trainable parameter below L: refused while gradients are on, fine under no_grad.
    _, layers = decoder_layers(model)
    weight = next(layers[0].parameters())
    weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="below layer 2 require grad"):
            forward_from_layer(model, batch, 2, LayerInputCache(2), 0)
        with torch.no_grad():
            forward_from_layer(model, batch, 2, LayerInputCache(2), 0)
    finally:
        _freeze(model)


class _ToyLayer(nn.Module):
    def __init__(self, hidden, tuple_output):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.tuple_output = tuple_output

    def forward(self, hidden_states, attention_mask=None):
        out = hidden_states + torch.tanh(self.linear(hidden_states))
        return (out, None) if self.tuple_output else out


class _ToyLM(nn.Module):
    """A causal-LM-shaped toy: optional side channel from layer 0 to the head."""

    def __init__(self, side_channel=False, tuple_output=False, keyword=False):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type="toy-side-channel" if side_channel else "toy")
        self.embed = nn.Embedding(128, 16)
        self.layers = nn.ModuleList(_ToyLayer(16, tuple_output) for _ in range(4))
        self.head = nn.Linear(16, 128)
        self.side_channel, self.keyword = side_channel, keyword

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        first = None
        for i, layer in enumerate(self.layers):
            out = layer(hidden_states=h) if self.keyword else layer(h, attention_mask)
            h = out[0] if isinstance(out, tuple) else out
            first = h if i == 0 else first
        if self.side_channel:  # work between the layers that a cache of layer L's input cannot replay
            h = h + first
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("tuple_output,keyword", [(False, False), (True, False), (False, True), (True, True)])
def test_layers_returning_tuples_or_taking_keywords(tuple_output, keyword):
    model = _ToyLM(tuple_output=tuple_output, keyword=keyword).requires_grad_(False)
    batch = _batch()
    with torch.no_grad():
        out = forward_from_layer(model, batch, 2, LayerInputCache(2), 0)
        torch.testing.assert_close(out.logits, model(**batch).logits, atol=1e-6, rtol=0)
        h = model.embed(batch["input_ids"])
        for layer in model.layers[:2]:  # by hand, independently of the hooks
            out = layer(h)
            h = out[0] if tuple_output else out
        torch.testing.assert_close(hidden_after_layer(model, batch, 1), h, atol=0, rtol=0)


def test_mismatch_is_detected_and_never_silent():
    model = _ToyLM(side_channel=True).requires_grad_(False)
    batch = _batch()
    with torch.no_grad():
        # L = 0 replays exactly (nothing below is bypassed) ...
        forward_from_layer(model, batch, 0, LayerInputCache(0), 0)
        # ... but from layer 2 the side channel sees the pass-through, and the check says so.
        cache = LayerInputCache(2)
        with pytest.raises(FastPathMismatchError, match="toy-side-channel.*layer 2"):
            forward_from_layer(model, batch, 2, cache, 0)
        assert not cache.verified
        unchecked = forward_from_layer(model, batch, 2, cache, 0, check_exact=False)
        assert not torch.allclose(unchecked.logits, model(**batch).logits, atol=1e-3)
        # The hidden-only path does not involve the side channel and passes its check.
        out = forward_from_layer(model, batch, 2, cache, 0, run_above=False)
        torch.testing.assert_close(out.layer_hidden, hidden_after_layer(model, batch, 2), atol=1e-6, rtol=0)
