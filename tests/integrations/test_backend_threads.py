"""The same loaded model called from several Python threads gives each thread its own, correct results."""

from __future__ import annotations

import threading

import torch
from transformers import AutoModelForSequenceClassification

from hf_sparse import ops
from hf_sparse.integrations.encoder_layer import FusedEncoderForward
from tests.integrations.backend_support import WORDS, pruned_bert, save


def test_concurrent_forwards_match_sequential_ones(tmp_path):
    model, recipe = pruned_bert("4-block", max_position_embeddings=128)
    folder = save(model, tmp_path / "m", recipe, weight_dtype="int8", int8_embeddings=True, int8_linears=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    # 1-3 sequences of 34-76 tokens: with 2 kernel threads the fused layers split them by whole sequences, by token
    # blocks (one sequence of 64+ tokens, or the one left over) and by steps (short ones), concurrently
    inputs = [torch.randint(5, len(WORDS), (1 + i % 3, 34 + 6 * i), generator=g) for i in range(8)]
    fused = [m.forward.fused for m in loaded.modules() if isinstance(vars(m).get("forward"), FusedEncoderForward)]
    expected, splits = [], set()
    with torch.inference_mode():
        for ids in inputs:
            expected.append(loaded(input_ids=ids).logits)
            splits |= fused[0].parallelism if fused else set()
    if fused and ops.get_num_threads() >= 2:
        assert splits == {"sequences", "tokens", "steps"}, splits

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
