"""save_sparse end to end: what is written, that it loads back to the same model, sizes, atomicity, refusals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM, BertForSequenceClassification

from hf_sparse import SparseConfig, sparsify_
from hf_sparse.export import SparseCheckpoint, save_sparse
from hf_sparse.export import save as save_module
from tests.export.conftest import bert_config, int8_reference, pruned_bert


INPUT = torch.tensor([[2, 17, 45, 90, 3, 0], [2, 5, 6, 7, 8, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize("pattern", ["unstructured", "4-block", "2:4"])
@pytest.mark.parametrize("weight_dtype", [None, "int8"])
def test_round_trip_reproduces_the_model(tmp_path, pattern, weight_dtype):
    model, recipe = pruned_bert(pattern)
    out = save_sparse(model, tmp_path / "ckpt", recipe, weight_dtype=weight_dtype)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "sparse_config.json"]

    checkpoint = SparseCheckpoint(out)
    q = checkpoint.quantization
    assert q.pattern == pattern and len(q.modules) == 12
    assert q.weights.dtype == (weight_dtype or "float32")
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n in q.modules)
    total = sum(m.weight.numel() for n, m in model.named_modules() if n in q.modules)
    assert q.sparsity == pytest.approx(zeros / total, abs=1e-6)
    assert "classifier" in q.modules_to_not_convert and "bert.pooler.dense" in q.modules_to_not_convert

    loaded = checkpoint.load_into(BertForSequenceClassification(model.config).eval())
    expected = model if weight_dtype is None else int8_reference(model, q.modules)
    assert torch.equal(logits(loaded), logits(expected))
    assert SparseConfig.from_pretrained(out) == recipe


def test_int8_embeddings_and_linears_with_tied_decoder(tmp_path):
    model, recipe = pruned_bert("4-block", cls=BertForMaskedLM)
    out = save_sparse(model, tmp_path / "ckpt", recipe, weight_dtype="int8", int8_embeddings=True, int8_linears=True)
    q = SparseCheckpoint(out).quantization
    embeddings = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert all(q.modules[n].format == "dense" and q.modules[n].dtype == "int8" for n in embeddings)
    assert q.modules["cls.predictions.transform.dense"].dtype == "int8"
    # the decoder shares the word embeddings' tensor: stored once, under the embeddings' name
    assert "cls.predictions.decoder" not in q.modules and "cls.predictions.decoder" not in q.modules_to_not_convert
    assert q.modules_to_not_convert == []

    loaded = SparseCheckpoint(out).load_into(BertForMaskedLM(model.config).eval())
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    expected = int8_reference(model, q.modules)
    assert torch.equal(logits(loaded), logits(expected))


def test_file_size_is_what_the_format_says(tmp_path):
    """Every byte of a 4-block int8 module is accounted for."""
    model, recipe = pruned_bert("4-block")
    out = save_sparse(model, tmp_path / "ckpt", recipe, weight_dtype="int8")
    checkpoint = SparseCheckpoint(out)
    module = next(m for m in checkpoint.modules() if m.name == "bert.encoder.layer.1.output.dense")
    weight = dict(model.named_modules())[module.name].weight
    rows, cols = weight.shape  # (36, 70): 18 blocks per row, the last one short
    kept_blocks = int(torch.nn.functional.pad(weight != 0, (0, 2)).reshape(rows, -1, 4).any(-1).sum())
    nbytes = {k: t.numel() * t.element_size() for k, t in module.tensors.items()}
    assert nbytes == {
        "shape": 16,
        "block_bitmask": rows * math.ceil(math.ceil(cols / 4) / 8),
        "compressed": 4 * kept_blocks,
        "weight_scale": 4 * rows,
        "bias": 4 * rows,
    }


def test_scaled_down_bert_shrinks(tmp_path):
    """benchmarks/size does BERT-base (4.0x, 12.0x); a 2-layer, 128-wide BERT at 90% 4-block int8 must shrink too."""
    torch.manual_seed(0)
    config = bert_config(hidden_size=128, intermediate_size=508, vocab_size=1000, num_attention_heads=4)
    model = BertForSequenceClassification(config).eval()
    recipe = SparseConfig(schedule="one-shot", start=0, sparsity=0.9, pattern="4-block")
    sparsify_(model, recipe).remove()
    model.save_pretrained(tmp_path / "dense")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    linears = save_sparse(model, tmp_path / "a", recipe, weight_dtype="int8")
    everything = save_sparse(
        model, tmp_path / "b", recipe, weight_dtype="int8", int8_embeddings=True, int8_linears=True
    )
    assert dense / (linears / "model.safetensors").stat().st_size > 3.0
    assert dense / (everything / "model.safetensors").stat().st_size > 8.0


def test_float_dtype_stores_the_other_tensors_narrower(tmp_path):
    model, recipe = pruned_bert("4-block")
    out = save_sparse(model, tmp_path / "ckpt", recipe, float_dtype="bfloat16")
    plain = dict(SparseCheckpoint(out).plain_tensors())
    assert plain["bert.embeddings.LayerNorm.weight"].dtype == torch.bfloat16
    module = next(SparseCheckpoint(out).modules())
    assert module.tensors["compressed"].dtype == torch.float32 and module.tensors["bias"].dtype == torch.bfloat16
    assert "stored as bfloat16" in (out / "README.md").read_text()


def test_sharded_checkpoint_has_an_index(tmp_path):
    model, recipe = pruned_bert("unstructured", sparsity=0.8)
    out = save_sparse(model, tmp_path / "ckpt", recipe, max_shard_size=10_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    loaded = SparseCheckpoint(out).load_into(BertForSequenceClassification(model.config).eval())
    assert torch.equal(logits(loaded), logits(model))


def test_explicit_modules_and_pattern_without_recipe(tmp_path):
    model, _ = pruned_bert("2:4")
    out = save_sparse(
        model, tmp_path / "ckpt", modules=["intermediate.dense", r".*layer\.\d+\.output\.dense"], pattern="2:4"
    )
    q = SparseCheckpoint(out).quantization
    assert sorted(q.modules) == sorted(
        f"bert.encoder.layer.{i}.{kind}" for i in range(2) for kind in ("intermediate.dense", "output.dense")
    )
    assert not (out / "sparse_config.json").exists()


def test_pattern_is_verified_and_the_module_named(tmp_path):
    model, recipe = pruned_bert("unstructured")
    with pytest.raises(
        ValueError,
        match=r"module 'bert\.encoder\.layer\.0\.attention\.self\.query' \(sparsity .*\) does not follow pattern='4-block'",
    ):
        save_sparse(model, tmp_path / "a", modules=["query"], pattern="4-block")
    with pytest.raises(ValueError, match="does not follow pattern='2:4'"):
        save_sparse(model, tmp_path / "b", modules=["query"], pattern="2:4")
    with pytest.raises(ValueError, match="differs from the recipe's pattern='unstructured'"):
        save_sparse(model, tmp_path / "c", recipe, pattern="4-block")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_arguments_are_named(tmp_path):
    model, recipe = pruned_bert("4-block")
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['weight_dtpe'\]"):
        save_sparse(model, tmp_path / "a", recipe, weight_dtpe="int8")
    with pytest.raises(ValueError, match="weight_dtype='int4' is not a storage dtype"):
        save_sparse(model, tmp_path / "a", recipe, weight_dtype="int4")
    with pytest.raises(ValueError, match="needs to know which Linear modules are sparse"):
        save_sparse(model, tmp_path / "a")
    with pytest.raises(ValueError, match="int8_embeddings entry 'nope' matches no Embedding"):
        save_sparse(model, tmp_path / "a", recipe, int8_embeddings=["nope"])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds no hf_sparse checkpoint .*: notes\.txt\. save_sparse replaces"):
        save_sparse(model, tmp_path / "home", recipe)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        save_sparse(model, tmp_path / "home", recipe, overwrite="yes")


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model, recipe = pruned_bert("4-block")
    target = save_sparse(model, tmp_path / "ckpt", recipe)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    # fail after the weights and config.json are written to the temporary folder, while writing the card
    monkeypatch.setattr(save_module, "build_model_card", crash)
    other, _ = pruned_bert("4-block", seed=1)
    with pytest.raises(KeyboardInterrupt):
        save_sparse(other, target, recipe, weight_dtype="int8")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind

    with pytest.raises(KeyboardInterrupt):
        save_sparse(other, tmp_path / "new", recipe)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_tokenizer_is_saved(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sparse", "model"]) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(vocab))
    model, recipe = pruned_bert("4-block")
    out = save_sparse(model, tmp_path / "ckpt", recipe, tokenizer=tokenizer)
    assert (out / "tokenizer_config.json").is_file()
    text = "sparse model [MASK]"
    assert type(tokenizer).from_pretrained(out)(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert "AutoTokenizer.from_pretrained" in (out / "README.md").read_text()


def test_architecture_mismatch_is_refused(tmp_path):
    model, recipe = pruned_bert("4-block")
    out = save_sparse(model, tmp_path / "ckpt", recipe)
    wider = BertForSequenceClassification(bert_config(intermediate_size=72))
    with pytest.raises(
        ValueError,
        match=r"tensor 'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' .* has shape \(70, 36\), but BertForSequenceClassification expects \(72, 36\)",
    ):
        SparseCheckpoint(out).load_into(wider)


def trainer_output(folder, model):
    """What a Trainer leaves in output_dir: the dense final model, state, and checkpoint folders."""
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text('{"global_step": 500}')
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"optimizer state")
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_holding_other_files_is_refused(tmp_path):
    model, recipe = pruned_bert("4-block")
    folder = tmp_path / "out"
    before = trainer_output(folder, model)
    with pytest.raises(FileExistsError) as info:
        save_sparse(model, folder, recipe)
    message = str(info.value)
    assert f"save_directory {str(folder)!r} holds no hf_sparse checkpoint" in message
    assert "checkpoint-500/, config.json, model.safetensors, trainer_state.json" in message
    assert "would be lost. Pass a new or empty folder, move them elsewhere, or pass overwrite=True" in message
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before

    # an earlier hf_sparse checkpoint with something else beside it: only the foreign entries are named
    save_sparse(model, tmp_path / "ckpt", recipe)
    (tmp_path / "ckpt" / "trainer_state.json").write_text("{}")
    (tmp_path / "ckpt" / "runs").mkdir()
    with pytest.raises(
        FileExistsError,
        match=r"holds an hf_sparse checkpoint plus entries save_sparse does not "
        r"write: runs/, trainer_state\.json\. ",
    ):
        save_sparse(model, tmp_path / "ckpt", recipe)
    assert (tmp_path / "ckpt" / "trainer_state.json").is_file() and (tmp_path / "ckpt" / "runs").is_dir()


def test_overwrite_writes_into_the_folder_and_keeps_the_rest(tmp_path):
    model, recipe = pruned_bert("4-block")
    folder = tmp_path / "out"
    before = trainer_output(folder, model)
    model.save_pretrained(folder, max_shard_size=20_000)  # dense shards + index, which the checkpoint replaces
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "model.safetensors").write_bytes(b"stale")
    save_sparse(model, folder, recipe, weight_dtype="int8", overwrite=True)
    assert sorted(os.listdir(folder)) == [
        "README.md",
        "checkpoint-500",
        "config.json",
        "model.safetensors",
        "sparse_config.json",
        "trainer_state.json",
    ]
    for kept in ("trainer_state.json", "checkpoint-500/optimizer.pt"):
        assert (folder / kept).read_bytes() == before[Path(kept)]
    checkpoint = SparseCheckpoint(folder)
    loaded = checkpoint.load_into(BertForSequenceClassification(model.config).eval())
    assert torch.equal(logits(loaded), logits(int8_reference(model, checkpoint.quantization.modules)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_an_earlier_checkpoint_is_replaced_as_a_whole(tmp_path):
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sparse"]) + "\n")
    model, recipe = pruned_bert("4-block")
    folder = save_sparse(model, tmp_path / "ckpt", recipe, max_shard_size=10_000, tokenizer=BertTokenizer(str(vocab)))
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "tokenizer.json").is_file()
    save_sparse(model, folder, modules=["query"], pattern="4-block")
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(SparseCheckpoint(folder).quantization.modules) == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)
    ]


def test_stale_temporaries_of_the_target_are_removed(tmp_path):
    """A hard kill leaves `.<name>.<pid>.<random>.tmp` beside the target; the next save removes those of dead
    processes (and older ones without a pid), and leaves those of running processes and other targets alone."""
    model, recipe = pruned_bert("4-block")
    dead = tmp_path / ".ckpt.999999999.k2x9_abc.tmp"  # above any pid_max: no such process
    old_style = tmp_path / ".ckpt.q1w2e3r4.tmp"
    live = tmp_path / f".ckpt.{os.getppid()}.a1b2c3d4.tmp"
    other = tmp_path / ".ckpt2.999999999.a1b2c3d4.tmp"
    ours = tmp_path / f".ckpt.{os.getpid()}.ownownow.tmp"  # this pid, but no write of this process: pids repeat
    for folder in (dead, old_style, live, other, ours):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a file")
    stale_file = tmp_path / ".ckpt.999999998.zzzzzzzz.tmp"
    stale_file.write_bytes(b"")
    save_sparse(model, tmp_path / "ckpt", recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", live.name, other.name])


def test_every_file_and_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the synced file descriptors")
    from hf_sparse.utils import io

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    model, recipe = pruned_bert("4-block")
    target = save_sparse(model, tmp_path / "ckpt", recipe)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
    tmp = events[rename][1]
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{tmp}/{name}" for name in os.listdir(target)} | {tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in events[rename + 1 :]
