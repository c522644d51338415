"""One dataclass per params.yaml section, built and checked from params.yaml.

params.yaml is the only place a default lives: these dataclasses have none,
so a key missing from params.yaml is an error naming it, never a second,
silently different default. ``from_params`` rejects unknown keys, wrong types
and out-of-range values with one message that names the key.
"""

import dataclasses
import math
import typing
from typing import Optional

import numpy as np

from toolcall.bfcl import CATEGORIES
from toolcall.errors import UserError

LOSSES = ("sigmoid", "ipo")
ALGOS = ("rft", "grpo")
DATA_SOURCES = ("wheel", "hub", "local")


class ConfigError(UserError, ValueError):
    """A params section that cannot be used; the message names the key."""


def from_params(cls, section, name):
    """Build ``cls`` from a params.yaml section (a dict) called ``name`` in messages."""
    section = dict(section or {})
    types = typing.get_type_hints(cls)
    unknown = sorted(set(section) - set(types))
    if unknown:
        raise ConfigError(f"params.yaml [{name}]: unknown keys {unknown}; known: {sorted(types)}")
    missing = sorted(set(types) - set(section))
    if missing:
        raise ConfigError(f"params.yaml [{name}]: missing keys {missing}")
    for key, value in section.items():
        want, optional = _unwrap(types[key])
        if value is None and optional:
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            section[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            expected = _type_name(want) + (" or null" if optional else "")
            raise ConfigError(f"params.yaml [{name}].{key}={value!r}: expected {expected}")
    cfg = cls(**section)
    for problem in cfg.check():
        raise ConfigError(f"params.yaml [{name}]: {problem}")
    return cfg


def _type_name(want):
    """``int``, or ``int or str`` for a union."""
    return " or ".join(t.__name__ for t in typing.get_args(want)) or want.__name__


def _unwrap(annotation):
    """``(type, optional)`` of a field annotation: ``Optional[int]`` is ``(int, True)``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0], True
    return annotation, False


def _category_problems(categories):
    if not isinstance(categories, list) or not categories or any(c not in CATEGORIES for c in categories):
        yield f"categories={categories} must be a non-empty list of {CATEGORIES}"


def categories(value):
    """params.yaml [data.categories], checked, for the stages that read only that key."""
    for problem in _category_problems(value):
        raise ConfigError(f"params.yaml [data]: {problem}")
    return value


def extra_sources(value):
    """params.yaml [data.extra], checked, for the stages that read only that key."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        raise ConfigError(f"params.yaml [data]: extra={value!r} must be a list of distinct source names")
    return value


def _rank_problems(cfg):
    """``ranks`` (data-parallel processes, toolcall/train/launch.py) must split every batch evenly."""
    if cfg.ranks < 1:
        yield f"ranks={cfg.ranks} must be >= 1"
    elif cfg.batch_size % cfg.ranks:
        yield f"batch_size={cfg.batch_size} must be divisible by ranks={cfg.ranks} (each rank takes an equal share)"


def seeded(section, seed, name):
    """A training section (params.yaml [sft], [dpo], [rl]) with the run's seed, which params.yaml never holds.

    One rule for every training stage: the seed comes from its command line
    (``--seed``). The main study runs each training stage once per seed of
    ``study.seeds`` (dvc.yaml foreach), every replicate's DPO and RL with its
    own SFT's seed; the ablation arms train at the first one.
    A ``seed`` key in the section would be a second, ignored source: refused.
    """
    section = dict(section or {})
    if "seed" in section:
        raise ConfigError(f"params.yaml [{name}].seed: seeds are not a [{name}] key; the main study runs once per "
                          "seed of [study].seeds, the ablation arms at its first: remove the key")
    return {**section, "seed": seed}


def _seed_problems(cfg):
    if cfg.seed < 0:
        yield f"seed={cfg.seed} must be >= 0"


def _at_least_one(cfg, keys):
    for key in keys:
        if getattr(cfg, key) < 1:
            yield f"{key}={getattr(cfg, key)} must be >= 1"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a LoRA training loop needs: optimizer schedule, batches, seed, reporting."""

    seed: int  # from the stage's --seed (see ``seeded``), not params.yaml
    learning_rate: float
    warmup: int
    iters: int
    batch_size: int
    grad_accumulation: int
    steps_per_report: int

    def check(self):
        yield from _seed_problems(self)
        if not 0 < self.learning_rate < 1:
            yield f"learning_rate={self.learning_rate} must be in (0, 1)"
        yield from _at_least_one(self, ("iters", "batch_size", "grad_accumulation", "steps_per_report"))
        if not 0 <= self.warmup < self.iters:
            yield f"warmup={self.warmup} must be in [0, iters)"


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


def _budget_problems(cfg):
    """An ``iters``-or-``epochs`` budget: exactly one of them set, and positive."""
    if (cfg.iters is None) == (cfg.epochs is None):
        yield (f"iters={cfg.iters}, epochs={cfg.epochs}: set exactly one (a number of steps, or passes over "
               "the training rows), the other null")
    elif cfg.iters is not None:
        yield from _at_least_one(cfg, ("iters",))
    elif cfg.epochs <= 0:
        yield f"epochs={cfg.epochs} must be > 0"


def _eval_every_problems(cfg, unit):
    if cfg.steps_per_eval < 0 or cfg.steps_per_eval % unit:
        yield (f"steps_per_eval={cfg.steps_per_eval} must be 0 (never) or a multiple of {unit} "
               "(evaluations happen at reports)")


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """params.yaml [sft]: the LoRA shape, the data layout, the training loop and its validation."""

    seed: int
    learning_rate: float
    warmup: int
    # The budget: ``epochs`` passes over the training rows, or (the ablation arms,
    # whose budgets are a fixed number of examples seen) ``iters`` steps; one is null.
    iters: Optional[int]
    epochs: Optional[float]
    batch_size: int
    grad_accumulation: int
    steps_per_report: int
    lora_rank: int
    # mlx-lm has no alpha: a LoRA layer adds scale * (x A B). PEFT's alpha/rank
    # = 16/8 (the paper's setting) is scale 2.0.
    lora_scale: float
    lora_layers: int
    lora_dropout: float
    max_seq_len: int
    mask_prompt: bool
    checkpoint_every: int
    # With a validation file: its loss every steps_per_eval steps (0: only at
    # the start and the end); the adapter kept is the one of the lowest; training
    # stops after ``patience`` evaluations without a new lowest (0: never early).
    steps_per_eval: int
    patience: int
    ranks: int  # data-parallel processes on a CPU (toolcall/train/launch.py); 1: one plain process

    def check(self):
        yield from _seed_problems(self)
        if not 0 < self.learning_rate < 1:
            yield f"learning_rate={self.learning_rate} must be in (0, 1)"
        yield from _budget_problems(self)
        yield from _rank_problems(self)
        yield from _at_least_one(self, ("batch_size", "grad_accumulation", "steps_per_report", "lora_rank",
                                        "lora_layers"))
        if self.iters is not None and not 0 <= self.warmup < self.iters:
            yield f"warmup={self.warmup} must be in [0, iters)"
        if self.warmup < 0:
            yield f"warmup={self.warmup} must be >= 0"
        unit = self.steps_per_report * self.grad_accumulation
        if self.checkpoint_every < 0 or self.checkpoint_every % unit:
            yield (f"checkpoint_every={self.checkpoint_every} must be 0 (never) or a multiple of steps_per_report "
                   f"x grad_accumulation = {unit} (saves happen at reports)")
        yield from _eval_every_problems(self, unit)
        if self.patience < 0:
            yield f"patience={self.patience} must be >= 0 (0: never stop early)"
        if not 0 <= self.lora_dropout < 1:
            yield f"lora_dropout={self.lora_dropout} must be in [0, 1)"
        if self.max_seq_len < 16:
            yield f"max_seq_len={self.max_seq_len} is too small"

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
        if self.warmup >= iters:
            raise ConfigError(f"params.yaml [sft]: warmup={self.warmup} must be below the {iters} steps of "
                              f"epochs={self.epochs} over {n_examples} rows")
        return TrainConfig(seed=self.seed, learning_rate=self.learning_rate, warmup=self.warmup, iters=iters,
                           batch_size=self.batch_size, grad_accumulation=self.grad_accumulation,
                           steps_per_report=self.steps_per_report)


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """params.yaml [dpo]; the LoRA shape is the SFT adapter's, not repeated here."""

    seed: int  # from the stage's --seed (see ``seeded``), not params.yaml
    beta: float
    loss_type: str
    learning_rate: float
    epochs: float  # passes over the preference pairs (their number is known only after sampling)
    batch_size: int
    prompts: int
    samples_per_prompt: int
    sample_batch: int
    temperature: float
    max_tokens: int
    checkpoint_every: int
    valid_prompts: int  # validation prompts whose pairs are held out, scored every steps_per_eval steps
    steps_per_eval: int
    ranks: int  # data-parallel processes on a CPU (toolcall/train/launch.py); 1: one plain process

    def check(self):
        yield from _seed_problems(self)
        yield from _rank_problems(self)
        if self.checkpoint_every < 0:
            yield f"checkpoint_every={self.checkpoint_every} must be >= 0 (0: never)"
        if self.beta <= 0:
            yield f"beta={self.beta} must be > 0"
        if self.loss_type not in LOSSES:
            yield f"loss_type={self.loss_type!r} must be one of {LOSSES}"
        if not 0 < self.learning_rate < 1:
            yield f"learning_rate={self.learning_rate} must be in (0, 1)"
        if self.epochs <= 0:
            yield f"epochs={self.epochs} must be > 0"
        yield from _at_least_one(self, ("batch_size", "prompts", "samples_per_prompt", "sample_batch",
                                        "max_tokens", "valid_prompts"))
        yield from _eval_every_problems(self, 1)
        if self.temperature <= 0:
            yield f"temperature={self.temperature} must be > 0 (0 is greedy: every sample the same)"

    def train(self, n_pairs):
        """DPO's optimizer loop over ``n_pairs`` pairs: ``epochs`` passes, no warmup, one batch per step."""
        return TrainConfig(seed=self.seed, learning_rate=self.learning_rate, warmup=0,
                           iters=epoch_steps(self.epochs, n_pairs, self.batch_size, self.ranks),
                           batch_size=self.batch_size, grad_accumulation=1, steps_per_report=1)

    def heldout_seed(self):
        """The held-out pairs' sampling seed: drawn from (seed, 1) by NumPy's SeedSequence.

        Not ``seed + 1``, which is the next replicate's training seed: seed 0's
        held-out draws would replay seed 1's training draws.
        """
        return int(np.random.SeedSequence([self.seed, 1]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class RlConfig:
    """params.yaml [rl]; the LoRA shape is the SFT adapter's, not repeated here."""

    algo: str
    seed: int  # from the stage's --seed (see ``seeded``), not params.yaml
    rounds: int
    prompts: int
    samples_per_prompt: int
    sample_batch: int
    temperature: float
    max_tokens: int
    learning_rate: float
    iters: int
    batch_size: int
    kl_coef: float
    clip_eps: float
    reward_ast: float
    reward_format: float
    min_reward: float
    ranks: int  # data-parallel processes on a CPU (toolcall/train/launch.py); 1: one plain process

    def check(self):
        yield from _seed_problems(self)
        yield from _rank_problems(self)
        if self.algo not in ALGOS:
            yield f"algo={self.algo!r} must be one of {ALGOS}"
        yield from _at_least_one(self, ("rounds", "prompts", "samples_per_prompt", "sample_batch", "max_tokens",
                                        "iters", "batch_size"))
        if self.algo == "grpo" and self.samples_per_prompt < 2:
            yield f"samples_per_prompt={self.samples_per_prompt} must be >= 2 for grpo (advantages are within a group)"
        if self.temperature <= 0:
            yield f"temperature={self.temperature} must be > 0 (0 is greedy: every sample the same)"
        if not 0 < self.learning_rate < 1:
            yield f"learning_rate={self.learning_rate} must be in (0, 1)"
        if self.kl_coef < 0 or self.clip_eps <= 0:
            yield f"kl_coef={self.kl_coef} must be >= 0 and clip_eps={self.clip_eps} > 0"
        if self.reward_ast <= 0 or self.reward_format < 0:
            yield f"reward_ast={self.reward_ast} must be > 0 and reward_format={self.reward_format} >= 0"
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
                           iters=self.iters, batch_size=self.batch_size, grad_accumulation=1, steps_per_report=1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """params.yaml [data]: where BFCL comes from and which categories the study uses."""

    source: str
    wheel: str
    wheel_sha256: str
    hub_repo: str
    hub_revision: Optional[str]
    local_dir: Optional[str]
    categories: list
    files: dict
    extra: list  # extra sources (names in extra_files) whose rows join the main study's training side
    extra_files: dict  # the pool, every one fetched and validated: name -> {category: the call pattern of its
                       # answers, questions: path, answers: path}

    def check(self):
        if self.source not in DATA_SOURCES:
            yield f"source={self.source!r} must be one of {DATA_SOURCES}"
        if self.source == "local" and not self.local_dir:
            yield "source: local needs local_dir (a directory with the BFCL files)"
        yield from _category_problems(self.categories)
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
class SplitConfig:
    """params.yaml [split]."""

    seed: int
    test_per_category: int
    valid_per_category: int
    train_per_category: Optional[int]

    def check(self):
        yield from _at_least_one(self, ("test_per_category", "valid_per_category"))
        if self.train_per_category is not None:
            yield from _at_least_one(self, ("train_per_category",))


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """params.yaml [validate]."""

    max_seq_len: int
    max_drop_fraction: float

    def check(self):
        if self.max_seq_len < 16:
            yield f"max_seq_len={self.max_seq_len} is too small"
        if not 0 <= self.max_drop_fraction <= 1:
            yield f"max_drop_fraction={self.max_drop_fraction} must be in [0, 1]"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """params.yaml [eval]: greedy decoding of a test file."""

    max_tokens: int
    batch_size: int
    # Generating processes: "auto" (sharding.default_workers: usable cores, capped by
    # memory, 1 on a GPU) or a count. Outputs do not depend on it.
    workers: typing.Union[int, str]

    def check(self):
        yield from _at_least_one(self, ("max_tokens", "batch_size"))
        if self.workers != "auto" and (not isinstance(self.workers, int) or isinstance(self.workers, bool)
                                       or self.workers < 1):
            yield f"workers={self.workers!r} must be 'auto' or a count >= 1"


@dataclasses.dataclass(frozen=True)
class ScaffoldConfig:
    """params.yaml [ablations.scaffold]: best-of-N."""

    n: int
    temperature: float
    seed: int
    per_category: Optional[int]

    def check(self):
        yield from _at_least_one(self, ("n",))
        if self.temperature <= 0:
            yield f"temperature={self.temperature} must be > 0 (0 is greedy: every sample the same)"
        if self.per_category is not None:
            yield from _at_least_one(self, ("per_category",))


@dataclasses.dataclass(frozen=True)
class AblationSplitConfig:
    """params.yaml [ablations.unseen_tools] and [ablations.unseen_patterns]."""

    seed: int
    test_per_category: int

    def check(self):
        yield from _at_least_one(self, ("test_per_category",))


@dataclasses.dataclass(frozen=True)
class DiversityConfig:
    """params.yaml [ablations.diversity]."""

    seed: int
    budget: int

    def check(self):
        yield from _at_least_one(self, ("budget",))


@dataclasses.dataclass(frozen=True)
class ExtraDataConfig:
    """params.yaml [ablations.extra]: the paper's training rows plus chosen extra sources."""

    sources: list  # extra sources (data.extra_files) this arm trains on beside the paper's rows

    def check(self):
        if not all(isinstance(name, str) for name in self.sources) or len(set(self.sources)) != len(self.sources):
            yield f"sources={self.sources} must be a list of distinct extra source names (data.extra_files)"


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

    equivalence_margin: float  # accuracy units: 0.05 = +/- 5 points counts as no effect
    alpha: float  # two-sided level of the difference interval; TOST uses the 1 - 2 alpha interval
    power: float  # the power at which the minimum detectable difference is stated

    def check(self):
        if not 0 < self.equivalence_margin < 1:
            yield f"equivalence_margin={self.equivalence_margin} must be in (0, 1) (accuracy units: 0.05 = 5 points)"
        if not 0 < self.alpha < 0.5:
            yield f"alpha={self.alpha} must be in (0, 0.5)"
        if not 0 < self.power < 1:
            yield f"power={self.power} must be in (0, 1)"
