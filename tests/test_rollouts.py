"""What DPO and RL share: LoRA-only training, shared-prompt scoring, sampling."""

import numpy as np

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
from test_dpo import tiny  # noqa: F401  (module fixture: tiny model + SFT-shaped adapter)
from toolcall.model import lora
from toolcall.train import rollouts
from toolcall.train.batches import collate
from toolcall.train.loss import token_logps


def test_only_lora_matrices_are_trainable(tiny):  # noqa: F811
    model, _, _ = tiny
    names = [k for k, _ in lora.snapshot(model)]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)


def test_shared_prompt_scoring_matches_a_full_forward(tiny):  # noqa: F811
    model, _, _ = tiny
    prompt_a, prompt_b = list(range(3, 40)), list(range(50, 61))
    examples = [(prompt_a + [7, 8, 9], len(prompt_a)), (prompt_b + [5], len(prompt_b)),
                (prompt_a + [11, 12, 13, 14, 15], len(prompt_a)), (prompt_a + [7], len(prompt_a))]
    fast = rollouts.completion_logps(model, examples)
    tokens, _, positions, weights = collate(examples)
    full = np.array(token_logps(model, tokens, positions))
    for row, (toks, prompt_len) in enumerate(examples):
        assert fast[row].shape == (len(toks) - prompt_len,)
        assert np.allclose(fast[row], full[row, : len(toks) - prompt_len], atol=1e-4)


def test_samples_come_back_per_prompt_with_their_token_ids(tiny):  # noqa: F811
    model, tokenizer, _ = tiny
    prompts = [tokenizer.encode("What is the weather in Paris?"), tokenizer.encode("Call it")]
    samples = rollouts.sample(model, tokenizer, prompts, k=3, temperature=1.0, max_tokens=6, seed=0,
                               batch_size=4, label=None)
    assert [len(group) for group in samples] == [3, 3]
    for group in samples:
        for text, ids in group:
            assert 1 <= len(ids) <= 6 and tokenizer.decode(ids) == text
    assert samples == rollouts.sample(model, tokenizer, prompts, k=3, temperature=1.0, max_tokens=6, seed=0,
                                      batch_size=4, label=None)  # seeded


def test_shared_prefill_gives_what_plain_generation_gives(tiny):  # noqa: F811
    from toolcall.evaluate.generation import generate

    model, tokenizer, _ = tiny
    prompts = [tokenizer.encode("What is the weather in Paris?"), tokenizer.encode("Call the function")]
    greedy = rollouts.sample(model, tokenizer, prompts, k=2, temperature=0.0, max_tokens=8, seed=0,
                              batch_size=4, label=None)
    plain = generate(model, tokenizer, prompts, max_tokens=8, batch_size=4, return_tokens=True)
    assert [[ids for _, ids in group] for group in greedy] == [[ids, ids] for _, _, ids in plain]
