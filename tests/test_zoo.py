"""The tiny model zoo: offline loading, structure, determinism and the quality bar."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from uoe_nb.evaluation import evaluate_world
from uoe_nb.moe import NoMoELayersError, find_moe_layers, parameter_counts
from uoe_nb.world import build_world
from uoe_nb.zoo import ZOO, build_zoo, load_zoo_model, zoo_dir

MOE_MODELS = ["tiny-qwen2moe", "tiny-deepseek", "tiny-mixtral"]


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def scores(world):
    out = {}
    for name in ZOO:
        model, tok = load_zoo_model(name)
        out[name] = evaluate_world(model, tok, world)
    return out


def test_every_zoo_model_is_shipped_and_loads_offline():
    for name in ZOO:
        manifest = json.loads((zoo_dir() / name / "zoo.json").read_text())
        assert manifest["world_fingerprint"] == build_world(manifest["world_seed"]).fingerprint()
        model, tok = load_zoo_model(name)
        assert isinstance(model, torch.nn.Module) and not model.training
        assert model.config.vocab_size == len(tok)
        text = "the vorn crystal"
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_zoo_architectures():
    qwen, _ = load_zoo_model("tiny-qwen2moe")
    layers = find_moe_layers(qwen)
    assert [lay.layer_index for lay in layers] == [0, 1, 2, 3]
    assert all(lay.shared_experts is not None and lay.num_experts == 16 for lay in layers)

    deepseek, _ = load_zoo_model("tiny-deepseek")
    layers = find_moe_layers(deepseek)
    assert [lay.layer_index for lay in layers] == [1, 2, 3]  # first layer dense
    assert all(lay.num_experts == 32 and lay.top_k == 4 and lay.shared_experts is not None for lay in layers)

    mixtral, _ = load_zoo_model("tiny-mixtral")
    layers = find_moe_layers(mixtral)
    assert all(lay.num_experts == 8 and lay.top_k == 2 and lay.shared_experts is None for lay in layers)

    dense, _ = load_zoo_model("tiny-dense")
    with pytest.raises(NoMoELayersError):
        find_moe_layers(dense)
    # The dense twin matches tiny-qwen2moe's active parameters within 5 %.
    active_moe = parameter_counts(qwen)["active"]
    active_dense = parameter_counts(dense)["active"]
    assert abs(active_dense - active_moe) / active_moe < 0.05
    assert parameter_counts(qwen)["total"] > 2 * active_moe

    oracle, _ = load_zoo_model("tiny-qwen2moe-oracle")
    assert type(oracle) is type(qwen)
    assert parameter_counts(oracle) == parameter_counts(qwen)
    assert {k: v.shape for k, v in oracle.state_dict().items()} == {k: v.shape for k, v in qwen.state_dict().items()}


@pytest.mark.parametrize("name", MOE_MODELS)
def test_quality_bar(scores, name):
    s = scores[name]
    assert s.forget_mc >= 0.80, s
    assert s.utility_mc >= 0.80, s
    assert s.forget_fill >= 0.90, s
    assert s.neighbor_fill >= 0.90, s
    # Subjects have equal sizes, so UT is the mean of the per-subject accuracies.
    assert set(s.utility_by_subject) == {"geography", "zoology", "astronomy", "arithmetic"}
    assert sum(s.utility_by_subject.values()) / 4 == pytest.approx(s.utility_mc)


def test_oracle_is_near_chance_on_forget_domain_only(scores):
    oracle = scores["tiny-qwen2moe-oracle"]
    base = scores["tiny-qwen2moe"]
    assert oracle.forget_mc < 0.45  # chance is 0.25
    assert oracle.forget_fill < 0.35  # it never saw the forget targets
    assert oracle.utility_mc >= 0.80
    assert oracle.utility_mc >= base.utility_mc - 0.05
    assert oracle.neighbor_fill >= 0.90


def test_stale_checkpoint_refused(tmp_path):
    shutil.copytree(zoo_dir() / "tiny-mixtral", tmp_path / "tiny-mixtral")
    manifest_path = tmp_path / "tiny-mixtral" / "zoo.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["world_fingerprint"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="different tiny world"):
        load_zoo_model("tiny-mixtral", directory=tmp_path)


def test_missing_and_unknown_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m uoe_nb.zoo build"):
        load_zoo_model("tiny-mixtral", directory=tmp_path)
    with pytest.raises(ValueError, match="unknown zoo model"):
        load_zoo_model("tiny-nothing")
    with pytest.raises(ValueError, match="unknown zoo models"):
        build_zoo(tmp_path, ["tiny-nothing"])


def test_build_is_deterministic_and_reloads_with_auto_classes(tmp_path):
    a = build_zoo(tmp_path / "a", ["tiny-mixtral"], steps=3, jobs=1)[0]
    b = build_zoo(tmp_path / "b", ["tiny-mixtral"], steps=3, jobs=1)[0]
    assert a["final_loss"] == b["final_loss"]
    wa = load_file(tmp_path / "a" / "tiny-mixtral" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "tiny-mixtral" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "tiny-mixtral")
    assert type(model).__name__ == "MixtralForCausalLM"
