"""The tiny model zoo: offline loading, structure, determinism and the quality bar."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from uoe_nb.evaluation import evaluate_world
from uoe_nb.moe import NoMoELayersError, find_moe_layers, parameter_counts
from uoe_nb.world import build_world
from uoe_nb.zoo import ZOO, build_zoo, load_zoo_model, zoo_dir

MOE_MODELS = ["tiny-qwen2moe", "tiny-deepseek", "tiny-mixtral", "tiny-qwen2moe-deep"]
# Each retrain oracle and the model it is the gold standard for.
ORACLES = {"tiny-qwen2moe-oracle": "tiny-qwen2moe", "tiny-qwen2moe-deep-oracle": "tiny-qwen2moe-deep"}
README = Path(__file__).resolve().parent.parent / "README.md"


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

    # The deep twin: the same layer, eight of them.
    deep, _ = load_zoo_model("tiny-qwen2moe-deep")
    layers = find_moe_layers(deep)
    assert [lay.layer_index for lay in layers] == list(range(8))
    assert all(lay.shared_experts is not None and lay.num_experts == 16 and lay.top_k == 2 for lay in layers)
    assert type(deep) is type(qwen)
    shallow = {k: v.shape for k, v in qwen.state_dict().items()}
    upper = re.compile(r"layers\.[4-7]\.")
    assert all(shallow[k] == v.shape for k, v in deep.state_dict().items() if not upper.search(k))


@pytest.mark.parametrize("oracle_name", ORACLES)
def test_oracle_has_its_models_architecture(oracle_name):
    base, _ = load_zoo_model(ORACLES[oracle_name])
    oracle, _ = load_zoo_model(oracle_name)
    assert type(oracle) is type(base)
    assert parameter_counts(oracle) == parameter_counts(base)
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    assert {k: v.shape for k, v in oracle.state_dict().items()} == shapes


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


@pytest.mark.parametrize("oracle_name", ORACLES)
def test_oracle_is_near_chance_on_forget_domain_only(scores, oracle_name):
    oracle = scores[oracle_name]
    base = scores[ORACLES[oracle_name]]
    assert oracle.forget_mc < 0.45  # chance is 0.25
    assert oracle.forget_fill < 0.35  # it never saw the forget targets
    assert oracle.utility_mc >= 0.80
    assert oracle.utility_mc >= base.utility_mc - 0.05
    assert oracle.neighbor_fill >= 0.90


@pytest.mark.skipif(not README.exists(), reason="needs the repository's README")
def test_readme_zoo_tables_list_the_zoo():
    section = README.read_text().split("## The tiny model zoo", 1)[1].split("\n## ", 1)[0]
    tables = [
        [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", block, re.MULTILINE)]
        for block in re.split(r"\n\s*\n", section)
        if block.lstrip().startswith("| model |")
    ]
    assert len(tables) == 2  # what each model is, and its scores
    assert all(table == list(ZOO) for table in tables), tables
    # The score table's parameter counts are the shipped models'.
    row = re.compile(r"^\| `([^`]+)` \| ([\d,]+) \(([\d,]+)\) \|", re.MULTILINE)
    assert [name for name, _, _ in row.findall(section)] == list(ZOO)
    for name, total, active in row.findall(section):
        counts = parameter_counts(load_zoo_model(name)[0])
        stated = int(total.replace(",", "")), int(active.replace(",", ""))
        assert stated == (counts["total"], counts["active"]), name


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
