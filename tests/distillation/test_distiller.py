import pytest
import torch

from hf_sparse import DistillationConfig, SparseConfig, sparsify_
from hf_sparse.distillation import Distiller, LossIgnoredError, kd_loss
from tests.conftest import TinyClassificationData, make_tiny_bert


def batch(n=8):
    data = TinyClassificationData(n=n)
    return {k: torch.stack([data[i][k] for i in range(n)]) for k in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("hardness", [0.0, 0.3, 1.0])
def test_mixed_loss_matches_independent_computation(hardness):
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    b = batch()
    student.train()
    with torch.no_grad():
        plain = student(**b)
        t_logits = teacher(**{k: v for k, v in b.items() if k != "labels"}).logits
    kd = kd_loss(plain.logits, t_logits, 2.0)
    d = Distiller(student, DistillationConfig(teacher=teacher, hardness=hardness, temperature=2.0))
    out = student(**b)
    expected = (1 - hardness) * plain.loss + hardness * kd
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out["loss"] is out.loss
    metrics = d.pop_metrics()
    assert metrics["distillation/kd_loss"] == pytest.approx(float(kd), rel=1e-6)
    assert metrics["distillation/task_loss"] == pytest.approx(float(plain.loss), rel=1e-6)
    assert d.pop_metrics() == {}
    d.remove()
    assert torch.equal(student(**b).loss, plain.loss)


def test_hardness_zero_leaves_the_loss_bit_identical():
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    b = batch()
    student.train()
    plain = student(**b, num_items_in_batch=torch.tensor(8)).loss
    Distiller(student, DistillationConfig(teacher=teacher, hardness=0.0))
    assert torch.equal(student(**b, num_items_in_batch=torch.tensor(8)).loss, plain)


def test_num_items_in_batch_normalises_the_mixed_loss():
    """Two micro-batches scaled by items/num_items sum to the mean over the whole batch."""
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    b = batch(8)
    halves = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
    Distiller(student, DistillationConfig(teacher=teacher, hardness=0.5))
    student.train()
    whole = student(**b, num_items_in_batch=torch.tensor(8)).loss
    summed = sum(student(**h, num_items_in_batch=torch.tensor(8)).loss for h in halves)
    assert torch.allclose(whole, summed, atol=1e-6)


def test_eval_mode_is_untouched_and_teacher_is_frozen():
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    d = Distiller(student, DistillationConfig(teacher=teacher, hardness=1.0))
    assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
    student.eval()
    b = batch()
    with torch.no_grad():
        out = student(**b)
    assert d.pop_metrics() == {}
    assert out.loss is not None
    assert teacher not in list(student.modules())


def test_teacher_loaded_from_a_path(tmp_path):
    teacher = make_tiny_bert(seed=3)
    teacher.save_pretrained(tmp_path / "teacher")
    student = make_tiny_bert(seed=0)
    sp = sparsify_(
        student, SparseConfig(schedule="one-shot", sparsity=0.5, distillation={"teacher": str(tmp_path / "teacher")})
    )
    loaded = sp.distiller.teacher
    for (n, p), (_, q) in zip(loaded.named_parameters(), teacher.named_parameters()):
        assert torch.equal(p, q), n


def test_missing_teacher_and_bad_path_are_explained(tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        sparsify_(make_tiny_bert(), SparseConfig(schedule="one-shot", distillation={"hardness": 1.0}))
    with pytest.raises(OSError, match="distillation.teacher"):
        sparsify_(
            make_tiny_bert(),
            SparseConfig(schedule="one-shot", distillation={"teacher": str(tmp_path / "missing")}),
        )


def test_missing_loss_is_refused_when_it_would_be_ignored():
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    d = Distiller(student, DistillationConfig(teacher=teacher, hardness=1.0))
    b = {k: v for k, v in batch().items() if k != "labels"}
    student.train()
    assert student(**b).loss is not None  # pure KD in a custom loop is fine
    d.require_loss = True
    with pytest.raises(LossIgnoredError, match="compute_loss_func"):
        student(**b)
