"""Unlearning patches: only the changed expert rows and router, applied and reverted bitwise."""

import json

import pytest
import torch
from toy_moe import RemoteStyleModel

from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import moe_layer
from uoe_nb.patches import Patch, apply_patch, fingerprint, make_patch, revert_patch
from uoe_nb.trainable import make_trainable

LAYER, EXPERT = 1, 3
CONFIG = dict(experts=8, top_k=2)


def _fresh(seed=0):
    return random_model(tiny_config("qwen2_moe", **CONFIG), seed=seed)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unlearn(model, steps=3):
    """A few gradient-ascent steps on one expert and its layer's router."""
    selection = make_trainable(model, {LAYER: [EXPERT]}, routers=[LAYER])
    optimizer = torch.optim.AdamW(selection.param_groups(weight_decay=0.01), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    selection.remove()
    return model.eval()


@pytest.fixture(scope="module")
def unlearned():
    model = _fresh()
    base = _snapshot(model)
    _unlearn(model)
    return base, model


@pytest.fixture(scope="module")
def patch(unlearned):
    base, model = unlearned
    meta = {
        "base_model": "tiny-random-qwen2moe",
        "method": "ga+uoe",
        "config": {"lr": 1e-2, "steps": 3},
        "metrics": {"forget_mc": 0.25},
        "note": "test",
    }
    return make_patch(base, model, metadata=meta)


def test_fingerprint_stable_and_sensitive():
    a, b = _fresh(0), _fresh(0)
    fa = fingerprint(a)
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert fa == fingerprint(b) == fingerprint(a.state_dict())
    # One changed bit (the smallest float step of one element) changes the hash.
    with torch.no_grad():
        w = b.model.layers[0].mlp.gate.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
    assert fingerprint(b) != fa
    # A different dtype of the same weights is a different base.
    assert fingerprint(a.to(torch.float64)) != fa
    # Name order in the mapping does not matter; names do.
    state = dict(reversed(list(_fresh(0).state_dict().items())))
    assert fingerprint(state) == fa
    renamed = {("x." + k): v for k, v in state.items()}
    assert fingerprint(renamed) != fa


def test_fingerprint_covers_dtype_shape_and_chunking(monkeypatch):
    from uoe_nb import patches

    x = torch.arange(12, dtype=torch.float32)
    same_bytes_other_dtype = x.view(torch.int32)
    same_bytes_other_shape = x.reshape(3, 4)
    prints = {fingerprint({"w": t}) for t in (x, same_bytes_other_dtype, same_bytes_other_shape)}
    assert len(prints) == 3
    # Streaming in small chunks hashes the same bytes as one piece.
    big = {"a": torch.randn(1000, generator=torch.Generator().manual_seed(0)), "b": torch.ones(3, 5)}
    whole = fingerprint(big)
    monkeypatch.setattr(patches, "_HASH_CHUNK", 7)
    assert fingerprint(big) == whole
    # A non-contiguous view hashes like its contiguous copy.
    t = torch.randn(4, 6)
    assert fingerprint({"t": t.t()}) == fingerprint({"t": t.t().contiguous()})


def test_fingerprint_bad_input():
    with pytest.raises(TypeError):
        fingerprint([torch.zeros(2)])
    with pytest.raises(TypeError):
        fingerprint({"a": 1.0})
    with pytest.raises(ValueError, match="meta"):
        fingerprint({"a": torch.empty(2, device="meta")})


def test_patch_stores_only_the_expert_rows_and_router(unlearned, patch):
    base, model = unlearned
    layer = moe_layer(model, LAYER)
    router_names = set(layer.router_parameters())
    fused_names = set(layer.expert_parameters())
    assert set(patch.entries) == router_names | fused_names
    params = dict(model.named_parameters())
    for name in fused_names:
        entry = patch.entries[name]
        assert entry.rows.tolist() == [EXPERT]
        assert entry.new.shape == (1, *params[name].shape[1:])
        assert torch.equal(entry.new[0], params[name][EXPERT].detach())
        assert torch.equal(entry.old[0], base[name][EXPERT])
        assert not torch.equal(entry.new, entry.old)
    for name in router_names:
        entry = patch.entries[name]
        assert entry.rows is None and torch.equal(entry.new, params[name].detach())
        assert torch.equal(entry.old, base[name])
    expected_numel = layer.expert_numel() + sum(p.numel() for p in layer.router_parameters().values())
    assert patch.numel == expected_numel
    info = patch.info
    assert (info.layer, info.expert) == (LAYER, EXPERT)
    assert info.experts == {LAYER: [EXPERT]}
    assert info.base_fingerprint == fingerprint(base) != info.patched_fingerprint == fingerprint(model)
    assert info.extra == {"note": "test"} and info.metrics == {"forget_mc": 0.25}
    row = patch.as_row()
    assert row["parameters set"] == expected_numel and row["forget_mc"] == 0.25


def test_save_load_apply_revert_bitwise(unlearned, patch, tmp_path):
    base, model = unlearned
    path = patch.save(tmp_path / "ga_uoe.patch.safetensors")
    loaded = Patch.load(path)
    assert loaded.info == patch.info
    assert set(loaded.entries) == set(patch.entries)
    for name, entry in patch.entries.items():
        other = loaded.entries[name]
        assert torch.equal(other.new, entry.new) and torch.equal(other.old, entry.old)
        assert (other.rows is None) == (entry.rows is None)
        if entry.rows is not None:
            assert torch.equal(other.rows, entry.rows)
    info = json.loads(_raw_metadata(path))
    for key in (
        "base_model",
        "base_fingerprint",
        "method",
        "layer",
        "expert",
        "config",
        "metrics",
        "created",
    ):
        assert key in info
    assert info["library_version"]

    fresh = _fresh(0)
    apply_patch(fresh, loaded)
    target = model.state_dict()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, target[name]), name
    assert fingerprint(fresh) == patch.info.patched_fingerprint

    # A second apply is refused: the model already carries the patch.
    with pytest.raises(ValueError, match="already carries"):
        apply_patch(fresh, loaded)

    revert_patch(fresh, loaded)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, base[name]), name
    assert fingerprint(fresh) == patch.info.base_fingerprint
    with pytest.raises(ValueError, match="nothing to revert"):
        revert_patch(fresh, loaded)


def _raw_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["uoe_patch"]


def test_patch_file_is_small(patch, unlearned, tmp_path):
    _, model = unlearned
    path = patch.save(tmp_path / "p.safetensors")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < model_bytes / 10


def test_mismatched_base_refused(patch):
    other = _fresh(seed=1)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="not the base"):
        apply_patch(other, patch)
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name])
    with pytest.raises(ValueError, match="does not carry"):
        revert_patch(other, patch)


def test_wrong_dtype_refused_even_without_fingerprint_check(patch):
    model = _fresh(0).to(torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        apply_patch(model, patch, check_fingerprint=False)


def test_save_refuses_model_directory(patch, tmp_path):
    model_dir = tmp_path / "base"
    _fresh(0).save_pretrained(model_dir)
    files = sorted(p.name for p in model_dir.iterdir())
    for target in (model_dir / "p.safetensors", model_dir / "patches" / "p.safetensors"):
        with pytest.raises(ValueError, match="saved model"):
            patch.save(target)
    assert sorted(p.name for p in model_dir.iterdir()) == files
    assert patch.save(model_dir / "p.safetensors", allow_in_model_dir=True).is_file()
    with pytest.raises(FileExistsError):
        patch.save(model_dir / "p.safetensors", allow_in_model_dir=True)
    with pytest.raises(IsADirectoryError):
        patch.save(tmp_path)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a UOE patch"):
        Patch.load(path)
    with pytest.raises(FileNotFoundError):
        Patch.load(tmp_path / "missing.safetensors")


def test_declared_scope(unlearned):
    base, model = unlearned
    layer = moe_layer(model, LAYER)
    router = next(iter(layer.router_parameters()))
    meta = {"base_model": "m", "method": "ga"}
    # The router changed but was not declared: refused.
    with pytest.raises(ValueError, match="outside the declared"):
        make_patch(base, model, metadata=meta, experts={LAYER: [EXPERT]})
    # Declaring a wrong expert is refused too.
    with pytest.raises(ValueError, match=r"experts \[3\]"):
        make_patch(base, model, metadata=meta, experts={LAYER: [0]}, extra_params=[router])
    # Declared rows are stored even if one did not change.
    patch = make_patch(base, model, metadata=meta, experts={LAYER: [EXPERT, 5]}, extra_params=[router])
    entry = patch.entries[next(iter(layer.expert_parameters()))]
    assert entry.rows.tolist() == [EXPERT, 5]
    assert torch.equal(entry.new[1], entry.old[1])
    assert patch.info.layer is None and patch.info.experts == {LAYER: [EXPERT, 5]}
    with pytest.raises(IndexError):
        make_patch(base, model, metadata=meta, experts={LAYER: [99]}, extra_params=[router])
    with pytest.raises(IndexError):
        make_patch(base, model, metadata=meta, experts={7: [0]})
    with pytest.raises(KeyError):
        make_patch(base, model, metadata=meta, extra_params=["no.such.weight"])


def test_make_patch_bad_input(unlearned):
    base, model = unlearned
    with pytest.raises(ValueError, match="method"):
        make_patch(base, model, metadata={"base_model": "m"})
    with pytest.raises(ValueError, match="JSON"):
        make_patch(base, model, metadata={"base_model": "m", "method": "ga", "config": {"x": object()}})
    with pytest.raises(ValueError, match="nothing was unlearned"):
        make_patch(base, _fresh(0), metadata={"base_model": "m", "method": "ga"})
    with pytest.raises(ValueError, match="snapshot"):
        make_patch(None, model, metadata={"base_model": "m", "method": "ga"})
    partial = dict(base)
    partial.pop("lm_head.weight")
    with pytest.raises(ValueError, match="lacks"):
        make_patch(partial, model, metadata={"base_model": "m", "method": "ga"})
    # Extra entries in the snapshot (e.g. saved optimiser tensors) do not change the base fingerprint.
    padded = dict(base, **{"extra.tensor": torch.zeros(2)})
    assert make_patch(padded, model, metadata={"base_model": "m", "method": "ga"}).info.base_fingerprint == (
        fingerprint(base)
    )


def test_patch_on_per_expert_modules():
    torch.manual_seed(0)
    model = RemoteStyleModel(dense_first=False)
    base = _snapshot(model)
    selection = make_trainable(model, {1: [2]})
    optimizer = torch.optim.SGD(selection.parameters(), lr=0.5)
    model(torch.randint(0, 50, (4, 8))).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(model.layers[1].experts[2].weight, base["layers.1.experts.2.weight"])
    patch = make_patch(base, model, metadata={"base_model": "toy", "method": "sgd"}, experts={1: [2, 3]})
    # Whole tensors of the declared experts' modules, even expert 3 which did not change.
    assert sorted(patch.entries) == [f"layers.1.experts.{e}.{p}" for e in (2, 3) for p in ("bias", "weight")]
    assert all(e.rows is None for e in patch.entries.values())
    assert patch.info.experts == {1: [2, 3]}
    target = _snapshot(model)
    torch.manual_seed(0)
    fresh = RemoteStyleModel(dense_first=False)
    apply_patch(fresh, patch)
    assert all(torch.equal(v, target[k]) for k, v in fresh.state_dict().items())
    revert_patch(fresh, patch)
    assert all(torch.equal(v, base[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="outside the declared"):
        make_patch(base, model, metadata={"base_model": "toy", "method": "sgd"}, experts={1: [0]})
