"""DPO: the loss against hand-computed values (RPO's NLL term too), the pair builder (own or gold chosen,
the end-of-turn classes and their balance), the corruptions, warmup and gradient clipping."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from configs import config
from dag_deps import expanded_stages
from tiny_model import make_tiny_model
from toolcall.bfcl.rows import gold_calls
from toolcall.bfcl.sources import normalize, read_source
from toolcall.bfcl.split import split_rows
from toolcall.calls.prompts import PromptFormat
from toolcall.calls.scoring import check
from toolcall.config import ConfigError, DpoConfig, SftConfig, TrainConfig
from toolcall.evaluate.score import score_output
from toolcall.model import lora
from toolcall.train import checkpoint, dpo, pairs as preference
from toolcall.train.rollouts import completion_logps
from toolcall.train.trainer import StepLog, optimize

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
    loss, metrics = dpo.dpo_loss(model, tokens, positions, weights, ref_batch, 0.1, loss_type, rpo_alpha=0.0)
    assert abs(loss.item() - expected) < 1e-3
    assert abs(metrics["reward_margin"].item()) < 1e-4


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_rpo_alpha_adds_exactly_the_chosen_per_token_nll(tiny, loss_type):
    """rpo_alpha 0 is the plain DPO loss; rpo_alpha a adds a times the chosen completions' per-token mean NLL,
    averaged over the pairs, recomputed here from the model's log-probs of the chosen rows alone."""
    model, _, _ = tiny
    pairs = [{"id": str(i), "prompt_len": 12, "chosen": list(range(3, 30 + 4 * i)),
              "rejected": list(range(3, 22 + i)) + [40]} for i in range(3)]
    ref = dpo.reference_logps(model, pairs, loss_type)
    batch = next(dpo.pair_batches(pairs, ref, 3, seed=0))
    plain, metrics = dpo.dpo_loss(model, *batch, 0.1, loss_type, rpo_alpha=0.0)
    assert abs(plain.item() - metrics["preference_loss"].item()) < 1e-6
    # A batch's pairs are length-bucketed and shuffled, but the mean over pairs does not depend on their order.
    nll = np.mean([-t.mean() for t in completion_logps(model, [(p["chosen"], p["prompt_len"]) for p in pairs])])
    assert abs(metrics["chosen_nll"].item() - nll) < 1e-4
    for alpha in (0.5, 2.0):
        loss, _ = dpo.dpo_loss(model, *batch, 0.1, loss_type, rpo_alpha=alpha)
        assert abs(loss.item() - (plain.item() + alpha * nll)) < 1e-4


def test_training_moves_only_the_lora_weights(tiny):
    model, tokenizer, sft = tiny
    before = dict(tree_flatten(model.parameters()))
    pairs = [{"id": str(i), "source": "on_policy", "prompt_len": 10, "chosen": list(range(3, 30 + i)),
              "rejected": list(range(3, 20 + i))} for i in range(4)]
    # One batch of all four pairs, so the second step sees the batch the first one learned from.
    cfg = config(DpoConfig, "dpo", epochs=2.0, batch_size=4, learning_rate=1e-2, warmup=0)
    log = StepLog(None, "dpo", 2)
    dpo.train(model, pairs, dpo.reference_logps(model, pairs, "sigmoid"), cfg, log)
    after = dict(tree_flatten(model.parameters()))
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert log.history[-1]["loss"] < log.history[0]["loss"]


def right_text(fmt, row, calls=None):
    """The template's rendering of ``calls`` (default: the gold ones) as a sample's text (no stop token)."""
    text = fmt.completion(row["messages"], row["functions"], gold_calls(row["ground_truth"]) if calls is None else calls)
    return text[: -len(fmt.eos)]


def respaced(text):
    """``text`` written another way that parses to the same calls: an own passing sample unlike the gold one."""
    out = text.replace('{"name": ', '{ "name":  ')
    assert out != text
    return out


def as_samples(fmt, texts):
    return [(t, fmt.encode(t)) for t in texts]


def test_pairs_use_training_rows_only_and_rejected_never_equals_chosen(tiny):
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    rows = fixture_rows()
    train, test = split_rows(rows, test_per_category=3, seed=0)
    samples = []
    for i, row in enumerate(train):
        right = right_text(fmt, row)
        # Half the rows: all samples right (-> corruption); the rest: one failing sample, one repeated.
        texts = [right, right] if i % 2 else [right, "no call at all", "no call at all"]
        samples.append(as_samples(fmt, texts))
    for chosen in ("own", "gold"):
        pairs, verdicts = preference.build_pairs(train, samples, fmt, np.random.default_rng(0), 10_000, chosen)
        train_ids, test_ids = {r["id"] for r in train}, {r["id"] for r in test}
        assert {p["id"] for p in pairs} == train_ids and not {p["id"] for p in pairs} & test_ids
        assert len(pairs) == len(train)  # the repeated failing sample makes one pair, not two
        counts = preference.summary(train, verdicts, pairs, pairs)["pairs_by_source"]
        assert counts["rejected"] == {"own": (len(train) + 1) // 2, "corruption": len(train) // 2}
        assert sum(counts["corruptions"].values()) == len(train) // 2
        # The right sample is the gold rendering, so own and gold chosen are the same tokens here.
        assert counts["chosen"] == ({"own": len(train), "gold": 0} if chosen == "own" else {"own": 0, "gold": len(train)})
        for p in pairs:
            assert p["chosen"][: p["prompt_len"]] == p["rejected"][: p["prompt_len"]]  # same prompt
            assert tokenizer.decode(p["chosen"][p["prompt_len"]:]) != tokenizer.decode(p["rejected"][p["prompt_len"]:])
        assert sum(verdicts) == 2 * (len(train) // 2) + (len(train) + 1) // 2


def test_chosen_is_an_own_passing_sample_where_one_exists_and_gold_otherwise(tiny):
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    eos = fmt.encode(fmt.eos)
    row = fixture_rows()[0]
    gold_tokens, prompt_len = fmt.example(row, gold_calls(row["ground_truth"]))
    gold = gold_tokens[prompt_len:]
    own = respaced(right_text(fmt, row))
    assert score_output(row, own)["valid"]
    cases = {
        "passing and failing": [own, "no call", own],
        "failing only": ["no call", "wrong <tool_call>"],
        "passing only": [own],
    }
    built = {name: preference.build_pairs([row], [as_samples(fmt, texts)], fmt, np.random.default_rng(0), 10_000)[0]
             for name, texts in cases.items()}
    [mixed] = built["passing and failing"]
    assert mixed["chosen_source"] == "own" and mixed["chosen"][prompt_len:] == fmt.encode(own) + eos
    assert mixed["rejected_source"] == "own" and mixed["rejected"][prompt_len:] == fmt.encode("no call") + eos
    assert [p["chosen_source"] for p in built["failing only"]] == ["gold", "gold"]
    assert all(p["chosen"][prompt_len:] == gold for p in built["failing only"])
    [alone] = built["passing only"]
    assert alone["chosen_source"] == "own" and alone["rejected_source"] == "corruption"
    assert alone["corruption"] in preference.CORRUPTIONS
    assert not score_output(row, tokenizer.decode(alone["rejected"][prompt_len:-len(eos)]))["valid"]
    # The gold arm: always the gold rendering, the same samples otherwise.
    for texts in cases.values():
        pairs, _ = preference.build_pairs([row], [as_samples(fmt, texts)], fmt, np.random.default_rng(0), 10_000,
                                          "gold")
        assert pairs and all(p["chosen_source"] == "gold" and p["chosen"][prompt_len:] == gold for p in pairs)
    # A passing sample cut at max_tokens never ended its turn: not a chosen candidate.
    max_tokens = len(fmt.encode(own))
    [cut] = preference.build_pairs([row], [as_samples(fmt, [own, "no call"])], fmt, np.random.default_rng(0),
                                   max_tokens)[0]
    assert cut["chosen_source"] == "gold"


def test_failing_samples_pair_with_each_passing_sample_in_turn_and_sources_are_counted(tiny):
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    rows = fixture_rows()[:2]
    own = [respaced(right_text(fmt, r)) for r in rows]
    samples = [as_samples(fmt, [own[0], right_text(fmt, rows[0]), "no call", "no call either"]),
               as_samples(fmt, ["no call", "no call either", "still none"])]
    built, verdicts = preference.build_pairs(rows, samples, fmt, np.random.default_rng(3), 10_000)
    first = [p for p in built if p["id"] == rows[0]["id"]]
    assert len(first) == 2 and first[0]["chosen"] != first[1]["chosen"]  # both passing samples used
    counts = preference.summary(rows, verdicts, built, built)
    assert counts["prompts"] == 2 and counts["samples"] == 7 and counts["sample_pass_rate"] == round(2 / 7, 4)
    assert counts["pairs"] == counts["pairs_built"] == 5
    assert counts["pairs_by_source"] == {"chosen": {"own": 2, "gold": 3}, "rejected": {"own": 5, "corruption": 0},
                                         "corruptions": {}}
    assert sum(counts["pairs_by_first_difference"].values()) == 5
    again, _ = preference.build_pairs(rows, samples, fmt, np.random.default_rng(3), 10_000)
    assert again == built  # seeded


def test_a_rejected_sample_cut_at_max_tokens_gets_no_end_of_turn(tiny):
    """A sample that stopped ends its turn; one cut at max_tokens is scored as sampled, unfinished."""
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    row = fixture_rows()[0]
    eos = fmt.encode(fmt.eos)
    finished, cut = fmt.encode("no call"), fmt.encode("<tool_call>{\"name\": \"x")
    max_tokens = len(cut)
    assert len(finished) < max_tokens
    pairs, _ = preference.build_pairs([row], [[("no call", finished), ("<tool_call>{\"name\": \"x", cut)]], fmt,
                                      np.random.default_rng(0), max_tokens)
    completions = [p["rejected"][p["prompt_len"]:] for p in pairs]
    assert completions == [finished + eos, cut]


def test_first_difference_on_hand_made_token_lists():
    eos = [2]
    assert preference.first_difference([5, 6, 7, 2], [5, 6, 2], eos) == "against_eos"  # rejected stops early
    assert preference.first_difference([5, 6, 2], [5, 6, 7, 8, 2], eos) == "for_eos"  # rejected goes on
    assert preference.first_difference([5, 6, 7, 2], [5, 9, 7, 2], eos) == "content"
    assert preference.first_difference([5, 6, 7, 2], [5, 6], eos) == "content"  # cut: no end-of-turn
    assert preference.first_difference([2], [5, 2], eos) == "for_eos"  # they differ at the first token
    two = [2, 3]  # a two-token end-of-turn counts only whole
    assert preference.first_difference([5, 6, 2, 3], [5, 2, 3], two) == "against_eos"
    assert preference.first_difference([5, 2, 4], [5, 2, 3], two) == "content"


def test_a_dropped_call_teaches_against_the_end_of_turn_and_an_extra_one_for_it(tiny):
    """On the template's real renderings: the rejected answer that stops after fewer calls is against_eos."""
    _, tokenizer, _ = tiny
    fmt = PromptFormat(tokenizer)
    eos = fmt.encode(fmt.eos)
    row = next(r for r in fixture_rows() if len(gold_calls(r["ground_truth"])) > 1)
    gold = gold_calls(row["ground_truth"])

    def ids(calls):
        return fmt.encode(fmt.completion(row["messages"], row["functions"], calls))

    assert preference.first_difference(ids(gold), ids(gold[:-1]), eos) == "against_eos"
    assert preference.first_difference(ids(gold), ids(gold + gold[:1]), eos) == "for_eos"
    other = [{**gold[0], "arguments": {k: "zz" for k in gold[0]["arguments"]}}] + gold[1:]
    assert preference.first_difference(ids(gold), ids(other), eos) == "content"


def test_eos_balance_keeps_at_most_as_many_against_eos_pairs_as_the_others():
    kinds = ["against_eos"] * 6 + ["for_eos"] * 2 + ["content"]
    pairs = [{"id": str(i), "first_difference": k} for i, k in enumerate(kinds)]
    kept = preference.balance_eos(pairs, np.random.default_rng(0))
    assert Counter(p["first_difference"] for p in kept) == {"against_eos": 3, "for_eos": 2, "content": 1}
    assert [p["id"] for p in kept] == sorted((p["id"] for p in kept), key=int)  # order kept
    assert kept == preference.balance_eos(pairs, np.random.default_rng(0))  # seeded
    drawn = {tuple(p["id"] for p in preference.balance_eos(pairs, np.random.default_rng(s))) for s in range(20)}
    assert len(drawn) > 1  # which ones stay is a draw, not always the first
    few = pairs[3:]  # 3 against_eos, 3 others: nothing to drop
    assert preference.balance_eos(few, np.random.default_rng(0)) == few
    assert preference.balance_eos(pairs[:6], np.random.default_rng(0)) == []  # only against_eos: none kept


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
    # Plain DPO at a constant rate: what is measured here is the scoring, not the set-up.
    cfg = config(DpoConfig, "dpo", epochs=3.0, batch_size=2, learning_rate=1e-2, steps_per_eval=2, warmup=0,
                 rpo_alpha=0.0, max_grad_norm=None)
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
        for kind in preference.CORRUPTIONS:
            calls = preference.corrupt(row, gold, kind, rng)
            if calls is None:
                continue
            applied.add(kind)
            assert not check(row["functions"], calls, row["ground_truth"], row["category"]).valid
            text = fmt.completion(row["messages"], row["functions"], calls)
            assert not score_output(row, text[: -len(fmt.eos)])["valid"], (kind, row["id"])
        kind, calls = preference.corruption(row, gold, rng)  # always one
        assert kind in preference.CORRUPTIONS
    assert applied == set(preference.CORRUPTIONS)



def test_warmup_rises_linearly_to_the_learning_rate_then_decays(tiny):
    """dpo.warmup reaches TrainConfig and the optimizer: the logged rate of each DPO step (mlx-lm's schedule: the
    first update at rate 0) climbs to learning_rate at step warmup + 1, then follows the cosine decay."""
    model, _, _ = tiny
    start = lora.snapshot(model)
    pairs = [{"id": str(i), "prompt_len": 10, "chosen": list(range(3, 30 + i)), "rejected": list(range(3, 20 + i))}
             for i in range(4)]
    cfg = config(DpoConfig, "dpo", epochs=6.0, batch_size=4, learning_rate=1e-3, warmup=3)
    assert cfg.train(len(pairs)).warmup == 3 and cfg.train(len(pairs)).iters == 6
    log = StepLog(None, "dpo", 6)
    dpo.train(model, pairs, dpo.reference_logps(model, pairs, "sigmoid"), cfg, log)
    rates = [h["learning_rate"] / 1e-3 for h in log.history]
    assert np.allclose(rates, [0, 1 / 3, 2 / 3, 1, 1, 0.5 * (1 + math.cos(math.pi / 3))], atol=1e-5)
    lora.restore(model, start)  # the module fixture is shared
    with pytest.raises(ConfigError, match=r"\[dpo\]: warmup=6 must be below the 6 steps"):
        config(DpoConfig, "dpo", epochs=6.0, batch_size=4, warmup=6).train(len(pairs))


@pytest.mark.parametrize("max_grad_norm", [0.5, None])
def test_gradient_clipping_bounds_the_gradient_the_optimizer_gets(tmp_path, max_grad_norm):
    """optimize's compiled step clips the averaged gradients to max_grad_norm (None: not at all). Adam's first
    moment after one step is (1 - beta1) times the gradient it got, read back from the step's checkpoint."""
    model = nn.Linear(4, 3)
    n_params = 4 * 3 + 3
    scale = 100.0  # d loss / d each parameter

    def loss(model, s):
        return s * (model.weight.sum() + model.bias.sum()), {}

    cfg = TrainConfig(seed=0, learning_rate=1e-3, warmup=0, iters=1, batch_size=1, grad_accumulation=1,
                      steps_per_report=1, max_grad_norm=max_grad_norm)
    ckpt = checkpoint.Checkpoint(tmp_path / "run", "k", every=1)
    log = StepLog(None, "clip", 1)
    optimize(model, cfg, loss, iter([(mx.array(scale),)]), log, ckpt)
    raw = scale * math.sqrt(n_params)
    assert abs(log.history[-1]["grad_norm"] - raw) < 1e-2 * raw  # logged before clipping
    state = mx.load(str(ckpt.dir / checkpoint.OPTIMIZER))
    got = math.sqrt(sum(float((state[f"{name}.m"] ** 2).sum()) for name in ("weight", "bias"))) / (1 - 0.9)
    assert abs(got - (raw if max_grad_norm is None else max_grad_norm)) < 1e-3 * got
