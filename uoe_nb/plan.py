"""What a chapter is about to compute in full mode, and how long that should take (every chapter).

A chapter prints its plan before it trains: how many unlearning runs, optimizer steps and
training tokens, how many evaluation questions, generations and attack steps, and an
estimate of the time on one A100-80 GPU::

    plan = Plan("Chapter 5")
    plan.train("GA+UOE per layer", runs=16, steps=40, batch_size=4, max_length=512,
               forget_evals=4, forget_questions=500, utility_evals=1, utility_questions=1140)
    plan.evaluate("original model", passes=1, questions=1640)
    plan.show()

The estimate comes from a :class:`Throughput` that says where its numbers come from. The
default, :data:`A100_ESTIMATE`, converts the one real-size measurement of this project
(OLMoE-1B-7B with random bf16 weights on one H100, batch 4 x 512: whole-model GA
0.222 s/step, one expert + router 0.075 s/step with the full forward, forward only about
47k tokens/s) to an A100 by halving every H100 rate. That factor is an assumption until
measured on an A100: an A100-80 has about 0.6x an H100's memory bandwidth and about 0.3x
its dense bf16 compute, and small-batch MoE steps are mostly bound by the former.
The time counts training, scoring and decoding, plus a fixed overhead per evaluation pass;
model loading, downloads and attribution passes come on top.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field, replace

__all__ = ["A100_ESTIMATE", "H100_MEASURED", "Plan", "PlanLine", "Throughput"]

SCOPE_KINDS = ("full", "uoe")


@dataclass(frozen=True)
class Throughput:
    """Rates a plan converts its work to time with, and where they come from.

    ``train_tokens_per_s`` maps a scope kind to training tokens per second: ``"full"``
    (every parameter trains, or so many that the whole backward pass runs) and ``"uoe"``
    (one expert and its router, or a few experts). ``forward_tokens_per_s`` is for scoring
    (one forward pass per multiple-choice question: lm-eval scores the four one-letter
    answers from one forward of the shared prompt) and attack candidates;
    ``generate_tokens_per_s`` for greedy decoding at batch 16. ``forget_question_tokens``
    and ``utility_question_tokens`` are prompt lengths of a WMDP-cyber and an MMLU question;
    ``evaluation_overhead_s`` is added per evaluation pass (lm-eval building its requests).
    """

    name: str
    train_tokens_per_s: dict[str, float]
    forward_tokens_per_s: float
    generate_tokens_per_s: float
    forget_question_tokens: int = 220
    utility_question_tokens: int = 150
    evaluation_overhead_s: float = 5.0
    source: str = ""

    def __post_init__(self) -> None:
        missing = [k for k in SCOPE_KINDS if k not in self.train_tokens_per_s]
        if missing:
            raise ValueError(
                f"train_tokens_per_s needs a rate for every scope kind {SCOPE_KINDS}; missing {missing}"
            )
        rates = [*self.train_tokens_per_s.values(), self.forward_tokens_per_s, self.generate_tokens_per_s]
        if not all(isinstance(r, (int, float)) and r > 0 for r in rates):
            raise ValueError(f"throughputs must be positive numbers (tokens per second), got {rates}")

    def scaled(self, factor: float, name: str, source: str) -> Throughput:
        """The same rates times ``factor`` (for example another GPU), with its own name and source."""
        return replace(
            self,
            name=name,
            train_tokens_per_s={k: v * factor for k, v in self.train_tokens_per_s.items()},
            forward_tokens_per_s=self.forward_tokens_per_s * factor,
            generate_tokens_per_s=self.generate_tokens_per_s * factor,
            source=source,
        )


_STEP_TOKENS = 4 * 512
#: OLMoE-1B-7B (random bf16 weights, transformers 5.17) on one H100, batch 4 x 512, measured
#: once. Generation was not measured: 15 ms per decode step of 16 prompts on an H100 is an
#: assumption. Prompt lengths: WMDP-cyber's test split holds 1,576,479 bytes
#: for 1,987 questions and MMLU's 6,967,453 bytes for 14,042 (the dataset cards), at about 4
#: bytes per token plus lm-eval's template.
H100_MEASURED = Throughput(
    name="one H100 (OLMoE-1B-7B)",
    train_tokens_per_s={"full": _STEP_TOKENS / 0.222, "uoe": _STEP_TOKENS / 0.075},
    forward_tokens_per_s=_STEP_TOKENS / 0.044,
    generate_tokens_per_s=16 / 0.015,
    source="H100 measurement of OLMoE-1B-7B at batch 4 x 512: whole-model GA 0.222 s/step, "
    "one expert + router 0.075 s/step, forward 0.044 s; decoding assumed",
)
#: Half the H100 rates: an assumption until measured on an A100-80.
A100_ESTIMATE = H100_MEASURED.scaled(
    0.5,
    "one A100-80 (estimate)",
    "H100 rates of OLMoE-1B-7B halved (assumed A100/H100 ratio, not measured)",
)


@dataclass
class PlanLine:
    """One line of a plan: what it computes and its estimated seconds."""

    label: str
    kind: str
    runs: int = 0
    optimizer_steps: int = 0
    training_tokens: int = 0
    evaluations: int = 0
    questions: int = 0
    forward_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


def _count(value: object, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _short(n: float) -> str:
    """1,234 -> '1.2k', 3,400,000 -> '3.4M'."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


@dataclass
class Plan:
    """The work a chapter will do and its estimated time on one GPU (every chapter, full mode).

    Add lines with :meth:`train`, :meth:`evaluate`, :meth:`generate` and :meth:`gcg`; the
    totals (``runs``, ``optimizer_steps``, ``training_tokens``, ``evaluations``,
    ``questions``, ``forward_tokens``, ``generated_tokens``, ``seconds``,
    ``hours_a100``) are attributes, so a test can compare them with what the chapter's runs
    asked for. :meth:`show` prints the table and one machine-readable line.
    """

    title: str
    throughput: Throughput = A100_ESTIMATE
    lines: list[PlanLine] = field(default_factory=list)

    # ------------------------------------------------------------------ lines

    def _mc_seconds(self, passes: int, questions: int, tokens_per_question: int) -> tuple[int, float]:
        tokens = passes * questions * tokens_per_question
        seconds = tokens / self.throughput.forward_tokens_per_s
        return tokens, seconds + passes * self.throughput.evaluation_overhead_s

    def train(
        self,
        label: str,
        *,
        runs: int = 1,
        steps: int,
        batch_size: int,
        max_length: int,
        scope: str = "uoe",
        retain: bool = False,
        forget_evals: int = 0,
        forget_questions: int = 0,
        utility_evals: int = 0,
        utility_questions: int = 0,
    ) -> PlanLine:
        """``runs`` training runs (unlearning, or the relearning attack's fine-tuning) of ``steps``
        optimizer steps on ``batch_size`` x ``max_length`` tokens.

        ``scope`` is ``"uoe"`` or ``"full"`` (see :class:`Throughput`); ``retain`` doubles the
        tokens for methods that also take a retain batch (GradDiff, NPO with a retain term).
        Each run evaluates forget accuracy ``forget_evals`` times on ``forget_questions``
        questions and utility ``utility_evals`` times on ``utility_questions``.
        """
        if scope not in SCOPE_KINDS:
            raise ValueError(f"scope must be one of {SCOPE_KINDS} (the kind of training step), got {scope!r}")
        runs = _count(runs, "runs", 1)
        steps = _count(steps, "steps")
        tokens_per_step = _count(batch_size, "batch_size", 1) * _count(max_length, "max_length", 1)
        tokens_per_step *= 2 if retain else 1
        counts = [_count(v, k) for k, v in (("forget_evals", forget_evals), ("forget_questions", forget_questions),
                  ("utility_evals", utility_evals), ("utility_questions", utility_questions))]  # fmt: skip
        f_evals, f_questions, u_evals, u_questions = counts
        if (f_evals and not f_questions) or (u_evals and not u_questions):
            raise ValueError("an evaluation needs questions: give forget_questions / utility_questions")
        f_tokens, f_seconds = self._mc_seconds(f_evals, f_questions, self.throughput.forget_question_tokens)
        u_tokens, u_seconds = self._mc_seconds(u_evals, u_questions, self.throughput.utility_question_tokens)
        training_tokens = runs * steps * tokens_per_step
        seconds = training_tokens / self.throughput.train_tokens_per_s[scope] + runs * (f_seconds + u_seconds)
        line = PlanLine(label, f"{scope}", runs=runs, optimizer_steps=runs * steps,
                        training_tokens=training_tokens, evaluations=runs * (f_evals + u_evals),
                        questions=runs * (f_evals * f_questions + u_evals * u_questions),
                        forward_tokens=runs * (f_tokens + u_tokens), seconds=seconds)  # fmt: skip
        self.lines.append(line)
        return line

    def evaluate(self, label: str, *, passes: int = 1, questions: int, part: str = "utility") -> PlanLine:
        """``passes`` evaluations of ``questions`` multiple-choice questions (``part``: forget or utility)."""
        if part not in ("forget", "utility"):
            raise ValueError(f"part must be 'forget' or 'utility', got {part!r}")
        passes, questions = _count(passes, "passes", 1), _count(questions, "questions", 1)
        per_question = getattr(self.throughput, f"{part}_question_tokens")
        tokens, seconds = self._mc_seconds(passes, questions, per_question)
        line = PlanLine(label, "eval", evaluations=passes, questions=passes * questions, forward_tokens=tokens,
                        seconds=seconds)  # fmt: skip
        self.lines.append(line)
        return line

    def generate(self, label: str, *, prompts: int, new_tokens: int, prompt_tokens: int = 64) -> PlanLine:
        """Greedy answers to ``prompts`` prompts of ``prompt_tokens`` tokens, ``new_tokens`` each (probes, examples)."""
        prompts, new_tokens = _count(prompts, "prompts", 1), _count(new_tokens, "new_tokens", 1)
        prompt_tokens = _count(prompt_tokens, "prompt_tokens")
        generated = prompts * new_tokens
        forward = prompts * prompt_tokens
        seconds = (
            generated / self.throughput.generate_tokens_per_s + forward / self.throughput.forward_tokens_per_s
        )
        line = PlanLine(label, "gen", forward_tokens=forward, generated_tokens=generated, seconds=seconds)
        self.lines.append(line)
        return line

    def gcg(
        self, label: str, *, steps: int, candidates: int, prompts: int, suffix_tokens: int, prompt_tokens: int
    ) -> PlanLine:
        """A GCG attack (Chapter 7): per step, one gradient pass over ``prompts`` prompts (about
        three forwards' worth) and ``candidates`` suffixes scored on each of them, every sequence
        ``prompt_tokens + suffix_tokens`` long (the target answer counted in ``prompt_tokens``)."""
        steps, candidates = _count(steps, "steps", 1), _count(candidates, "candidates", 1)
        prompts = _count(prompts, "prompts", 1)
        length = _count(prompt_tokens, "prompt_tokens", 1) + _count(suffix_tokens, "suffix_tokens", 1)
        forward = steps * prompts * length * (candidates + 3)
        line = PlanLine(
            label, "gcg", forward_tokens=forward, seconds=forward / self.throughput.forward_tokens_per_s
        )
        self.lines.append(line)
        return line

    # ------------------------------------------------------------------ totals

    def _sum(self, key: str) -> int:
        return sum(getattr(line, key) for line in self.lines)

    @property
    def runs(self) -> int:
        return self._sum("runs")

    @property
    def optimizer_steps(self) -> int:
        return self._sum("optimizer_steps")

    @property
    def training_tokens(self) -> int:
        return self._sum("training_tokens")

    @property
    def evaluations(self) -> int:
        return self._sum("evaluations")

    @property
    def questions(self) -> int:
        return self._sum("questions")

    @property
    def forward_tokens(self) -> int:
        return self._sum("forward_tokens")

    @property
    def generated_tokens(self) -> int:
        return self._sum("generated_tokens")

    @property
    def seconds(self) -> float:
        return float(sum(line.seconds for line in self.lines))

    @property
    def hours_a100(self) -> float:
        """Estimated hours (on the GPU the throughput describes; one A100-80 by default)."""
        return self.seconds / 3600

    # ------------------------------------------------------------------ output

    def table(self) -> str:
        """The plan as text lines of at most 88 characters, ending in one machine-readable line."""
        header = f"{'':<24} {'kind':<4} {'runs':>4} {'steps':>6} {'train tok':>9} {'evals':>5} " \
                 f"{'questions':>9} {'fwd tok':>8} {'min':>6}"  # fmt: skip
        rule = "-" * len(header)

        def row(label: str, kind: str, values: PlanLine | Plan) -> str:
            fwd = values.forward_tokens + values.generated_tokens
            return (
                f"{label[:24]:<24} {kind:<4} {values.runs:>4} {values.optimizer_steps:>6} "
                f"{_short(values.training_tokens):>9} {values.evaluations:>5} {values.questions:>9,} "
                f"{_short(fwd):>8} {values.seconds / 60:>6.1f}"
            )

        out = [f"Plan: {self.title}, estimated on {self.throughput.name}", rule, header, rule]
        out += [row(line.label, line.kind, line) for line in self.lines]
        out += [rule, row("total", "", self)]
        out += textwrap.wrap(f"rates: {self.throughput.source}", width=88, subsequent_indent="  ")
        out.append(
            f"plan: runs={self.runs} optimizer_steps={self.optimizer_steps} training_tokens={self.training_tokens} "
            f"questions={self.questions} forward_tokens={self.forward_tokens + self.generated_tokens} "
            f"hours_a100={self.hours_a100:.2f}"
        )
        return "\n".join(out)

    def show(self) -> None:
        """Print :meth:`table` (a chapter calls this before it trains)."""
        sys.stdout.write(self.table() + "\n")
