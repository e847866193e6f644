"""Real benchmark data for full mode: WMDP, wikitext, RWKU and MMLU (Section 5, Chapter 2).

Every loader reads a Hugging Face hub dataset with :func:`datasets.load_dataset` and
returns plain Python lists in the schema the rest of :mod:`uoe_nb` uses:

* multiple-choice items ``{"question": str, "choices": [str, ...], "answer": int}``
  (plus ``"subject"`` for MMLU), the input of :func:`uoe_nb.evaluation.multiple_choice_accuracy`;
* corpora as ``list[str]`` (forget and retain texts for the unlearning objectives);
* RWKU probes ``{"query": str, "answer": str, "subject": str, "level": int}``, the input
  of :func:`uoe_nb.evaluation.probe_rouge_recall`.

Each loader takes ``path`` (default: the hub id) and ``data_files``, passed on to
``load_dataset``, so the same code reads a local copy, for example
``load_wmdp_questions(path="json", data_files="wmdp_cyber.jsonl")``. Nothing is downloaded
at import time. Tiny mode (``UOE_NB_MODE=tiny``) does not use this module: it builds a
synthetic world instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from uoe_nb.progress import progress_enabled

__all__ = [
    "FORGET_PROBE_KINDS",
    "MMLU_SMALLEST_SUBJECT",
    "MMLU_SUBJECTS",
    "NEIGHBOR_PROBE_KINDS",
    "WMDP_QUESTIONS",
    "WMDP_SUBSETS",
    "first_per_subject",
    "load_mmlu",
    "load_rwku_neighbor_probes",
    "load_rwku_passages",
    "load_rwku_probes",
    "load_rwku_targets",
    "load_wikitext",
    "load_wmdp_corpus",
    "load_wmdp_questions",
]

#: WMDP's three hazard areas (configs ``wmdp-bio``, ``wmdp-chem``, ``wmdp-cyber``).
WMDP_SUBSETS = ("bio", "chem", "cyber")
#: RWKU probes on the unlearning target: fill in the blank, question answering, adversarial.
FORGET_PROBE_KINDS = ("forget_level1", "forget_level2", "forget_level3")
#: RWKU probes on neighbouring knowledge that unlearning should leave intact.
NEIGHBOR_PROBE_KINDS = ("neighbor_level1", "neighbor_level2")
#: Test questions per WMDP subset (``cais/wmdp``'s dataset card): what "the first N" is cut from.
WMDP_QUESTIONS = {"bio": 1273, "chem": 408, "cyber": 1987}
#: MMLU's subjects (lm-eval's ``mmlu`` group has one subtask each) and the test size of the
#: smallest ones (``abstract_algebra`` and others: 100), so up to 100 questions per subject
#: give every subject the same weight; the test split has 14,042 questions in all.
MMLU_SUBJECTS = 57
MMLU_SMALLEST_SUBJECT = 100

DataFiles = str | Sequence[str] | Mapping[str, Any] | None


@contextlib.contextmanager
def _maybe_quiet_datasets() -> Iterator[None]:
    """Silence the datasets library's progress bars when ``UOE_NB_PROGRESS=0``."""
    import datasets

    turn_off = not progress_enabled() and not datasets.are_progress_bars_disabled()
    if turn_off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            datasets.enable_progress_bars()


def _load_rows(
    path: str,
    config: str | None,
    split: str,
    *,
    data_files: DataFiles,
    what: str,
    fields: Sequence[str],
) -> list[dict[str, Any]]:
    """Load one split as a list of dicts and check it has ``fields``.

    With ``data_files`` the hub config name is not passed (a ``json`` or ``parquet``
    builder has no such config), and files given as a string or list become ``split``.
    """
    import datasets

    kwargs: dict[str, Any] = {}
    name = config
    if data_files is not None:
        name = None
        kwargs["data_files"] = dict(data_files) if isinstance(data_files, Mapping) else {split: data_files}
    try:
        with _maybe_quiet_datasets():
            dataset = datasets.load_dataset(path, name, split=split, **kwargs)
    except ConnectionError as err:
        raise RuntimeError(
            f"could not load {what} from the Hugging Face hub ({path!r}, config {config!r}): full-mode data "
            "needs network access to the Hugging Face hub (or a local copy passed as path=/data_files=). "
            "Tiny mode (UOE_NB_MODE=tiny) uses the synthetic world instead and needs no data."
        ) from err
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} from {path!r} has no column(s) {missing}; its columns are {dataset.column_names}. "
            f"A local copy must use the same schema as the hub dataset."
        )
    return dataset.to_list()


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def _texts(rows: list[dict[str, Any]], limit: int | None, min_chars: int) -> list[str]:
    texts = [text.strip() for row in rows if isinstance(text := row["text"], str)]
    texts = [t for t in texts if len(t) >= max(1, min_chars)]
    return texts[:limit] if limit is not None else texts


def _subject_list(subjects: str | Sequence[str]) -> list[str]:
    subjects = [subjects] if isinstance(subjects, str) else list(subjects)
    if not subjects or not all(isinstance(s, str) and s for s in subjects):
        raise ValueError(f"subjects must be a non-empty list of names, got {subjects!r}")
    return subjects


# --------------------------------------------------------------------------- WMDP


def load_wmdp_questions(
    subset: str = "cyber", *, path: str = "cais/wmdp", data_files: DataFiles = None, split: str = "test"
) -> list[dict[str, Any]]:
    """WMDP multiple-choice questions, the forget-accuracy benchmark (Section 5).

    Hub ``cais/wmdp``, config ``wmdp-<subset>``, split ``test``. Returns
    ``{"question", "choices", "answer"}`` dicts (four choices, ``answer`` an index).
    """
    _check_choice(subset, WMDP_SUBSETS, "WMDP subset")
    rows = _load_rows(
        path,
        f"wmdp-{subset}",
        split,
        data_files=data_files,
        what=f"WMDP {subset} questions",
        fields=("question", "choices", "answer"),
    )
    return [
        {"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in rows
    ]


def load_wmdp_corpus(
    subset: str = "cyber",
    kind: str = "forget",
    limit: int | None = None,
    *,
    min_chars: int = 1,
    path: str = "cais/wmdp-corpora",
    data_files: DataFiles = None,
    split: str = "train",
) -> list[str]:
    """WMDP forget or retain corpus texts, the data RMU and GA unlearn on (Section 5).

    Hub ``cais/wmdp-corpora``, configs ``<subset>-forget-corpus`` / ``<subset>-retain-corpus``,
    field ``text``. Texts are stripped; those shorter than ``min_chars`` are dropped and the
    first ``limit`` kept. The bio forget corpus is not on the hub: it is gated and must be
    requested from the WMDP authors; pass the file you receive as ``path="json", data_files=...``.
    """
    _check_choice(subset, ("bio", "cyber"), "WMDP corpus subset")
    _check_choice(kind, ("forget", "retain"), "WMDP corpus kind")
    _check_limit(limit)
    if subset == "bio" and kind == "forget" and data_files is None and path == "cais/wmdp-corpora":
        raise ValueError(
            "the WMDP bio forget corpus is gated and not part of cais/wmdp-corpora: request it from the WMDP "
            "authors (see https://github.com/centerforaisafety/wmdp), then load the jsonl you receive with "
            "load_wmdp_corpus('bio', 'forget', path='json', data_files='bio_remove_dataset.jsonl'), "
            "or use the cyber corpus"
        )
    rows = _load_rows(
        path,
        f"{subset}-{kind}-corpus",
        split,
        data_files=data_files,
        what=f"WMDP {subset} {kind} corpus",
        fields=("text",),
    )
    return _texts(rows, limit, min_chars)


# --------------------------------------------------------------------------- wikitext


def load_wikitext(
    limit: int | None = None,
    *,
    min_chars: int = 1,
    path: str = "wikitext",
    config: str = "wikitext-2-raw-v1",
    data_files: DataFiles = None,
    split: str = "test",
) -> list[str]:
    """Wikitext lines, the retain set of the WMDP experiments (Section 5).

    Hub ``wikitext``, config ``wikitext-2-raw-v1``, split ``test``; each row is one line of
    text. Lines are stripped, empty ones (and those shorter than ``min_chars``) dropped, and
    the first ``limit`` kept.
    """
    _check_limit(limit)
    rows = _load_rows(path, config, split, data_files=data_files, what="wikitext", fields=("text",))
    return _texts(rows, limit, min_chars)


# --------------------------------------------------------------------------- RWKU


def load_rwku_targets(
    *, path: str = "jinzhuoran/RWKU", data_files: DataFiles = None, split: str = "train"
) -> list[dict[str, Any]]:
    """RWKU's 200 unlearning targets (famous people), config ``forget_target`` (Section 5).

    Returns the rows as dicts; ``"target"`` is the name that the passages and probes call
    ``subject``.
    """
    return _load_rows(
        path, "forget_target", split, data_files=data_files, what="RWKU targets", fields=("target",)
    )


def load_rwku_passages(
    subjects: str | Sequence[str],
    *,
    path: str = "jinzhuoran/RWKU",
    data_files: DataFiles = None,
    split: str = "train",
) -> list[str]:
    """RWKU's original passages about ``subjects``, the forget corpus of the RWKU runs (Section 5).

    Config ``train_original_passage``, field ``text``, kept where ``subject`` is one of
    ``subjects``, in dataset order.
    """
    wanted = _subject_list(subjects)
    rows = _load_rows(
        path,
        "train_original_passage",
        split,
        data_files=data_files,
        what="RWKU passages",
        fields=("text", "subject"),
    )
    _check_subjects_found(wanted, rows, "passages")
    return [r["text"] for r in rows if r["subject"] in wanted]


def _check_subjects_found(wanted: list[str], rows: list[dict[str, Any]], what: str) -> None:
    present = {r["subject"] for r in rows}
    absent = [s for s in wanted if s not in present]
    if absent:
        examples = sorted(present)[:5]
        raise ValueError(
            f"RWKU has no {what} for subject(s) {absent}; subjects are RWKU target names such as {examples} "
            "(see load_rwku_targets())"
        )


def load_rwku_probes(
    subjects: str | Sequence[str],
    kinds: Sequence[str] = FORGET_PROBE_KINDS,
    *,
    path: str = "jinzhuoran/RWKU",
    data_files: Mapping[str, Any] | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """RWKU probes about ``subjects``: ``{"query", "answer", "subject", "level"}`` dicts (Section 5).

    ``kinds`` are RWKU configs: ``forget_level1`` (fill in the blank), ``forget_level2``
    (question answering), ``forget_level3`` (adversarial questions), and the neighbour
    probes ``neighbor_level1`` / ``neighbor_level2``. ``level`` becomes an int (RWKU stores
    it as text). For local copies, ``data_files`` maps each kind to its file(s).
    """
    wanted = _subject_list(subjects)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds:
        raise ValueError(
            f"kinds is empty: name RWKU probe kinds from {FORGET_PROBE_KINDS + NEIGHBOR_PROBE_KINDS}"
        )
    if data_files is not None and not isinstance(data_files, Mapping):
        raise ValueError(
            "data_files for RWKU probes must map each kind to its file(s), e.g. {'forget_level1': 'l1.json'}"
        )
    probes: list[dict[str, Any]] = []
    all_rows: list[dict[str, Any]] = []
    for kind in kinds:
        _check_choice(kind, FORGET_PROBE_KINDS + NEIGHBOR_PROBE_KINDS, "RWKU probe kind")
        if data_files is not None and kind not in data_files:
            raise ValueError(f"data_files has no entry for probe kind {kind!r}; it has {sorted(data_files)}")
        rows = _load_rows(
            path,
            kind,
            split,
            data_files=data_files[kind] if data_files is not None else None,
            what=f"RWKU {kind} probes",
            fields=("query", "answer", "subject", "level"),
        )
        all_rows += rows
        probes += [
            {"query": r["query"], "answer": r["answer"], "subject": r["subject"], "level": int(r["level"])}
            for r in rows
            if r["subject"] in wanted
        ]
    _check_subjects_found(wanted, all_rows, f"{'/'.join(kinds)} probes")
    return probes


def load_rwku_neighbor_probes(
    subjects: str | Sequence[str],
    *,
    path: str = "jinzhuoran/RWKU",
    data_files: Mapping[str, Any] | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """RWKU neighbour probes (``neighbor_level1`` and ``neighbor_level2``): knowledge to keep (Section 5)."""
    return load_rwku_probes(subjects, NEIGHBOR_PROBE_KINDS, path=path, data_files=data_files, split=split)


# --------------------------------------------------------------------------- MMLU


def load_mmlu(
    subjects: str | Sequence[str] | None = None,
    *,
    path: str = "cais/mmlu",
    data_files: DataFiles = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """MMLU questions, the utility benchmark (Section 5): ``{"question", "choices", "answer", "subject"}``.

    Hub ``cais/mmlu``, split ``test``: config ``all`` when ``subjects`` is None, else one
    config per subject (e.g. ``"college_biology"``). A local copy is read once and
    filtered by its ``subject`` column.
    """
    fields = ("question", "choices", "answer", "subject")
    wanted = None if subjects is None else _subject_list(subjects)
    if wanted is None:
        rows = _load_rows(path, "all", split, data_files=data_files, what="MMLU", fields=fields)
    elif data_files is not None:
        rows = _load_rows(path, None, split, data_files=data_files, what="MMLU", fields=fields)
        present = {r["subject"] for r in rows}
        absent = [s for s in wanted if s not in present]
        if absent:
            raise ValueError(f"MMLU has no subject(s) {absent}; subjects look like {sorted(present)[:5]}")
        rows = [r for r in rows if r["subject"] in wanted]
    else:
        rows = []
        for subject in wanted:
            rows += _load_rows(path, subject, split, data_files=None, what=f"MMLU {subject}", fields=fields)
    return [
        {
            "question": r["question"],
            "choices": list(r["choices"]),
            "answer": int(r["answer"]),
            "subject": r["subject"],
        }
        for r in rows
    ]


def first_per_subject(items: Sequence[Mapping[str, Any]], per_subject: int) -> list[dict[str, Any]]:
    """The first ``per_subject`` items of every ``subject``, in their order (Section 5).

    The same fixed, balanced MMLU subset that lm-eval's ``limit`` selects per subtask, for
    items loaded with :func:`load_mmlu`: every subject with at least ``per_subject``
    questions contributes exactly that many.
    """
    if isinstance(per_subject, bool) or not isinstance(per_subject, int) or per_subject < 1:
        raise ValueError(f"per_subject must be a positive int, got {per_subject!r}")
    taken: dict[str, int] = {}
    out = []
    for i, item in enumerate(items):
        if "subject" not in item:
            raise ValueError(f"item {i} has no 'subject' field: load MMLU with load_mmlu()")
        subject = item["subject"]
        if taken.get(subject, 0) < per_subject:
            taken[subject] = taken.get(subject, 0) + 1
            out.append(dict(item))
    return out
