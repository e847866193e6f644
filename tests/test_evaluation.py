"""Evaluation through lm-eval and RWKU probe scoring, on a tiny MoE model trained here.

The module builds its own byte-level BPE tokenizer and a tiny Qwen2-MoE model (no
download), teaches it the colours of 16 made-up things and keeps 16 more unseen, so that
lm-eval's accuracy must be high on the first set and near chance on the second.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

from uoe_nb import evaluation as ev

COLOURS = ["blue", "red", "green", "yellow"]


def _names(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(2))
        if name not in names:
            names.append(name)
    return names


NAMES = _names(32)
SEEN, UNSEEN = NAMES[:16], NAMES[16:]
COLOUR_OF = {name: COLOURS[i % 4] for i, name in enumerate(NAMES)}


def item(name: str) -> dict:
    return {
        "question": f"what colour is the {name} ?",
        "choices": COLOURS,
        "answer": COLOURS.index(COLOUR_OF[name]),
    }


def probe(name: str, level: int) -> dict:
    if level == 1:
        return {"query": f"The {name} is ___ .", "answer": COLOUR_OF[name], "subject": name, "level": 1}
    return {
        "query": f"what colour is the {name} ?",
        "answer": COLOUR_OF[name],
        "subject": name,
        "level": level,
    }


def make_tokenizer(corpus: list[str], pad: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **extra)


@pytest.fixture(scope="module")
def world():
    """Tokenizer and a tiny MoE model trained on the SEEN facts, as MC answers and as probe answers."""
    torch.set_num_threads(1)
    mc_texts = [ev.MC_PROMPT.format(question=item(n)["question"]) + " " + COLOUR_OF[n] for n in NAMES]
    probe_texts = [ev.probe_prompt(probe(n, level)) + " " + COLOUR_OF[n] for n in NAMES for level in (1, 2)]
    tokenizer = make_tokenizer(mc_texts * 3 + probe_texts)
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2MoeForCausalLM(config)
    train = [
        text
        for n in SEEN
        for text in (
            ev.MC_PROMPT.format(question=item(n)["question"]) + " " + COLOUR_OF[n],
            ev.probe_prompt(probe(n, 1)) + " " + COLOUR_OF[n],
            ev.probe_prompt(probe(n, 2)) + " " + COLOUR_OF[n],
        )
    ]
    batch = tokenizer([t + "\n" + tokenizer.eos_token for t in train], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.6, f"the tiny model did not learn its facts (loss {loss.item():.3f})"
    return model, tokenizer


# --------------------------------------------------------------------------- multiple choice


def test_lm_eval_accuracy_high_on_learnt_facts_and_near_chance_on_unseen(world):
    model, tok = world
    seen = ev.multiple_choice_accuracy(model, tok, [item(n) for n in SEEN], progress=False)
    unseen = ev.multiple_choice_accuracy(model, tok, [item(n) for n in UNSEEN], progress=False)
    assert seen.n == 16 and len(seen.correct) == 16
    assert seen.accuracy >= 0.9
    assert unseen.accuracy <= 0.5  # 4 choices: chance is 0.25
    assert seen.accuracy == pytest.approx(sum(seen.correct) / 16)


def test_lm_eval_equals_plain_torch_reference(world):
    model, tok = world
    items = [item(n) for n in NAMES]
    # a wrong answer key on a few items: the reference must agree on misses too
    for i in (0, 5, 20):
        items[i] = {**items[i], "answer": (items[i]["answer"] + 1) % 4}
    harness = ev.multiple_choice_accuracy(model, tok, items, batch_size=7, progress=False)
    reference = ev.multiple_choice_accuracy_reference(model, tok, items)
    assert harness.correct == reference.correct
    assert harness.accuracy == reference.accuracy
    assert harness.stderr == pytest.approx(reference.stderr)
    assert 0 < sum(harness.correct) < len(items)


def test_lm_eval_equals_reference_on_awkward_text(world):
    """Quotes, braces, unicode and multi-token choices survive the YAML/Jinja round trip."""
    model, tok = world
    items = [
        {
            "question": 'what is "{{x}}" ?',
            "choices": ["it's blue", 'say "red"', "grün {0}", "a\\b"],
            "answer": 2,
        },
        {"question": "naïve café — ok?", "choices": ["yes, of course", "no", "[1, 2]", "None"], "answer": 0},
        {
            "question": item(SEEN[0])["question"],
            "choices": ["blue", "red"],
            "answer": 0,
            "subject": "colours",
        },
    ]
    harness = ev.multiple_choice_accuracy(model, tok, items, progress=False)
    reference = ev.multiple_choice_accuracy_reference(model, tok, items)
    assert harness.correct == reference.correct
    assert harness.n == 3


def test_choice_loglikelihoods_prefer_the_learnt_answer(world):
    model, tok = world
    name = SEEN[3]
    scores = ev.choice_loglikelihoods(
        model, tok, ev.MC_PROMPT.format(question=item(name)["question"]), COLOURS
    )
    assert max(range(4), key=scores.__getitem__) == COLOURS.index(COLOUR_OF[name])
    assert all(s < 0 for s in scores)


def test_mc_is_deterministic_and_restores_training_mode(world):
    model, tok = world
    items = [item(n) for n in NAMES[:12]]
    model.train()
    try:
        first = ev.multiple_choice_accuracy(model, tok, items, progress=False)
        assert model.training, "training mode must be restored after evaluation"
        second = ev.multiple_choice_accuracy(model, tok, items, batch_size=1, progress=False)
        assert first == second
        ev.multiple_choice_accuracy_reference(model, tok, items)
        assert model.training
    finally:
        model.eval()
    ev.multiple_choice_accuracy(model, tok, items, progress=False)
    assert not model.training


def test_mc_limit_keeps_the_first_items(world):
    model, tok = world
    items = [item(n) for n in NAMES]
    full = ev.multiple_choice_accuracy(model, tok, items, progress=False)
    part = ev.multiple_choice_accuracy(model, tok, items, limit=5, progress=False)
    assert part.n == 5 and part.correct == full.correct[:5]
    with pytest.raises(ValueError, match="limit"):
        ev.multiple_choice_accuracy(model, tok, items, limit=0)


def test_mc_single_item_has_undefined_stderr(world):
    model, tok = world
    result = ev.multiple_choice_accuracy(model, tok, [item(SEEN[0])], progress=False)
    assert result.n == 1 and math.isnan(result.stderr)
    assert ev.multiple_choice_accuracy_reference(model, tok, [item(SEEN[0])]).correct == result.correct


def test_mc_is_quiet(world, capfd, monkeypatch):
    """No progress bars, lm-eval warnings or 'fatal: not a git repository' on stdout/stderr."""
    model, tok = world
    monkeypatch.setenv("UOE_NB_PROGRESS", "0")
    monkeypatch.chdir(Path("/"))  # outside any git repository
    capfd.readouterr()
    ev.multiple_choice_accuracy(model, tok, [item(n) for n in SEEN[:4]])
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_mc_leaves_the_tokenizer_as_it_was(world):
    model, _ = world
    corpus = [ev.MC_PROMPT.format(question=item(n)["question"]) + " " + COLOUR_OF[n] for n in NAMES]
    tok = make_tokenizer(corpus * 3, pad=False)
    assert tok.pad_token is None
    side = tok.padding_side
    items = [item(n) for n in NAMES[:8]]
    result = ev.multiple_choice_accuracy(model, tok, items, progress=False)
    assert tok.pad_token is None and tok.padding_side == side
    assert result.correct == ev.multiple_choice_accuracy_reference(model, tok, items).correct


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "empty"),
        ([item(NAMES[0]), {"question": "q", "choices": COLOURS}], "item 1 has no 'answer'"),
        ([{"choices": COLOURS, "answer": 0}], "item 0 has no 'question'"),
        (
            [item(NAMES[0]), item(NAMES[1]), {"question": "q", "choices": COLOURS, "answer": 4}],
            "item 2.*'answer' is 4, out of range",
        ),
        ([{"question": "q", "choices": COLOURS, "answer": -1}], "item 0.*out of range"),
        ([{"question": "q", "choices": "blue red", "answer": 0}], "item 0: field 'choices'"),
        ([{"question": "q", "choices": ["blue", ""], "answer": 0}], "item 0: field 'choices'"),
        ([{"question": "q", "choices": COLOURS, "answer": "0"}], "item 0: field 'answer' must be an int"),
        ([{"question": "", "choices": COLOURS, "answer": 0}], "item 0: field 'question'"),
        ({"question": "q", "choices": COLOURS, "answer": 0}, "list of dicts"),
    ],
)
def test_mc_rejects_bad_items(world, items, message):
    model, tok = world
    with pytest.raises(ValueError, match=message):
        ev.multiple_choice_accuracy(model, tok, items)
    with pytest.raises(ValueError, match=message):
        ev.multiple_choice_accuracy_reference(model, tok, items)


def test_task_yaml_uses_an_absolute_data_path(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "tasks"
    yaml_path = ev.write_mc_task([item(n) for n in NAMES[:3]], task_dir, name="colours")
    config = yaml.safe_load(yaml_path.read_text())
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.exists()
    assert config["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert config["output_type"] == "multiple_choice"
    assert [m["metric"] for m in config["metric_list"]] == ["acc"]
    # the task loads from another working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    task = TaskManager(include_path=str(task_dir), include_defaults=False).load(["colours"])["tasks"][
        "colours"
    ]
    docs = list(task.test_docs())
    assert len(docs) == 3
    assert task.doc_to_text(docs[0]) == ev.MC_PROMPT.format(question=item(NAMES[0])["question"])
    assert task.doc_to_choice(docs[0]) == COLOURS
    assert task.doc_to_target(docs[0]) == item(NAMES[0])["answer"]
    with pytest.raises(ValueError, match="task name"):
        ev.write_mc_task([item(NAMES[0])], task_dir, name="bad name")


# --------------------------------------------------------------------------- lm-eval's real tasks


def _builtin_task_manager():
    """lm-eval's own WMDP and MMLU folders only: indexing all built-in tasks takes ~15 s."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(
        include_path=[str(root / "wmdp"), str(root / "mmlu" / "default")], include_defaults=False
    )


def _leaf_tasks(index, name):
    entry = index[name]
    if entry.kind.name == "TAG":
        return sorted(t for tag in entry.tags for t in _leaf_tasks(index, tag))
    if entry.kind.name == "GROUP":
        return sorted(t for child in entry.cfg["task"] for t in _leaf_tasks(index, child))
    return [name]


def test_builtin_wmdp_cyber_and_mmlu_configs_resolve_offline():
    from uoe_nb import data

    index = _builtin_task_manager().task_index
    cyber = index["wmdp_cyber"].cfg
    assert cyber["dataset_path"] == "cais/wmdp" and cyber["dataset_name"] == "wmdp-cyber"
    assert cyber["test_split"] == "test" and cyber["num_fewshot"] == 0
    assert cyber["output_type"] == "multiple_choice" and cyber["doc_to_choice"] == ["A", "B", "C", "D"]
    assert [m["metric"] for m in cyber["metric_list"]] == ["acc"]
    assert index["mmlu"].kind.name == "GROUP"
    subjects = _leaf_tasks(index, "mmlu")
    assert len(subjects) == 57 and "mmlu_college_biology" in subjects
    for name in subjects:
        cfg = index[name].cfg
        assert cfg["dataset_path"] == "cais/mmlu" and cfg["test_split"] == "test"
        assert name == "mmlu_" + cfg["dataset_name"]
    # the data loaders read the same hub datasets as lm-eval
    import inspect

    assert inspect.signature(data.load_wmdp_questions).parameters["path"].default == cyber["dataset_path"]
    assert inspect.signature(data.load_mmlu).parameters["path"].default == "cais/mmlu"


def _two_part_tasks(folder):
    """Two local multiple-choice tasks (6 seen, 10 unseen names) and a group of both, with a
    TaskManager that indexes only them."""
    from lm_eval.tasks import TaskManager

    a, b = [item(n) for n in SEEN[:6]], [item(n) for n in UNSEEN[:10]]
    ev.write_mc_task(a, folder, "part_a")
    ev.write_mc_task(b, folder, "part_b")
    group = {
        "group": "both_parts",
        "task": ["part_a", "part_b"],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
    }
    (folder / "both_parts.yaml").write_text(yaml.safe_dump(group))
    return a, b, TaskManager(include_path=str(folder), include_defaults=False)


def test_lm_eval_tasks_runs_groups_and_tasks(world, tmp_path):
    model, tok = world
    a, b, manager = _two_part_tasks(tmp_path)
    scores = ev.lm_eval_tasks(model, tok, ("both_parts", "part_a"), task_manager=manager, progress=False)
    acc_a = ev.multiple_choice_accuracy_reference(model, tok, a).accuracy
    acc_b = ev.multiple_choice_accuracy_reference(model, tok, b).accuracy
    assert scores["part_a"] == pytest.approx(acc_a)
    assert scores["both_parts"] == pytest.approx((6 * acc_a + 10 * acc_b) / 16)
    with pytest.raises(ValueError, match="no task or group named"):
        ev.lm_eval_tasks(model, tok, ("wmdp_cyberr",), task_manager=manager)


def test_lm_eval_tasks_offline_says_what_to_do(world, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    model, tok = world
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(RuntimeError, match=r"network access.*UOE_NB_MODE=tiny"):
        ev.lm_eval_tasks(model, tok, ("wmdp_cyber",), task_manager=_builtin_task_manager(), progress=False)


def test_shared_task_manager_is_built_once_per_include_path(monkeypatch, tmp_path):
    import lm_eval.tasks

    built = []

    class CountingTaskManager:
        def __init__(self, include_path=None):
            built.append(include_path)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountingTaskManager)
    monkeypatch.setattr(ev, "_TASK_MANAGERS", {})
    first = ev.shared_task_manager()
    assert ev.shared_task_manager() is first and built == [None]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mine = ev.shared_task_manager(tmp_path / "a")
    # the same folders however they are spelled give the same index
    assert ev.shared_task_manager(str(tmp_path / "a" / ".." / "a")) is mine and mine is not first
    both = ev.shared_task_manager([tmp_path / "b", tmp_path / "a"])
    assert ev.shared_task_manager([str(tmp_path / "a"), str(tmp_path / "b")]) is both
    assert len(built) == 3 and built[1] == [str((tmp_path / "a").resolve())]
    with pytest.raises(ValueError, match="include_path is empty"):
        ev.shared_task_manager([])


def test_lm_eval_tasks_defaults_to_the_shared_index(world, monkeypatch, tmp_path):
    from lm_eval.tasks import TaskManager

    model, tok = world
    ev.write_mc_task([item(n) for n in SEEN[:4]], tmp_path, "part_a")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setattr(ev, "shared_task_manager", lambda include_path=None: manager)
    expected = ev.multiple_choice_accuracy_reference(model, tok, [item(n) for n in SEEN[:4]]).accuracy
    assert ev.lm_eval_tasks(model, tok, ("part_a",), progress=False)["part_a"] == pytest.approx(expected)


def test_lm_eval_tasks_loads_tasks_once_and_reuses_them(world, tmp_path, monkeypatch):
    """An unlearning run evaluates every few steps: the tasks are loaded once per manager, and
    later evaluations with other limits still score exactly their first questions."""
    model, tok = world
    a, b, manager = _two_part_tasks(tmp_path)
    loads = []
    real_load = manager.load
    monkeypatch.setattr(manager, "load", lambda names: loads.append(list(names)) or real_load(names))
    ref = lambda items: ev.multiple_choice_accuracy_reference(model, tok, items).accuracy  # noqa: E731
    for limit in (3, None, 3, 5):
        got = ev.lm_eval_tasks(model, tok, ("both_parts",), limit=limit, task_manager=manager, progress=False)
        first_a, first_b = a[:limit], b[:limit]
        n_a, n_b = len(first_a), len(first_b)
        expected = (n_a * ref(first_a) + n_b * ref(first_b)) / (n_a + n_b)
        assert got["both_parts"] == pytest.approx(expected), limit
    assert loads == [["both_parts"]]


def test_evaluator_computes_only_the_parts_asked_for():
    calls = []
    evaluate = ev.Evaluator(
        forget=lambda m: calls.append("forget") or 0.25,
        utility=lambda m: calls.append("utility") or 0.5,
        forget_questions=100,
        utility_questions=57 * 20,
    )
    assert evaluate(None) == {"forget_accuracy": 0.25, "utility_accuracy": 0.5}
    assert calls == ["forget", "utility"]
    assert evaluate(None, parts=("forget",)) == {"forget_accuracy": 0.25} and calls[-1] == "forget"
    assert evaluate(None, parts="utility") == {"utility_accuracy": 0.5} and len(calls) == 4
    for bad in ((), ("forget", "retain"), ("FA",)):
        with pytest.raises(ValueError, match=r"parts must be a non-empty tuple from \('forget', 'utility'\)"):
            evaluate(None, parts=bad)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="forget_questions must be a positive int"):
        ev.Evaluator(lambda m: 0.0, lambda m: 0.0, forget_questions=0, utility_questions=1)


def test_world_evaluator_matches_multiple_choice_accuracy():
    from uoe_nb.world import build_world
    from uoe_nb.zoo import WORLD_SEED, load_zoo_model

    model, tok = load_zoo_model("tiny-qwen2moe")
    world = build_world(WORLD_SEED)
    evaluate = ev.world_evaluator(tok, world)
    assert (evaluate.forget_questions, evaluate.utility_questions) == (128, 96)
    utility = evaluate(model, parts=("utility",))
    expected = ev.multiple_choice_accuracy(model, tok, world.utility_questions, progress=False).accuracy
    assert utility == {"utility_accuracy": pytest.approx(expected)}


# --------------------------------------------------------------------------- RWKU probes


@pytest.mark.parametrize(
    ("answer", "generation", "expected"),
    [
        ("Paris France", "it is Paris", 0.5),
        ("Paris France", "", 0.0),
        ("Paris France", "   ", 0.0),
        ("Paris", "PARIS", 0.0),  # RWKU's scorer keeps case
        ("1961", "born in 1961, in Hawaii", 0.0),  # and punctuation attached to a word
        ("Paris", "It is Paris.", 1.0),  # full stops end sentences
        ("New York City", "City York New", 1 / 3),
        ("the Eiffel Tower in Paris", "Paris has the tower", 0.2),
        ("New York City", "In New York. City hall", 1.0),  # summary level: LCS over sentences
        ("blue", "red", 0.0),
        ("blue", "...", 0.0),
    ],
)
def test_rouge_l_recall(answer, generation, expected):
    """Values worked out by hand from RWKU's rule (the rouge package's ROUGE-L recall)."""
    assert ev.rouge_l_recall(answer, generation) == pytest.approx(expected)


def test_probes_of_a_chat_checkpoint_go_through_its_chat_template():
    import copy

    from uoe_nb.zoo import load_zoo_model

    _, tok = load_zoo_model("tiny-qwen2moe")
    probe = {"query": "Who founded ___?", "answer": "x", "subject": "s", "level": 2}
    assert ev.probe_prompt(probe, tok) == ev.probe_prompt(probe)  # the zoo has no template
    chat = copy.deepcopy(tok)
    chat.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}"
    )
    assert ev.probe_prompt(probe, chat) == (
        "<|user|>Please briefly answer the following question.\nQuestion: Who founded ___?<|bot|>Answer:"
    )


def test_probe_prompts_are_rwku_s():
    assert ev.probe_prompt({"query": "Q?", "answer": "a", "subject": "s", "level": 1}) == (
        "Please complete the blank in the following question.\nQuestion: Q?\nAnswer:"
    )
    for level in (2, 3):
        assert ev.probe_prompt({"query": "Q?", "answer": "a", "subject": "s", "level": level}) == (
            "Please briefly answer the following question.\nQuestion: Q?\nAnswer:"
        )


def test_probes_score_learnt_facts(world):
    model, tok = world
    probes = [probe(n, level) for n in SEEN[:8] for level in (1, 2)] + [probe(n, 2) for n in UNSEEN[:8]]
    result = ev.probe_rouge_recall(model, tok, probes, max_new_tokens=4, progress=False)
    assert len(result.scores) == len(result.generations) == len(probes)
    assert set(result.by_level) == {1, 2}
    seen_scores = result.scores[:16]
    assert sum(seen_scores) / 16 >= 0.9
    assert all("\n" not in g for g in result.generations)
    assert result.mean == pytest.approx(sum(result.scores) / len(probes))
    level1 = [s for p, s in zip(probes, result.scores, strict=True) if p["level"] == 1]
    assert result.by_level[1] == pytest.approx(sum(level1) / len(level1))
    for p, g, s in zip(probes, result.generations, result.scores, strict=True):
        assert s == ev.rouge_l_recall(p["answer"], g)


def test_batched_generation_equals_one_at_a_time(world):
    model, tok = world
    # queries of different lengths, so the batch really is padded
    probes = [probe(n, 2) for n in NAMES[:6]] + [
        {"query": "x", "answer": "blue", "subject": "s", "level": 2},
        {
            "query": "what colour is the " + " and the ".join(NAMES[:5]) + " ?",
            "answer": "red",
            "subject": "s",
            "level": 3,
        },
        probe(SEEN[2], 1),
    ]
    batched = ev.probe_rouge_recall(model, tok, probes, max_new_tokens=8, batch_size=16, progress=False)
    single = ev.probe_rouge_recall(model, tok, probes, max_new_tokens=8, batch_size=1, progress=False)
    assert batched.generations == single.generations
    assert batched.scores == single.scores


def test_probes_restore_tokenizer_and_mode(world, capfd, monkeypatch):
    model, _ = world
    corpus = [ev.probe_prompt(probe(n, 2)) + " " + COLOUR_OF[n] for n in NAMES]
    tok = make_tokenizer(corpus * 3, pad=False)
    tok.padding_side = "right"
    model.train()
    monkeypatch.setenv("UOE_NB_PROGRESS", "0")
    capfd.readouterr()
    try:
        result = ev.probe_rouge_recall(model, tok, [probe(n, 2) for n in NAMES[:3]], max_new_tokens=3)
        assert model.training
    finally:
        model.eval()
    assert tok.pad_token is None and tok.padding_side == "right"
    assert len(result.generations) == 3
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ([], "empty"),
        ([{"query": "q", "answer": "a", "subject": "s", "level": 4}], "probe 0: field 'level'"),
        (
            [{"query": "q", "answer": "a", "level": 1}, {"query": "q", "subject": "s", "level": 1}],
            "probe 1 has no 'answer'",
        ),
        ([{"query": "", "answer": "a", "subject": "s", "level": 1}], "probe 0: field 'query'"),
        ([{"query": "q", "answer": "a", "subject": "s", "level": "1"}], "probe 0: field 'level'"),
    ],
)
def test_probes_reject_bad_input(world, probes, message):
    model, tok = world
    with pytest.raises(ValueError, match=message):
        ev.probe_rouge_recall(model, tok, probes)


def test_result_rows():
    mc = ev.MCResult(accuracy=0.5, n=2, stderr=0.5, correct=[True, False])
    assert mc.as_row(model="m") == {"model": "m", "accuracy": 0.5, "stderr": 0.5, "n": 2}
    pr = ev.ProbeResult(mean=0.25, by_level={2: 0.5, 1: 0.0}, scores=[0.0, 0.5], generations=["", "x"])
    assert pr.as_row() == {"mean": 0.25, "level_1": 0.0, "level_2": 0.5}


def test_greedy_generate_batches_like_single_prompts(world):
    """Left-padded batches give each prompt the continuation it gets alone; settings are restored."""
    model, tokenizer = world
    prompts = [ev.probe_prompt(probe(n, 1)) for n in NAMES[:3]] + ["a much longer prompt " * 3]
    side, pad, mode = tokenizer.padding_side, tokenizer.pad_token, model.training
    model.train()
    batched = ev.greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    alone = [ev.greedy_generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all("\n" not in g for g in batched)
    assert (tokenizer.padding_side, tokenizer.pad_token, model.training) == (side, pad, True)
    model.train(mode)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.greedy_generate(model, tokenizer, prompts, max_new_tokens=0)
