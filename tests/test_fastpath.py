"""The eval's fast path gives the reference path's greedy outputs, part by part and all together.

Fast: the adapter fused into the weights (``fuse``), greedy's decode step
without the log-softmax (``greedy``), finished rows leaving the KV cache in
place (``kvcache``), the native attention skipping each row's left padding.
Reference: the adapter as LoRA layers, mlx-lm's own generator. On the fixture
rows with the tiny model and a LoRA adapter large enough that its outputs are
not the base model's and differ from row to row.
"""

import numpy as np
import pytest

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import make_logits_processors
from test_dpo import fixture_rows
from tiny_model import make_tiny_model
from toolcall.calls.prompts import PromptFormat
from toolcall.evaluate import generation, prefix
from toolcall.evaluate.generation import generate
from toolcall.evaluate import greedy
from toolcall.evaluate.greedy import GreedyBatchGenerator, like_lengths
from toolcall.evaluate.kvcache import InPlaceKVCache, fill_holes
from toolcall.evaluate import sharding
from toolcall.evaluate.sharding import generate_sharded
from toolcall.model import kernels, lora

real_prefill = prefix.prefill
ADAPTER = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(base dir, adapter dir, prompts, tokenizer)``: an adapter whose greedy outputs differ from row to row."""
    base = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = lora.load_model(base)
    lora.add_lora(model, ADAPTER, seed=0)
    # 0.2: the tiny base model writes "\n" forever; with weights this large the adapter writes varied text.
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in lora.snapshot(model)]))
    sft = tmp_path_factory.mktemp("sft")
    lora.save_adapters(model, ADAPTER, sft)
    fmt = PromptFormat(tokenizer)
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in fixture_rows()]
    return base, sft, prompts, tokenizer


def test_the_fused_model_has_no_lora_layer_and_other_weights(tiny):
    base, sft, _, _ = tiny
    fused, _ = lora.load_model(base, sft, fused=True)
    unfused, _ = lora.load_model(base, sft)
    plain, _ = lora.load_model(base)

    def lora_layers(model):
        return [name for name, module in model.named_modules() if hasattr(module, "lora_a")]

    assert not lora_layers(fused) and len(lora_layers(unfused)) == 2 * 7  # 2 blocks x 7 projections
    q = fused.layers[-1].self_attn.q_proj.weight
    assert not mx.array_equal(q, plain.layers[-1].self_attn.q_proj.weight)
    layer = unfused.layers[-1].self_attn.q_proj
    x = mx.random.normal((3, q.shape[1]))
    assert mx.allclose(x @ q.T, layer(x), atol=1e-5)  # the same function as the LoRA layer


@pytest.mark.parametrize("batch_size", [4, 16])
def test_fast_greedy_outputs_equal_the_reference_on_the_fixture_rows(tiny, batch_size):
    base, sft, prompts, tok = tiny
    unfused, _ = lora.load_model(base, sft)
    fused, _ = lora.load_model(base, sft, fused=True)
    run = dict(max_tokens=24, batch_size=batch_size)
    reference = generate(unfused, tok, prompts, reference=True, **run)
    assert generate(unfused, tok, prompts, **run) == reference  # greedy's step alone
    assert generate(fused, tok, prompts, reference=True, **run) == reference  # the fused adapter alone
    assert generate(fused, tok, prompts, **run) == reference  # both
    # The comparison can fail: the adapter changes the outputs, and they differ from row to row.
    assert len({text for text, _ in reference}) > len(prompts) // 2
    assert generate(lora.load_model(base)[0], tok, prompts, **run) != reference


class EndAfter:
    """A logits processor that lets ``k`` tokens through, then forces end of turn: rows finish when told."""

    def __init__(self, k, eos):
        self.k, self.eos, self.calls = k, eos, 0

    def __call__(self, tokens, logits):
        self.calls += 1
        if self.calls <= self.k:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == self.eos, mx.array(1e4, logits.dtype), logits)


def test_rows_finishing_anywhere_in_the_batch_and_logits_processors_give_the_reference(tiny):
    """Rows end at scattered steps (holes in the middle of the batch, filled from its end) while others
    join; some rows carry a repetition penalty, some nothing: the fast path's outputs are the reference's."""
    base, sft, prompts, tok = tiny
    fused, _ = lora.load_model(base, sft, fused=True)
    unfused, _ = lora.load_model(base, sft)
    eos = min(tok.eos_token_ids)

    def processors():
        return [[EndAfter(3 + (7 * i) % 13, eos)] if i % 3 == 0 else
                make_logits_processors(repetition_penalty=1.3) if i % 3 == 1 else None
                for i in range(len(prompts))]

    run = dict(max_tokens=20, batch_size=12)
    reference = generate(unfused, tok, prompts, reference=True, logits_processors=processors(), **run)
    assert generate(fused, tok, prompts, logits_processors=processors(), **run) == reference
    lengths = {n for _, n in reference[::3]}
    assert len(lengths) > 5 and max(lengths) < 20  # they did end at many different steps


def test_finished_rows_carry_no_cache_but_live_ones_can_still_be_extracted(tiny):
    """A finished row's response holds no lazy slice of the batch cache (it would make the next update copy
    the whole cache); ``BatchGenerator.extract_cache`` still gives a live row's."""
    base, sft, prompts, tok = tiny
    model, _ = lora.load_model(base, sft, fused=True)
    gen = GreedyBatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=4)
    short, long_ = gen.insert(prompts[:2], max_tokens=[2, 6])
    finished = []
    while not finished:
        finished = [r for r in gen.next_generated() if r.finish_reason]
    assert [r.uid for r in finished] == [short] and finished[0].prompt_cache is None
    (cache, seen), = gen.extract_cache([long_]).values()
    assert len(cache) == len(model.layers) and cache[0].offset > len(prompts[1])
    assert seen[: len(prompts[1])] == prompts[1]
    gen.close()


def test_sampling_keeps_mlx_lm_s_own_generator(tiny, monkeypatch):
    base, sft, prompts, tok = tiny
    model, _ = lora.load_model(base, sft)

    def refused(*args, **kwargs):
        raise AssertionError("greedy's generator used")

    monkeypatch.setattr(generation, "GreedyBatchGenerator", refused)
    generate(model, tok, prompts[:2], max_tokens=4, batch_size=2, temperature=0.7, seed=0)
    generate(model, tok, prompts[:2], max_tokens=4, batch_size=2, reference=True)
    with pytest.raises(AssertionError, match="greedy's generator"):
        generate(model, tok, prompts[:2], max_tokens=4, batch_size=2)


def test_prompt_groups_save_the_most_prefill_and_leave_each_prompt_a_token():
    head = list(range(100, 140))  # 40 tokens every prompt shares
    a, b = head + list(range(60)), head + list(range(500, 560))  # two function sets of 100 tokens each
    prompts = [a + [1, 2], b + [7], a + [3], b + [8, 9], a, [5] * 50, a + [4, 4, 4]]
    plan = prefix.groups(prompts, min_shared=32)
    assert sorted(i for _, members in plan for i in members) == list(range(len(prompts)))
    # a's four (one of them a itself, which must keep its last token) and b's two, not all six at 40; [5]*50 alone
    assert sorted((shared, sorted(m)) for shared, m in plan) == [(0, [5]), (99, [0, 2, 4, 6]), (100, [1, 3])]
    # by what the longest member leaves to prefill: [5] * 50 (all 50), a + [4, 4, 4] (4 past 99), b + [8, 9] (2)
    assert [len(prompts[m[0]]) - shared for shared, m in plan] == [50, 4, 2]
    for shared, members in plan:
        assert members == sorted(members, key=lambda i: -len(prompts[i]))
        assert all(prompts[i][:shared] == prompts[members[0]][:shared] and len(prompts[i]) > shared for i in members)


def test_prompts_sharing_a_prefix_give_the_reference_with_one_prefill_a_group(tiny, monkeypatch):
    """Questions over the same functions: each group's shared tokens are prefilled once, the outputs are the
    reference's (with and without logits processors, rows ending at scattered steps)."""
    base, sft, _, tok = tiny
    fmt = PromptFormat(tok)
    questions = ["What is the weather?", "Find it for me, please, in two steps.", "Now."]
    prompts = [fmt.encode(fmt.prompt([{"role": "user", "content": q}], r["functions"]))
               for r in fixture_rows()[:5] for q in questions]
    fused, _ = lora.load_model(base, sft, fused=True)
    unfused, _ = lora.load_model(base, sft)
    prefills = []
    monkeypatch.setattr(prefix, "prefill", lambda *a: prefills.append(len(a[1])) or real_prefill(*a))
    run = dict(max_tokens=20, batch_size=4)
    assert generate(fused, tok, prompts, **run) == generate(unfused, tok, prompts, reference=True, **run)
    assert len(prefills) == 5 and min(prefills) >= prefix.MIN_SHARED
    eos = min(tok.eos_token_ids)
    for _ in range(2):
        processors = [[EndAfter(2 + (5 * i) % 11, eos)] if i % 2 else None for i in range(len(prompts))]
        out = generate(fused if _ else unfused, tok, prompts, logits_processors=processors, reference=not _, **run)
        if not _:
            reference = out
    assert out == reference


def test_like_lengths_stops_where_padding_would_cost_more_than_another_call():
    assert like_lengths([1321, 1293, 503, 481, 481]) == 2  # 28 apart: within 12.5% of 1321; 503 is not
    assert like_lengths([34, 27, 20, 5, 3]) == 5  # short prompts: within 32 tokens of each other
    assert like_lengths([40, 300, 41]) == 1 and like_lengths([7]) == 1


def test_queued_prompts_prefill_in_batches_of_like_length_with_the_reference_s_outputs(tiny, monkeypatch):
    """Long whole prompts and short remainders after a shared prefix in one queue: no prefill batch pads a
    prompt by more than ``like_lengths`` allows, and every output is the reference's."""
    base, sft, _, tok = tiny
    fmt = PromptFormat(tok)
    questions = ["Now.", "What is the weather like today, and what will it be tomorrow where I live?" * 4]
    prompts = [fmt.encode(fmt.prompt([{"role": "user", "content": f"{q} ({i})"}], r["functions"]))
               for r in fixture_rows()[:4] for i, q in enumerate(questions * 2)]
    batches = []
    real_prompt = greedy.GreedyPromptBatch.prompt
    monkeypatch.setattr(greedy.GreedyPromptBatch, "prompt",
                        lambda self, t: batches.append(sorted(map(len, t))) or real_prompt(self, t))
    fused, _ = lora.load_model(base, sft, fused=True)
    unfused, _ = lora.load_model(base, sft)
    run = dict(max_tokens=8, batch_size=8)
    assert generate(fused, tok, prompts, **run) == generate(unfused, tok, prompts, reference=True, **run)
    batches = [b for b in batches if b]
    assert max(map(len, batches)) > 1  # like lengths still share a batch
    assert all(b[-1] - b[0] <= max(greedy.PAD_TOKENS, greedy.PAD_SHARE * b[-1]) for b in batches)


def test_workers_get_whole_prefix_groups_and_shares_of_like_cost():
    prompts = [[1] * 40 + [i] for i in range(6)] + [[2] * 40 + [i] * (i + 1) for i in range(3)] + [[9] * 30, [8] * 5]
    shares = sharding.deal(prompts, 2, share_prefixes=True)
    # the six over [1] * 40 (the most work) to one worker; the three over [2] * 40 and both loners to the other
    assert [sorted(share) for share in shares] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    assert sharding.deal(prompts, 2, share_prefixes=False) == [order[0::2], order[1::2]]  # the reference's


def test_the_eval_stage_s_sharded_path_gives_the_reference(tiny):
    base, sft, prompts, tok = tiny
    prompts = prompts[::4]
    unfused, _ = lora.load_model(base, sft)
    reference = generate(unfused, tok, prompts, max_tokens=12, batch_size=4, reference=True)
    assert generate_sharded(base, sft, prompts, workers=2, max_tokens=12, batch_size=4) == reference
    assert generate_sharded(base, sft, prompts, workers=1, max_tokens=12, batch_size=4, reference=True) == reference


def test_fill_holes_moves_only_rows_past_the_new_end():
    assert fill_holes(5, [0, 2, 4]) == [0, 4, 2]
    assert fill_holes(5, [3, 4]) == [3, 4]
    assert fill_holes(4, [0, 1, 2, 3]) == [0, 1, 2, 3]
    assert fill_holes(3, []) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        keep = sorted(rng.choice(n, int(rng.integers(0, n + 1)), replace=False).tolist())
        order = fill_holes(n, keep)
        assert sorted(order) == keep and all(order[i] == i for i in keep if i < len(keep))


def test_in_place_filter_keeps_the_rows_mlx_lm_s_filter_keeps():
    """Same keys, values, offsets and masks for the rows that stay, then after another token, and after a join."""
    B, H, L, D = 6, 2, 9, 8
    keys, values = mx.random.normal((B, H, L, D)), mx.random.normal((B, H, L, D))
    padding = [0, 3, 1, 5, 2, 4]
    caches = []
    for cls in (BatchKVCache, InPlaceKVCache):
        c = BatchKVCache(padding)
        c.update_and_fetch(keys, values)
        c.__class__ = cls
        caches.append(c)
    ours, theirs = caches[1], caches[0]
    order = fill_holes(B, [0, 1, 3, 5])
    theirs.filter(order)
    ours.filter(order)

    def same(new_rows):
        k, v = mx.random.normal((new_rows, H, 1, D)), mx.random.normal((new_rows, H, 1, D))
        m1, m2 = theirs.make_mask(1), ours.make_mask(1)  # as the model makes it: before the update
        (k1, v1), (k2, v2) = theirs.update_and_fetch(k, v), ours.update_and_fetch(k, v)
        # mlx-lm's filter dropped the padding every row shares; ours keeps it: compare the real positions.
        shift = k2.shape[2] - k1.shape[2]
        assert mx.array_equal(m2[..., :shift], mx.zeros_like(m2[..., :shift]))
        assert mx.array_equal(m1, m2[..., shift:])
        real = m1[:, :, 0, :, None]  # (rows, 1, positions, 1)
        for a, b in ((k1, k2), (v1, v2)):
            assert mx.array_equal(mx.where(real, a, 0), mx.where(real, b[..., shift:, :], 0))
        assert mx.array_equal(theirs.offset, ours.offset)

    same(4)
    ours.filter([2, 1])
    theirs.filter([2, 1])
    same(2)
    joining = BatchKVCache([1, 0])
    joining.update_and_fetch(mx.random.normal((2, H, 3, D)), mx.random.normal((2, H, 3, D)))
    ours.extend(joining)
    assert ours.keys.shape[0] == 4 and ours.offset.shape[0] == 4


@pytest.mark.skipif(not kernels.active(), reason="the native kernels do not run here")
def test_native_attention_skips_the_left_padding_bit_for_bit():
    """A bool mask (padding skipped) gives the bits of the same mask as 0 / -inf (every key read),
    and NaN in the skipped keys and values changes nothing: they are not read."""
    B, H, Hk, D, L = 4, 9, 3, 64, 300
    padding = mx.array([0, 37, 120, 299])
    q, k, v = mx.random.normal((B, H, 1, D)), mx.random.normal((B, Hk, L, D)), mx.random.normal((B, Hk, L, D))
    mask = create_causal_mask(1, offset=L - 1, left_padding=padding)
    out = kernels.attention(q, k, v, 0.125, mask)
    assert mx.array_equal(out, kernels.attention(q, k, v, 0.125, mx.where(mask, 0.0, -mx.inf)))
    assert mx.allclose(out, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask), atol=1e-5)
    nan_k, nan_v = np.array(k), np.array(v)
    for b, p in enumerate(padding.tolist()):
        nan_k[b, :, : p // 8 * 8] = np.nan  # the kernel starts at a multiple of 8 (the softmax's lanes)
        nan_v[b, :, : p // 8 * 8] = np.nan
    assert mx.array_equal(out, kernels.attention(q, mx.array(nan_k), mx.array(nan_v), 0.125, mask))
    # Prefill-shaped: several query rows, causal and left-padded, none without a visible key.
    q = mx.random.normal((B, H, 16, D))
    mask = create_causal_mask(16, offset=L - 16, left_padding=mx.array([0, 37, 120, 250]))
    assert mx.array_equal(kernels.attention(q, k, v, 0.125, mask),
                          kernels.attention(q, k, v, 0.125, mx.where(mask, 0.0, -mx.inf)))
