"""The tiny world: determinism, schemas, and the separation of forget and retain."""

import pytest

from uoe_nb.world import build_world, qa_line


@pytest.fixture(scope="module")
def world():
    return build_world(0)


def test_deterministic_and_seed_dependent(world):
    again = build_world(0)
    assert again.fingerprint() == world.fingerprint()
    assert again.forget_questions == world.forget_questions
    assert build_world(1).fingerprint() != world.fingerprint()


def _check_mc(items):
    assert items
    for it in items:
        assert set(it) >= {"question", "choices", "answer"}
        assert isinstance(it["question"], str) and it["question"]
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert 0 <= it["answer"] < 4


def test_wmdp_like_schema(world):
    _check_mc(world.forget_questions)
    assert len(world.forget_questions) == 4 * len(world.crystals)
    # The correct answer is the crystal's own attribute.
    by_name = {c["name"]: c for c in world.crystals}
    for q in world.forget_questions:
        assert q["choices"][q["answer"]] == by_name[q["entity"]][q["attribute"]]
    # Answer positions are balanced enough that always picking one letter is near chance.
    counts = [sum(q["answer"] == k for q in world.forget_questions) for k in range(4)]
    assert max(counts) / len(world.forget_questions) < 0.4


def test_mmlu_like_schema(world):
    _check_mc(world.utility_questions)
    subjects = {q["subject"] for q in world.utility_questions}
    assert subjects == {"geography", "zoology", "astronomy", "arithmetic"}


def test_rwku_like_schema(world):
    targets, neighbors = set(world.forget_targets), set(world.neighbors)
    assert targets and neighbors and not targets & neighbors
    for probes, subjects in ((world.forget_probes, targets), (world.neighbor_probes, neighbors)):
        assert probes
        for p in probes:
            assert set(p) >= {"query", "answer", "subject", "level"}
            assert p["subject"] in subjects
            assert p["level"] in (1, 2)
            if p["level"] == 1:
                assert "___" in p["query"]
            else:
                assert p["query"].endswith("?")
        assert {p["level"] for p in probes} == {1, 2}
    for b in world.bio_passages:
        assert b["subject"] in targets | neighbors and b["subject"] in b["text"]


def test_oracle_corpus_drops_forget_domain_and_targets(world):
    full = world.pretraining_corpus(include_forget=True)
    oracle = world.pretraining_corpus(include_forget=False)
    assert set(oracle) < set(full)
    text = " ".join(oracle)
    assert "vorn crystal" not in text
    for name in world.forget_targets:
        assert name not in text
    for name in world.neighbors:
        assert name in text
    # Everything the forget tests ask about is in the full corpus, in the scored format.
    for q in world.forget_questions:
        assert qa_line(q["question"], q["choices"][q["answer"]]) in full


def test_general_text_is_broad_and_forget_domain_narrow(world):
    retain_words = {w for doc in world.retain_corpus for w in doc.split()}
    forget_words = {w for doc in world.forget_corpus for w in doc.split()}
    crystal_names = {c["name"] for c in world.crystals}
    # The forget domain's vocabulary, names aside, is small next to the general text's.
    assert len(forget_words - crystal_names) * 3 < len(retain_words)
    assert len(world.general_topics) >= 12


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="at least"):
        build_world(0, num_crystals=2)
