import json
import re

import pytest

from hf_sparse import DistillationConfig, SparseConfig
from hf_sparse.version import __version__


def full_config():
    return SparseConfig(
        method="magnitude",
        sparsity=0.9,
        pattern="4-block",
        distribution="uniform",
        targets=["query", r"bert\.encoder\.layer\.\d+\.output\.dense"],
        exclude=["layer.0.attention.self.query"],
        sparsity_overrides={"intermediate.dense": 0.8},
        schedule="cubic",
        initial_sparsity=0.7,
        start=0.1,
        end=700,
        update_every=50,
        distillation={"teacher": "some/teacher", "hardness": 0.5, "temperature": 5.5},
    )


def test_json_round_trip(tmp_path):
    cfg = full_config()
    path = cfg.save_pretrained(tmp_path)
    assert path.name == "sparse_config.json"
    data = json.loads(path.read_text())
    assert data["hf_sparse_version"] == __version__
    assert list(data) == sorted(data), "keys are written sorted"
    again = SparseConfig.from_pretrained(tmp_path)
    assert again == cfg
    assert isinstance(again.distillation, DistillationConfig)
    assert isinstance(again.start, float) and isinstance(again.end, int), "steps vs fractions survive"


def test_yaml_round_trip(tmp_path):
    cfg = full_config()
    cfg.save_file(tmp_path / "recipe.yaml")
    assert "hf_sparse_version" in (tmp_path / "recipe.yaml").read_text()
    assert SparseConfig.from_file(tmp_path / "recipe.yaml") == cfg
    assert SparseConfig.from_pretrained(tmp_path / "recipe.yaml") == cfg


def test_teacher_model_is_saved_as_its_path():
    from tests.conftest import make_tiny_bert

    teacher = make_tiny_bert()
    teacher.config._name_or_path = "org/teacher"
    cfg = SparseConfig(distillation=DistillationConfig(teacher=teacher))
    assert cfg.to_dict()["distillation"]["teacher"] == "org/teacher"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"pattern": "3-block"}, "pattern"),
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "2:4", "sparsity": 0.9}, "sparsity=0.9 is impossible with pattern='2:4'"),
        ({"method": "random"}, "method"),
        ({"schedule": "exponential"}, "schedule"),
        ({"distribution": "layerwise"}, "distribution"),
        ({"start": 0.8, "end": 0.2}, "start"),
        ({"start": 500, "end": 100}, "start"),
        ({"start": 1.5}, "start"),
        ({"end": -3}, "end"),
        ({"update_every": 0}, "update_every"),
        ({"initial_sparsity": 0.95, "sparsity": 0.9}, "initial_sparsity"),
        ({"targets": ["query["]}, "targets"),
        ({"sparsity_overrides": {"query": 2.0}}, "sparsity_overrides"),
        ({"distillation": {"hardness": 3.0}}, "distillation.hardness"),
        ({"distillation": {"temperature": 0}}, "distillation.temperature"),
        ({"distillation": {"teacher": "x", "alpha": 0.5}}, "alpha"),
        ({"method_args": {"nope": 1}}, "method_args"),
    ],
)
def test_invalid_fields_are_named(kwargs, field):
    with pytest.raises((ValueError, TypeError)) as err:
        SparseConfig(**kwargs)
    assert field in str(err.value)


def test_unknown_key_in_recipe_is_refused(tmp_path):
    (tmp_path / "sparse_config.json").write_text(json.dumps({"sparsity": 0.5, "sparsty": 0.9}))
    with pytest.raises(ValueError, match="sparsty"):
        SparseConfig.from_pretrained(tmp_path)


def test_malformed_file_names_the_file(tmp_path):
    path = tmp_path / "sparse_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="sparse_config.json"):
        SparseConfig.from_file(path)


def test_fraction_needs_total_steps():
    cfg = SparseConfig(start=0.1, end=0.5)
    assert cfg.resolve_step("start", 1000) == 100
    assert cfg.resolve_step("end", 1000) == 500
    with pytest.raises(ValueError, match="total_steps"):
        cfg.resolve_step("end", None)


@pytest.mark.parametrize("name", ["missing_recipe.yaml", "./configs/recipe.json", "runs/a/sparse_config.json"])
def test_a_missing_local_recipe_is_named_not_looked_up_on_the_hub(name, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking name must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(name)) + ".*does not exist"):
        SparseConfig.from_pretrained(name)


def test_a_hub_id_downloads_the_recipe_and_hub_failures_name_it(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cfg = SparseConfig(sparsity=0.75, pattern="4-block")
    cfg.save_pretrained(tmp_path)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if repo_id == "org/missing":
            raise LocalEntryNotFoundError("offline")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert SparseConfig.from_pretrained("org/recipe", revision="v1") == cfg
    assert calls == [("org/recipe", "sparse_config.json", {"revision": "v1"})]
    with pytest.raises(OSError, match="'org/missing' is neither a local file or folder nor a Hub repository"):
        SparseConfig.from_pretrained("org/missing")
