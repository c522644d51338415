"""DPO: the loss against hand-computed values, the pair builder, the corruptions."""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from configs import config
from dag_deps import expanded_stages
from tiny_model import make_tiny_model
from toolcall.bfcl.rows import gold_calls
from toolcall.bfcl.sources import normalize, read_source
from toolcall.bfcl.split import split_rows
from toolcall.calls.prompts import PromptFormat
from toolcall.calls.scoring import check
from toolcall.config import DpoConfig, SftConfig
from toolcall.evaluate.score import score_output
from toolcall.model import lora
from toolcall.train import dpo
from toolcall.train.trainer import StepLog

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "bfcl"


def fixture_rows():
    files = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["files"]
    raw = read_source("local", files, local_dir=FIXTURE)
    rows = [r for cat, (q, a) in raw.items() for r in normalize(cat, q, a)]
    # As validation does: only rows whose gold calls pass the AST check.
    return [r for r in rows if check(r["functions"], gold_calls(r["ground_truth"]), r["ground_truth"],
                                     r["category"]).valid]


def fixture_split():
    """``(train, valid)``: the fixture rows split function-disjointly, as the validation split is carved."""
    return split_rows(fixture_rows(), test_per_category=2, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with an SFT-shaped adapter (LoRA B nonzero, so it is not the base)."""
    base = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, _ = lora.load_model(base)
    adapter = lora.adapter_config(config(SftConfig, "sft", lora_layers=2))
    lora.add_lora(model, adapter, seed=0)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.01) for k, v in lora.snapshot(model)]))
    sft = tmp_path_factory.mktemp("sft")
    lora.save_adapters(model, adapter, sft)
    model, tokenizer = lora.load_policy(base, sft)
    return model, tokenizer, sft


def test_preference_loss_matches_hand_computed_values():
    pc, pr = mx.array([-10.0, -5.0]), mx.array([-12.0, -4.0])
    rc, rr = mx.array([-11.0, -5.0]), mx.array([-11.0, -5.0])
    # margins: (1 - -1) = 2 and (0 - 1) = -1
    losses, chosen_r, rejected_r = dpo.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    assert np.allclose(losses, [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.1))], atol=1e-6)
    assert np.allclose(chosen_r, [0.1, 0.0]) and np.allclose(rejected_r, [-0.1, 0.1])
    losses, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert np.allclose(losses, [(2 - 5) ** 2, (-1 - 5) ** 2])  # target margin 1/(2*0.1) = 5


def test_sequence_logps_sum_completion_tokens_and_ipo_averages():
    token_logps = mx.array([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    weights = mx.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # padding is ignored
    assert np.allclose(dpo.sequence_logps(token_logps, weights, "sigmoid"), [-3.0, -0.5])
    assert np.allclose(dpo.sequence_logps(token_logps, weights, "ipo"), [-1.5, -0.5])


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2)), ("ipo", 1 / (4 * 0.1**2))])
def test_dpo_loss_on_a_model_batch_at_the_reference(tiny, loss_type, expected):
    """Policy == reference (step 0): margin 0, so sigmoid gives log 2 and IPO (1/(2 beta))^2."""
    model, tokenizer, _ = tiny
    chosen = [list(range(3, 40)), list(range(5, 30))]
    rejected = [list(range(3, 33)) + [7, 8], list(range(5, 26)) + [9]]
    pairs = [{"id": str(i), "source": "on_policy", "prompt_len": 20, "chosen": c, "rejected": r}
             for i, (c, r) in enumerate(zip(chosen, rejected))]
    ref = dpo.reference_logps(model, pairs, loss_type)
    tokens, positions, weights, ref_batch = next(dpo.pair_batches(pairs, ref, 2, seed=0))
    loss, metrics = dpo.dpo_loss(model, tokens, positions, weights, ref_batch, 0.1, loss_type)
    assert abs(loss.item() - expected) < 1e-3
    assert abs(metrics["reward_margin"].item()) < 1e-4


def test_training_moves_only_the_lora_weights(tiny):
    model, tokenizer, sft = tiny
    before = dict(tree_flatten(model.parameters()))
    pairs = [{"id": str(i), "source": "on_policy", "prompt_len": 10, "chosen": list(range(3, 30 + i)),
              "rejected": list(range(3, 20 + i))} for i in range(4)]
    # One batch of all four pairs, so the second step sees the batch the first one learned from.
    cfg = config(DpoConfig, "dpo", epochs=2.0, batch_size=4, learning_rate=1e-2)
    log = StepLog(None, "dpo", 2)
    dpo.train(model, pairs, dpo.reference_logps(model, pairs, "sigmoid"), cfg, log)
    after = dict(tree_flatten(model.parameters()))
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert log.history[-1]["loss"] < log.history[0]["loss"]


def test_pairs_use_training_rows_only_and_rejected_never_equals_chosen(tiny):
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    rows = fixture_rows()
    train, test = split_rows(rows, test_per_category=3, seed=0)
    samples = []
    for i, row in enumerate(train):
        gold = fmt.completion(row["messages"], row["functions"], gold_calls(row["ground_truth"]))
        right = gold[: -len(fmt.eos)]  # a sample's text has no stop token
        # Half the rows: all samples right (-> corruption); the rest: one failing sample, one repeated.
        texts = [right, right] if i % 2 else [right, "no call at all", "no call at all"]
        samples.append([(t, fmt.encode(t)) for t in texts])
    pairs, verdicts = dpo.build_pairs(train, samples, fmt, np.random.default_rng(0), max_tokens=10_000)
    train_ids, test_ids = {r["id"] for r in train}, {r["id"] for r in test}
    assert {p["id"] for p in pairs} == train_ids and not {p["id"] for p in pairs} & test_ids
    assert len(pairs) == len(train)  # the repeated failing sample makes one pair, not two
    sources = dpo.count_sources(pairs)
    assert sources["on_policy"] == (len(train) + 1) // 2
    assert sum(n for s, n in sources.items() if s.startswith("corruption:")) == len(train) // 2
    for p in pairs:
        assert p["chosen"][: p["prompt_len"]] == p["rejected"][: p["prompt_len"]]  # same prompt
        assert tokenizer.decode(p["chosen"][p["prompt_len"]:]) != tokenizer.decode(p["rejected"][p["prompt_len"]:])
    assert sum(verdicts) == 2 * (len(train) // 2) + (len(train) + 1) // 2


def test_a_rejected_sample_cut_at_max_tokens_gets_no_end_of_turn(tiny):
    """A sample that stopped ends its turn; one cut at max_tokens is scored as sampled, unfinished."""
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    row = fixture_rows()[0]
    eos = fmt.encode(fmt.eos)
    finished, cut = fmt.encode("no call"), fmt.encode("<tool_call>{\"name\": \"x")
    max_tokens = len(cut)
    assert len(finished) < max_tokens
    pairs, _ = dpo.build_pairs([row], [[("no call", finished), ("<tool_call>{\"name\": \"x", cut)]], fmt,
                               np.random.default_rng(0), max_tokens)
    completions = [p["rejected"][p["prompt_len"]:] for p in pairs]
    assert completions == [finished + eos, cut]


def test_one_epoch_trains_on_every_pair_once():
    pairs = [{"id": str(i), "source": "on_policy", "prompt_len": 2, "chosen": list(range(3, 8 + i)),
              "rejected": list(range(3, 6 + i))} for i in range(10)]
    ref = (np.zeros(10, np.float32), np.zeros(10, np.float32))
    cfg = config(DpoConfig, "dpo", epochs=1.0, batch_size=4)
    seen = []
    for _, (tokens, _, weights, _) in zip(range(cfg.train(len(pairs)).iters), dpo.pair_batches(pairs, ref, 4, 0)):
        half = tokens.shape[0] // 2
        seen += [int(w.sum()) for w in weights[:half]]  # chosen rows' completion lengths identify the pairs
    assert sorted(seen) == [len(p["chosen"]) - 2 for p in pairs]  # 3 steps: 4 + 4 + the 2 longest


def test_heldout_scores_start_at_zero_and_rise_when_training_prefers_chosen(tiny):
    """At the reference every margin is exactly 0 (accuracy 0 by its strict definition); training on
    pairs ranks them chosen-first, and the scores logged every steps_per_eval steps show it."""
    model, _, _ = tiny
    start = lora.snapshot(model)
    pairs = [{"id": str(i), "source": "on_policy", "prompt_len": 10, "chosen": list(range(3, 30 + i)),
              "rejected": list(range(3, 20 + i)) + [40, 41]} for i in range(4)]
    ref = dpo.reference_logps(model, pairs, "sigmoid")
    assert dpo.heldout_scores(model, pairs, ref, 0.1, "sigmoid") == {"heldout_accuracy": 0.0,
                                                                      "heldout_reward_margin": 0.0}
    cfg = config(DpoConfig, "dpo", epochs=3.0, batch_size=2, learning_rate=1e-2, steps_per_eval=2)
    log = StepLog(None, "dpo", 6)
    dpo.train(model, pairs, ref, cfg, log, heldout=(pairs, ref))
    scored = [h for h in log.history if "heldout_accuracy" in h]
    assert [h["step"] for h in scored] == [2, 4, 6]
    assert scored[-1]["heldout_accuracy"] == 1.0 and scored[-1]["heldout_reward_margin"] > 0
    # The logged margin is beta times the mean log-ratio margin, recomputed here from the trained model.
    again = dpo.heldout_scores(model, pairs, ref, 0.1, "sigmoid")
    assert abs(again["heldout_reward_margin"] - scored[-1]["heldout_reward_margin"]) < 1e-5
    lora.restore(model, start)  # the module fixture is shared


def test_no_training_stage_reads_the_test_split():
    stages = expanded_stages(ROOT)
    training = [n for n in stages if n.split("@")[0] in ("train_sft", "train_dpo", "train_rl")]
    assert len(training) == 3 * len(yaml.safe_load((ROOT / "params.yaml").read_text())["study"]["seeds"])
    for name in training:  # every seed's
        assert not any("test" in Path(d).name for d in stages[name]["deps"])
        assert "test" not in stages[name]["cmd"]


def test_every_corruption_fails_the_ast_check_after_rendering(tiny):
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    rng = np.random.default_rng(0)
    applied = set()
    for row in fixture_rows():
        gold = gold_calls(row["ground_truth"])
        for kind in dpo.CORRUPTIONS:
            calls = dpo.corrupt(row, gold, kind, rng)
            if calls is None:
                continue
            applied.add(kind)
            assert not check(row["functions"], calls, row["ground_truth"], row["category"]).valid
            text = fmt.completion(row["messages"], row["functions"], calls)
            assert not score_output(row, text[: -len(fmt.eos)])["valid"], (kind, row["id"])
        kind, calls = dpo.corruption(row, gold, rng)  # always one
        assert kind in dpo.CORRUPTIONS
    assert applied == set(dpo.CORRUPTIONS)

