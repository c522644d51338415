"""Generation split over processes (the eval stages' fast path) gives the in-process outputs."""

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
from test_dpo import tiny  # noqa: F401  (module fixture: tiny model + SFT-shaped adapter)
from tiny_model import make_tiny_model
from toolcall.evaluate.generation import generate
from toolcall.evaluate.sharding import generate_sharded


def test_generation_split_over_processes_gives_what_one_process_gives(tiny, tmp_path):  # noqa: F811
    model, tokenizer, sft = tiny
    base = make_tiny_model(tmp_path / "base")  # deterministic: the fixture's base model again
    texts = ["What is the weather in Paris?", "Call the function", "Paris", "The capital of France is Paris."]
    prompts = [tokenizer.encode(t) for t in texts]
    one = generate(model, tokenizer, prompts, max_tokens=8, batch_size=4)
    assert generate_sharded(base, sft, prompts, workers=2, max_tokens=8, batch_size=4) == one
    assert generate_sharded(base, sft, prompts, workers=1, max_tokens=8, batch_size=4) == one
