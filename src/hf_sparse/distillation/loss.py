from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over items (rows of the last dim).

    `valid` (bool, the logits' shape without the class dim) restricts the average, e.g. to non-padding tokens.
    Computed in fp32 whatever the logits' dtype.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; the teacher must have the same head (labels / vocabulary)"
        )
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_item = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    if valid is not None:
        valid = valid.to(per_item.device).bool()
        per_item = per_item[valid]
    if per_item.numel() == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    return per_item.mean() * (t * t)
