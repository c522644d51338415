"""The trainer's own pieces: completion-only loss, batching, LoRA setup."""

import pytest
from configs import config
from tiny_model import make_tiny_model

from toolcall import batches, lora, loss
from toolcall.config import ConfigError, SftConfig


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


def test_batches_are_seeded_and_cover_the_data():
    data = [(list(range(n)), n // 2) for n in range(10, 42)]
    first = [b[0].tolist() for b in batches.iterate_batches(data, 4, 1024, seed=3)]
    again = [b[0].tolist() for b in batches.iterate_batches(data, 4, 1024, seed=3)]
    other = [b[0].tolist() for b in batches.iterate_batches(data, 4, 1024, seed=4)]
    assert first == again and first != other and len(first) == 8


def test_length_buckets_hold_similar_lengths_and_drop_only_the_remainder():
    lengths = [5, 40, 7, 33, 6, 41, 8, 30, 100]
    buckets = batches.length_buckets(lengths, 4)
    assert buckets == [[0, 4, 2, 6], [7, 3, 1, 5]]  # 9 rows, batches of 4: the longest row is left over


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
