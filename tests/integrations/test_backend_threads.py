"""The same loaded model called from several Python threads gives each thread its own, correct results."""

from __future__ import annotations

import threading

import torch
from transformers import AutoModelForSequenceClassification

from tests.integrations.backend_support import WORDS, pruned_bert, save


def test_concurrent_forwards_match_sequential_ones(tmp_path):
    model, recipe = pruned_bert("4-block")
    folder = save(model, tmp_path / "m", recipe, weight_dtype="int8", int8_embeddings=True, int8_linears=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(5, len(WORDS), (1 + i % 3, 7 + i), generator=g) for i in range(8)]
    with torch.inference_mode():
        expected = [loaded(input_ids=ids).logits for ids in inputs]

    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            with torch.inference_mode():
                for round_ in range(6):
                    i = (t * 3 + round_) % len(inputs)  # threads run different inputs at the same time
                    results[t, round_] = (i, loaded(input_ids=inputs[i]).logits)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 24
    for (t, round_), (i, out) in results.items():
        assert torch.equal(out, expected[i]), f"thread {t}, round {round_}: input {i} got another result"
