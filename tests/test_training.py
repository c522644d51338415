"""The trainer's own pieces: completion-only loss, batching, params checks."""

import pytest
from tiny_model import make_tiny_model

from toolcall import training


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model, _ = training.load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")))
    training.add_lora(model, training.LoraConfig(lora_layers=2))
    return model


EXAMPLES = [(list(range(3, 40)), 30), (list(range(5, 25)), 12), (list(range(7, 60)), 50)]


def test_completion_loss_equals_mlx_lm_default_loss(model):
    import mlx.core as mx

    batch = training.collate(EXAMPLES)
    ours, n_ours = training.completion_loss(model, *batch)
    theirs, n_theirs = training.full_loss(model, *batch)  # mlx_lm.tuner.trainer.default_loss
    assert n_ours.item() == n_theirs.item() == sum(len(t) - p for t, p in EXAMPLES)
    assert mx.allclose(ours, theirs, atol=1e-5).item()


def test_collate_points_at_every_completion_token_and_nothing_else():
    tokens, lengths, positions, weights = training.collate(EXAMPLES)
    assert tokens.shape[1] % 32 == 1 and tokens.shape[1] > max(len(t) for t, _ in EXAMPLES)
    for row, (toks, prompt_len) in enumerate(EXAMPLES):
        n = len(toks) - prompt_len
        picked = positions[row].tolist()[:n]
        # the input at position i predicts token i+1: exactly the completion tokens
        assert [toks[i + 1] for i in picked] == toks[prompt_len:]
        assert weights[row].sum().item() == n


def test_batches_are_seeded_and_cover_the_data():
    data = [(list(range(n)), n // 2) for n in range(10, 42)]
    first = [b[0].tolist() for b in training.iterate_batches(data, 4, 1024, seed=3)]
    again = [b[0].tolist() for b in training.iterate_batches(data, 4, 1024, seed=3)]
    other = [b[0].tolist() for b in training.iterate_batches(data, 4, 1024, seed=4)]
    assert first == again and first != other and len(first) == 8


def test_impossible_params_are_refused_with_the_key(model):
    with pytest.raises(training.ConfigError, match=r"unknown keys \['lora_rnk'\]"):
        training.from_params(training.LoraConfig, {"lora_rnk": 8}, "sft")
    with pytest.raises(training.ConfigError, match="learning_rate"):
        training.from_params(training.LoraConfig, {"learning_rate": 3.0}, "sft")
    with pytest.raises(training.ConfigError, match=r"sft\]\.iters='many'"):
        training.from_params(training.LoraConfig, {"iters": "many"}, "sft")
    with pytest.raises(training.ConfigError, match="only 2 blocks"):
        training.add_lora(model, training.LoraConfig(lora_layers=5))
