import math

import pytest
import torch

from hf_sparse.distillation import kd_loss


def reference_kd(student, teacher, t, valid=None):
    """T^2 * KL(p_t || p_s) per item, by the definition, in float64 Python loops."""
    s = student.double().reshape(-1, student.shape[-1])
    te = teacher.double().reshape(-1, teacher.shape[-1])
    keep = None if valid is None else valid.reshape(-1)
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if keep is not None and not keep[i]:
            continue
        ps = [math.exp(v / t) for v in s[i].tolist()]
        pt = [math.exp(v / t) for v in te[i].tolist()]
        zs, zt = sum(ps), sum(pt)
        total += sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))
        count += 1
    return t * t * total / count


@pytest.mark.parametrize("t", [1.0, 2.0, 5.5])
def test_kd_matches_definition(t):
    torch.manual_seed(0)
    s, te = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    assert float(kd_loss(s, te, t)) == pytest.approx(reference_kd(s, te, t), rel=1e-5)


def test_kd_token_level_with_mask():
    torch.manual_seed(0)
    s, te = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False
    assert float(kd_loss(s, te, 2.0, valid)) == pytest.approx(reference_kd(s, te, 2.0, valid), rel=1e-5)


def test_kd_is_zero_for_identical_logits_and_has_the_right_gradient():
    s = torch.randn(4, 3, requires_grad=True)
    loss = kd_loss(s, s.detach(), 2.0)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert s.grad.abs().max() < 1e-6


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="same head"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4), 2.0)
