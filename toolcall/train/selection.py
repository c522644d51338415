"""The adapter a training stage keeps: the one of the highest greedy accuracy on the validation rows.

Every training stage (SFT, DPO, RL) measures its model as it stands at step 0
(the model it started from), every few steps and after the last, the way
stage eval measures the test split: the same prompts (``PromptFormat.prompt``,
which no prompt style changes), greedy ``generation.generate`` with params
``eval.max_tokens`` and ``eval.batch_size``, each answer scored by
``score.score_output``. It keeps the weights of the highest accuracy; a tie
keeps the earlier step (more training for no gain on what eval measures is
not taken). A loss, or DPO's held-out pair ranking, follows the gold tokens
under teacher forcing; what the report compares is what the model writes when
it decodes on its own, so that is what chooses.

Beside the accuracy each evaluation reports how the answers are written
(``FORMAT``): the share that do not parse, their mean length, the share cut
at ``max_tokens``, and calls per answer beside the gold answers' (the same at
every step: a reference line on the plot).

Under data-parallel ranks (``launch``) the prompts are dealt round-robin,
longest first (as ``sharding`` deals them to eval's processes), each rank
generates its share and ``launch.share`` gives every rank all the answers:
every rank scores them all and keeps the same weights. Greedy answers depend
on their own prompt only, so the rank count does not change them.
"""

import time

import numpy as np

from toolcall import config
from toolcall.bfcl.rows import gold_calls
from toolcall.evaluate.generation import generate
from toolcall.evaluate.score import score_output
from toolcall.model import lora
from toolcall.train import launch

METRIC = "valid_accuracy"
# How the answers are written, per evaluation (listed beside the accuracy in the metrics' selection block).
FORMAT = ("malformed_rate", "mean_answer_tokens", "share_at_max_tokens", "mean_calls", "gold_mean_calls")


class ValidationSet:
    """Validation rows as stage eval decodes a test file (see the module's docstring)."""

    def __init__(self, rows, fmt, max_tokens, batch_size, label=None):
        self.rows, self.tokenizer = rows, fmt.tokenizer
        self.max_tokens, self.batch_size, self.label = max_tokens, batch_size, label
        self.prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
        self.gold_mean_calls = round(float(np.mean([len(gold_calls(r["ground_truth"])) for r in rows])), 4)
        self.seconds = []  # of each evaluation this process ran

    def settings(self):
        """What else the answers depend on, for a checkpoint's fingerprint (the rows are the stage's data)."""
        return {"max_tokens": self.max_tokens, "batch_size": self.batch_size}

    def by_category(self, correct):
        """``{category: accuracy}`` of a ``measure`` result's "0110…" string, categories in first-row order."""
        rows = {}
        for row, c in zip(self.rows, correct):
            rows.setdefault(row["category"], []).append(c == "1")
        return {cat: round(float(np.mean(v)), 4) for cat, v in rows.items()}

    def answers(self, model):
        """``[(text, n_generated_tokens)]`` of the model as it is, in row order (ranks share the work)."""
        order = sorted(range(len(self.prompts)), key=lambda i: -len(self.prompts[i]))
        shares = [order[r::launch.size()] for r in range(launch.size())]  # one share per rank

        def run(block):  # a rank's share may be empty (fewer rows than ranks)
            return [generate(model, self.tokenizer, [self.prompts[i] for i in share], max_tokens=self.max_tokens,
                             batch_size=self.batch_size, progress=self.label) if share else [] for share in block]

        out = [None] * len(self.prompts)
        for share, result in zip(shares, launch.share(run, shares)):
            for i, answer in zip(share, result):
                out[i] = answer
        return out

    def measure(self, model):
        """Accuracy and the ``FORMAT`` statistics of the model's greedy answers (dropout off while decoding),
        and which rows it answered correctly: ``(metrics, "0110…")``, a character per row in file order."""
        start, training = time.perf_counter(), model.training
        model.eval()
        answers = self.answers(model)
        if training:
            model.train()
        records = [score_output(row, text) for row, (text, _) in zip(self.rows, answers)]
        tokens = np.array([n for _, n in answers])
        malformed = [(r["error_type"] or "").startswith("parse:") for r in records]  # no call could be read
        self.seconds.append(round(time.perf_counter() - start, 1))
        correct = "".join("1" if r["valid"] else "0" for r in records)
        return {
            METRIC: round(float(np.mean([r["valid"] for r in records])), 4),
            "malformed_rate": round(float(np.mean(malformed)), 4),
            "mean_answer_tokens": round(float(tokens.mean()), 2),
            "share_at_max_tokens": round(float(np.mean(tokens >= self.max_tokens)), 4),
            "mean_calls": round(float(np.mean([len(r["calls"]) for r in records])), 4),
            "gold_mean_calls": self.gold_mean_calls,
        }, correct


class Selection:
    """A run's evaluations (``curve``) and the weights of the best so far.

    ``selection(step)`` measures the model after ``step`` steps and returns the
    metrics (to log); the first evaluation is always the best so far, a later
    one only when its accuracy is strictly higher. ``patience`` (0: never):
    evaluations in a row without a new best after which ``exhausted()``.
    """

    def __init__(self, model, valid, patience):
        self.model, self.valid, self.patience = model, valid, patience
        self.curve = []  # {"step", METRIC, *FORMAT} per evaluation, in order
        self.correct = []  # per evaluation: which validation rows it answered correctly (ValidationSet.measure)
        self.best, self.since_best, self.weights = None, 0, None  # best: an index into curve

    def __call__(self, step):
        metrics, correct = self.valid.measure(self.model)
        self.curve.append({"step": step, **metrics})
        self.correct.append(correct)
        if self.best is None or metrics[METRIC] > self.curve[self.best][METRIC]:
            self.best, self.since_best, self.weights = len(self.curve) - 1, 0, lora.snapshot(self.model)
        else:
            self.since_best += 1
        return metrics

    @property
    def chosen_step(self):
        return self.curve[self.best]["step"]

    def exhausted(self):
        return 0 < self.patience <= self.since_best

    def restore(self):
        """Put the best evaluation's weights back into the model."""
        lora.restore(self.model, self.weights)

    def state(self):
        """What a checkpoint keeps: JSON meta and the best weights."""
        meta = {"curve": self.curve, "correct": self.correct, "best": self.best, "since_best": self.since_best}
        return meta, dict(self.weights)

    def load(self, meta, weights):
        self.curve, self.correct, self.best, self.since_best = (meta["curve"], meta["correct"], meta["best"],
                                                                meta["since_best"])
        self.weights = list(weights.items())

    def summary(self):
        """The metrics file's ``selection`` block: each evaluation's step and numbers, the chosen one's, step 0's."""
        chosen = self.curve[self.best]
        return {
            "metric": METRIC,
            "valid_examples": len(self.valid.rows),
            "steps": [row["step"] for row in self.curve],
            METRIC: [row[METRIC] for row in self.curve],
            "chosen_step": chosen["step"],
            "chosen_valid_accuracy": chosen[METRIC],
            "start_valid_accuracy": self.curve[0][METRIC],  # step 0: the model the stage started from
            **{key: [row[key] for row in self.curve] for key in FORMAT},
            # The chosen evaluation's rows, for paired comparisons of runs on the same validation file
            # (toolcall/report/sweep.py): "1" where the answer passed, in the file's row order.
            "chosen_correct": self.correct[self.best],
            "chosen_by_category": self.valid.by_category(self.correct[self.best]),
        }


def on_validation(model, fmt, rows, label, patience=0):
    """The ``Selection`` of a training stage on validation ``rows``, decoded with params [eval]'s settings."""
    p = config.load("eval")
    return Selection(model, ValidationSet(rows, fmt, p.max_tokens, p.batch_size, label), patience)
