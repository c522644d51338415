"""The trainer's own pieces: completion-only loss, batching, LoRA setup, the budget (its choice on validation
accuracy: tests/test_selection.py)."""

import math

import pytest
from configs import config
from tiny_model import make_tiny_model

from toolcall.config import ConfigError, SftConfig, epoch_steps
from toolcall.model import lora
from toolcall.train import batches, checkpoint, loss, trainer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, _ = lora.load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")))
    lora.add_lora(model, lora.adapter_config(config(SftConfig, "sft", lora_layers=2)), seed=0)
    return model


EXAMPLES = [(list(range(3, 40)), 30), (list(range(5, 25)), 12), (list(range(7, 60)), 50)]


def test_completion_loss_equals_mlx_lm_default_loss(model):
    import mlx.core as mx

    batch = batches.collate(EXAMPLES)
    ours, n_ours = loss.completion_loss(model, *batch)
    theirs, n_theirs = loss.full_loss(model, *batch)  # mlx_lm.tuner.trainer.default_loss
    assert n_ours.item() == n_theirs.item() == sum(len(t) - p for t, p in EXAMPLES)
    assert mx.allclose(ours, theirs, atol=1e-5).item()


def test_collate_points_at_every_completion_token_and_nothing_else():
    tokens, lengths, positions, weights = batches.collate(EXAMPLES)
    assert tokens.shape[1] % 32 == 1 and tokens.shape[1] > max(len(t) for t, _ in EXAMPLES)
    for row, (toks, prompt_len) in enumerate(EXAMPLES):
        n = len(toks) - prompt_len
        picked = positions[row].tolist()[:n]
        # the input at position i predicts token i+1: exactly the completion tokens
        assert [toks[i + 1] for i in picked] == toks[prompt_len:]
        assert weights[row].sum().item() == n


def test_token_weights_make_the_completion_loss_their_weighted_mean(model):
    import mlx.core as mx

    weighted = [(t, p, [3.0 if i == 2 else 1.0 for i in range(len(t) - p)]) for t, p in EXAMPLES]
    tokens, lengths, positions, weights = batches.collate(weighted)
    plain = batches.collate(EXAMPLES)
    assert all(mx.array_equal(a, b).item() for a, b in zip((tokens, lengths, positions), plain[:3]))
    assert weights.sum().item() == plain[3].sum().item() + 2 * len(EXAMPLES)
    ours, _ = loss.completion_loss(model, tokens, lengths, positions, weights)
    per_token = -loss.token_logps(model, tokens, positions)  # each completion token's cross-entropy
    assert mx.allclose(ours, (per_token * weights).sum() / weights.sum(), atol=1e-5).item()
    assert checkpoint.examples_digest(weighted) != checkpoint.examples_digest(EXAMPLES)


def test_an_unmasked_example_keeps_its_weights_on_the_same_tokens():
    """sft.mask_prompt false with sft.decision_weight: the prompt becomes targets of weight 1."""
    from stages.train_sft import unmasked

    toks, prompt_len = EXAMPLES[0]
    example = (toks, prompt_len, [3.0 if i == 2 else 1.0 for i in range(len(toks) - prompt_len)])
    _, _, positions, weights = batches.collate([unmasked(example)])
    heavy = [p for p, w in zip(positions[0].tolist(), weights[0].tolist()) if w == 3.0]
    assert heavy == [prompt_len + 1] and weights[0].sum().item() == len(toks) - 1 + 2  # predicts toks[prompt_len + 2]


def test_batches_are_seeded_and_cover_the_data():
    data = [(list(range(n)), n // 2) for n in range(10, 42)]
    first = [b[0].tolist() for b in batches.iterate_batches(data, 4, 1024, seed=3)]
    again = [b[0].tolist() for b in batches.iterate_batches(data, 4, 1024, seed=3)]
    other = [b[0].tolist() for b in batches.iterate_batches(data, 4, 1024, seed=4)]
    assert first == again and first != other and len(first) == 8


@pytest.mark.parametrize("n_rows", [9, 10, 11, 12, 33])
def test_every_row_is_trained_on_once_per_epoch_the_longest_too(n_rows):
    data = [(list(range(3, 3 + n)), 2) for n in range(5, 5 + n_rows)]  # row i has 5 + i tokens: lengths identify rows
    it = batches.iterate_batches(data, 4, 1024, loop=True, seed=0)
    per_epoch = epoch_steps(1, n_rows, 4, 1)
    assert per_epoch == math.ceil(n_rows / 4)
    for _ in range(3):  # each pass, in its own order, holds every row exactly once
        seen = []
        for _ in range(per_epoch):
            _, lengths, _, _ = next(it)
            seen += [int(end) + 1 for _, end in lengths.tolist()]  # lengths: (prompt_len, len(tokens) - 1)
        assert sorted(seen) == [len(t) for t, _ in data]


def test_length_buckets_hold_similar_lengths_and_keep_the_remainder():
    lengths = [5, 40, 7, 33, 6, 41, 8, 30, 100]
    buckets = batches.length_buckets(lengths, 4)
    assert buckets == [[0, 4, 2, 6], [7, 3, 1, 5], [8]]  # 9 rows, batches of 4: the longest row on its own


@pytest.mark.parametrize("n_rows", [9, 10, 13])
def test_under_two_ranks_each_rank_gets_rows_of_every_batch_and_every_row_once(n_rows):
    class Rank:  # the two ranks' view of mlx's group, as iterate_batches reads it
        def __init__(self, r):
            self.r = r

        def rank(self):
            return self.r

        def size(self):
            return 2

    data = [(list(range(3, 3 + n)), 2) for n in range(5, 5 + n_rows)]
    per_epoch = epoch_steps(1, n_rows, 4, 2)
    assert per_epoch == (n_rows - 1) // 4 if n_rows % 4 == 1 else math.ceil(n_rows / 4)  # a lone row joins a batch
    seen = []
    for r in range(2):
        it = batches.iterate_batches(data, 4, 1024, loop=True, seed=0, comm_group=Rank(r))
        for _ in range(per_epoch):
            _, lengths, _, _ = next(it)
            assert lengths.shape[0] >= 1
            seen += [int(end) + 1 for _, end in lengths.tolist()]
    assert sorted(seen) == [len(t) for t, _ in data]


def test_lora_init_is_seeded(tmp_path_factory):
    import mlx.core as mx

    tiny = make_tiny_model(tmp_path_factory.mktemp("tiny_seeded"))
    cfg = lora.adapter_config(config(SftConfig, "sft", lora_layers=2))
    weights = []
    for _ in range(2):
        m, _ = lora.load_model(tiny)
        mx.random.uniform()  # whatever drew from the global RNG before must not matter
        lora.add_lora(m, cfg, seed=7)
        weights.append(dict(lora.snapshot(m)))
    assert weights[0] and all(mx.array_equal(weights[0][k], weights[1][k]).item() for k in weights[0])


def test_more_lora_layers_than_blocks_is_refused(model):
    cfg = lora.adapter_config(config(SftConfig, "sft", lora_layers=5))
    with pytest.raises(ConfigError, match="only 2 blocks"):
        lora.add_lora(model, cfg, seed=0)


# ---------------------------------------------------------------- the budget


def test_epochs_give_whole_passes_over_the_rows():
    assert config(SftConfig, "sft", epochs=2.0, iters=None, batch_size=4, ranks=1).train(789).iters == 2 * 198
    # Under 2 ranks the 789th row joins the batch before it (a lone row cannot be shared by two ranks).
    assert config(SftConfig, "sft", epochs=2.0, iters=None, batch_size=4, ranks=2).train(789).iters == 2 * 197
    assert config(SftConfig, "sft", epochs=0.5, iters=None, batch_size=4).steps(10) == 2  # 3 batches a pass
    # Whole optimizer updates: no accumulated gradient is left unapplied at the end.
    assert config(SftConfig, "sft", epochs=1.0, iters=None, batch_size=4, grad_accumulation=4, ranks=1,
                  steps_per_report=1, checkpoint_every=4, steps_per_eval=4).train(789).iters == 200
    assert config(SftConfig, "sft", epochs=None, iters=40).train(789).iters == 40


def test_a_warmup_longer_than_the_epochs_is_refused_naming_both():
    cfg = config(SftConfig, "sft", epochs=1.0, iters=None, warmup=10, batch_size=4)
    with pytest.raises(ConfigError, match=r"warmup=10 must be below the 3 steps of epochs=1.0 over 12 rows"):
        cfg.train(12)


# Next-token rows: a shared prompt, then one repeated token.
PROMPT = list(range(3, 23))
TRAIN = [(PROMPT[i:] + [50] * 12, len(PROMPT) - i) for i in range(8)]


@pytest.fixture
def fresh(tmp_path_factory):
    """A tiny model with a freshly initialized LoRA (B = 0: the adapter starts as the identity)."""
    tiny = make_tiny_model(tmp_path_factory.mktemp("tiny_fresh"))

    def make():
        model, _ = lora.load_model(tiny)
        lora.add_lora(model, lora.adapter_config(config(SftConfig, "sft", lora_layers=2)), seed=0)
        return model

    return make


def train_cfg(iters=12):
    return config(SftConfig, "sft", iters=iters, epochs=None, batch_size=2, warmup=0, steps_per_report=1,
                  learning_rate=1e-2).train(len(TRAIN))


def test_without_validation_the_budget_runs_to_its_end(fresh):
    model = fresh()
    result = trainer.train_lora(model, TRAIN, train_cfg(iters=5))
    assert result["last_step"] == 5 and "chosen_step" not in result
    assert all("val_loss" not in h for h in result["history"])
