from .distiller import Distiller, LossIgnoredError, load_teacher
from .loss import kd_loss


__all__ = ["Distiller", "LossIgnoredError", "kd_loss", "load_teacher"]
