"""SparseCheckpoint refuses corrupted, truncated and tampered checkpoints, each with its own error."""

from __future__ import annotations

import json

import pytest
import torch

from hf_sparse.export import CheckpointError, SparseCheckpoint, save_sparse
from hf_sparse.export.save import CHECKSUMS_KEY
from tests.export.conftest import pruned_bert, rewrite_weights, set_nm_index


QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An int8 4-block checkpoint, fp32 2:4 and 2:6 checkpoints, and a sharded 4-block one, copied fresh for each
    test. M=6 needs 3-bit indices, whose codes 6 and 7 are positions out of range."""
    root = tmp_path_factory.mktemp("saved")
    model, recipe = pruned_bert("4-block")
    save_sparse(model, root / "block4", recipe, weight_dtype="int8")
    save_sparse(model, root / "sharded", recipe, max_shard_size=10_000)
    model, recipe = pruned_bert("2:4")
    save_sparse(model, root / "nm", recipe)
    model, recipe = pruned_bert("2:6", sparsity=1 - 2 / 6)
    save_sparse(model, root / "nm6", recipe)
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    import shutil

    def copy(name="block4"):
        return shutil.copytree(saved / name, tmp_path / name)

    return copy


def edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def expect_error(folder, message, **kwargs):
    with pytest.raises(CheckpointError, match=message):
        SparseCheckpoint(folder, **kwargs).validate()


def test_valid_checkpoints_pass(ckpt):
    for name in ("block4", "nm"):
        checkpoint = SparseCheckpoint(ckpt(name))
        checkpoint.validate()
        modules = list(checkpoint.modules())
        assert len(modules) == 12 and all(m.shape == m.decompress().shape for m in modules)


def test_truncated_weights(ckpt):
    folder = ckpt()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(folder, r"model\.safetensors' is truncated or corrupt")


def test_corrupted_bytes_fail_the_checksum(ckpt):
    folder = ckpt()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    expect_error(folder, r"does not match its checksum: the file is corrupt")


def test_corrupted_header(ckpt):
    folder = ckpt()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10] = ord("{")  # break the JSON header
    path.write_bytes(bytes(data))
    expect_error(folder, "is truncated or corrupt")


def test_missing_weights_file(ckpt):
    folder = ckpt()
    (folder / "model.safetensors").unlink()
    expect_error(folder, "has neither model.safetensors nor model.safetensors.index.json")


def test_newer_format_version(ckpt):
    folder = ckpt()
    edit_config(folder, lambda c: c["quantization_config"].update(format_version=2))
    expect_error(folder, "format_version is 2, but this hf_sparse reads versions up to 1: .* upgrade it")


def test_not_an_hf_sparse_checkpoint(ckpt):
    folder = ckpt()
    edit_config(folder, lambda c: c.pop("quantization_config"))
    expect_error(folder, "has no quantization_config: this is not an hf_sparse checkpoint")
    edit_config(folder, lambda c: c.update(quantization_config={"quant_method": "gptq"}))
    expect_error(folder, "quant_method is 'gptq'")


def test_config_edited_after_save(ckpt):
    folder = ckpt()
    edit_config(folder, lambda c: c["quantization_config"]["modules"][QUERY].update(dtype="float32"))
    expect_error(folder, "differs from the one stored in 'model.safetensors' .*'modules'")


def test_truncated_config(ckpt):
    folder = ckpt()
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[:-20])
    expect_error(folder, "config.json' is not valid JSON")


def test_missing_module_tensor(ckpt):
    folder = ckpt()
    rewrite_weights(folder / "model.safetensors", lambda t: t.pop(f"{QUERY}.block_bitmask"))
    expect_error(folder, f"tensor '{QUERY}.block_bitmask' is missing from the weight files")


def test_unexpected_module_tensor(ckpt):
    folder = ckpt()
    rewrite_weights(folder / "model.safetensors", lambda t: t.update({f"{QUERY}.weight": torch.zeros(36, 36)}))
    expect_error(folder, f"tensor '{QUERY}.weight' is unexpected: config.json stores '{QUERY}' as block4-bitmask")


def test_tensor_added_without_checksum(ckpt):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = ckpt()
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["extra"] = torch.zeros(3)
    save_file(tensors, str(path), metadata=metadata)
    expect_error(folder, "metadata does not list the file's tensor 'extra'; the file was altered")


def test_wrong_shape(ckpt):
    folder = ckpt()
    rewrite_weights(folder / "model.safetensors", lambda t: t.update({f"{QUERY}.shape": torch.tensor([36, 80])}))
    expect_error(folder, rf"tensor '{QUERY}.block_bitmask' has shape \(36, 2\), expected \(36, 3\)")
    # a shape the data happens to fit (40 columns still need 2 bitmask bytes) is caught against the model
    rewrite_weights(folder / "model.safetensors", lambda t: t.update({f"{QUERY}.shape": torch.tensor([36, 40])}))
    model, _ = pruned_bert("4-block")
    with pytest.raises(CheckpointError, match=rf"'{QUERY}.weight' .* has shape \(36, 40\), but .* expects \(36, 36\)"):
        SparseCheckpoint(folder).load_into(model)


def test_counts_that_do_not_add_up(ckpt):
    folder = ckpt()

    def drop_a_block(t):
        t[f"{QUERY}.compressed"] = t[f"{QUERY}.compressed"][:-4]

    rewrite_weights(folder / "model.safetensors", drop_a_block)
    expect_error(folder, f"tensor '{QUERY}.compressed' has shape")


def test_repeated_nm_positions(ckpt):
    folder = ckpt("nm")

    def scramble(t):
        t[f"{QUERY}.nm_indices"] = torch.zeros_like(t[f"{QUERY}.nm_indices"])

    rewrite_weights(folder / "model.safetensors", scramble)
    expect_error(folder, f"tensor '{QUERY}.nm_indices' repeats a position or is out of order")


def test_nm_index_out_of_range(ckpt):
    folder = ckpt("nm6")
    SparseCheckpoint(folder).validate()
    rewrite_weights(folder / "model.safetensors", set_nm_index)  # group 0 of row 0 keeps positions (p, 6)
    expect_error(folder, rf"tensor '{QUERY}.nm_indices' holds a position >= M=6: index out of range")
    model, _ = pruned_bert("2:6", sparsity=1 - 2 / 6)
    with pytest.raises(CheckpointError, match="index out of range"):
        SparseCheckpoint(folder).load_into(model)


def test_bad_scale(ckpt):
    folder = ckpt()
    rewrite_weights(folder / "model.safetensors", lambda t: t[f"{QUERY}.weight_scale"].mul_(-1))
    expect_error(folder, f"'{QUERY}.weight_scale' holds a value that is not finite and > 0")


def test_bias_of_the_wrong_size(ckpt):
    folder = ckpt()
    rewrite_weights(folder / "model.safetensors", lambda t: t.update({f"{QUERY}.bias": torch.zeros(35)}))
    expect_error(folder, f"tensor '{QUERY}.bias' has shape \\(35,\\), but the weight has 36 rows")


def test_a_flipped_value_is_caught_by_its_checksum_only(ckpt):
    folder = ckpt()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + header_size])["bert.embeddings.word_embeddings.weight"]["data_offsets"]
    data[8 + header_size + begin + 2] ^= 0x01  # one fp32 weight changes a little: no format check can see it
    path.write_bytes(bytes(data))
    SparseCheckpoint(folder, verify_checksums=False).validate()
    expect_error(folder, "tensor 'bert.embeddings.word_embeddings.weight' in 'model.safetensors' does not match its")


def test_inconsistent_index(tmp_path):
    model, recipe = pruned_bert("4-block")
    folder = save_sparse(model, tmp_path / "ckpt", recipe, max_shard_size=10_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(f for f in files if f != index["weight_map"][key])
    index_path.write_text(json.dumps(index))
    expect_error(folder, "model.safetensors.index.json does not match the weight files")
    index["weight_map"][key] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    expect_error(folder, "not a file in the folder")


def shard_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_shards_list_their_own_checksums(ckpt):
    folder = ckpt("sharded")
    files = sorted(folder.glob("model-*.safetensors"))
    assert len(files) > 1
    for path in files:
        metadata, tensors = shard_metadata(path)
        assert sorted(json.loads(metadata[CHECKSUMS_KEY])) == sorted(tensors)
    SparseCheckpoint(folder).validate()


def test_shard_checksum_lists_may_cover_the_whole_checkpoint_but_must_agree(ckpt):
    """transformers' save_pretrained writes one metadata dict into every shard: each shard then lists all the
    checkpoint's tensors. That is accepted; lists naming a tensor no file holds, or disagreeing, are not."""
    from safetensors.torch import save_file

    folder = ckpt("sharded")
    files = sorted(folder.glob("model-*.safetensors"))
    everything = {}
    for path in files:
        everything.update(json.loads(shard_metadata(path)[0][CHECKSUMS_KEY]))

    def relist(path, checksums):
        metadata, tensors = shard_metadata(path)
        metadata[CHECKSUMS_KEY] = json.dumps(checksums)
        save_file(tensors, str(path), metadata=metadata)

    for path in files:
        relist(path, everything)
    checkpoint = SparseCheckpoint(folder)
    checkpoint.validate()
    key = sorted(everything)[0]
    assert checkpoint.checksum(key) == everything[key]

    relist(files[0], {**everything, "bert.ghost.weight": everything[key]})
    expect_error(folder, r"lists tensor 'bert\.ghost\.weight', which no weight file holds: a shard is missing")

    other = next(k for k in everything if checkpoint.keys[k] != files[0].name)  # a tensor of another shard
    relist(files[0], {**everything, other: "0" * 64})
    expect_error(folder, f"disagree on tensor '{other}': the files come from different saves, or one was altered")


def test_a_tampered_shard_fails_its_checksum(ckpt):
    from tests.export.conftest import flip_byte

    folder = ckpt("sharded")
    checkpoint = SparseCheckpoint(folder)
    key = f"{QUERY}.compressed"
    flip_byte(folder / checkpoint.keys[key], key)
    expect_error(folder, f"tensor '{key}' in '{checkpoint.keys[key]}' does not match its checksum")
