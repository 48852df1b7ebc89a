"""`SparseCallback`: a thin adapter from Trainer events to the Sparsifier. No Trainer internals are copied."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..config import SparseConfig
from ..sparsity.sparsifier import STATE_FILE, Sparsifier


logger = logging.getLogger(__name__)


def _calling_handler():
    """The CallbackHandler dispatching the current event, found on the call stack."""
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        if isinstance(frame.f_locals.get("self"), CallbackHandler):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def _trainer_frames():
    """The frames of the Trainer methods dispatching the current event, innermost first (read only).

    Callbacks are not given the Trainer nor `train()`'s arguments; the stack is the only way to find them. If a
    transformers release moves them, the callers below degrade to a warning, never to a wrong result.
    """
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), Trainer):
            yield frame
        frame = frame.f_back


def _calling_trainer():
    """The Trainer whose event is being dispatched (read only, for sanity checks), or None."""
    return next((f.f_locals["self"] for f in _trainer_frames()), None)


def _resume_path() -> Path | None:
    """The checkpoint folder `trainer.train(resume_from_checkpoint=...)` resumes from, or None."""
    for frame in _trainer_frames():
        value = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    return None


class SparseCallback(TrainerCallback):
    """Prune (and distil) while `Trainer.train()` runs: `Trainer(..., callbacks=[SparseCallback(config)])`.

    - pruning steps follow the schedule in optimizer steps; pruned weights are re-zeroed after every step;
    - gradients for methods that need data come from the Trainer's train dataloader;
    - logs measured sparsity (global, per module) and the distillation terms with the Trainer's logs;
    - saves its state (masks, method state) into each checkpoint folder and restores it on
      `trainer.train(resume_from_checkpoint=...)`;
    - at the end of training removes every hook: the model is left with plain dense weights holding the zeros.

    Args:
        config: a SparseConfig, a dict, or the path of a JSON/YAML recipe.
        teacher: a teacher model, overriding `config.distillation.teacher` (e.g. one already in memory).
        loss_fn: `(model, batch) -> loss` for gradient-based methods (default: `model(**batch).loss`).
        log_per_module: also log each targeted module's sparsity (global sparsity is always logged).
    """

    def __init__(
        self,
        config: SparseConfig | dict | str | os.PathLike,
        teacher: Any = None,
        loss_fn=None,
        log_per_module: bool = True,
    ):
        if isinstance(config, dict):
            config = SparseConfig.from_dict(config)
        elif isinstance(config, (str, os.PathLike)):
            config = SparseConfig.from_pretrained(config)
        elif not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, a dict or a recipe path, got {type(config).__name__}")
        self.config = config
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.log_per_module = log_per_module
        self.sparsifier: Sparsifier | None = None

    # ---- start / end ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._run_before_reporters()
        if self.config.distillation is not None:
            self._refuse_ignored_loss(args)
        if self.sparsifier is not None:  # a second train() on the same callback
            self.sparsifier.remove()
        self.sparsifier = Sparsifier(
            model,
            self.config,
            total_steps=state.max_steps,
            dataloader=train_dataloader,
            loss_fn=self.loss_fn,
            teacher=self.teacher,
        )
        if self.sparsifier.distiller is not None:
            self.sparsifier.distiller.require_loss = True
        if state.global_step > 0:
            self._resume(args, state)
        else:
            self.sparsifier.step(0)

    def _run_before_reporters(self) -> None:
        """Move this callback to the front of the Trainer's list so its metrics are in `logs` before reporting
        callbacks (TensorBoard, W&B, ...), which the Trainer puts ahead of user callbacks, read them.

        The handler is iterating its list right now; moving the current item to the front neither skips nor
        repeats any callback for this event (everything after our index shifts by one, and so does the loop).
        """
        handler = _calling_handler()
        if handler is not None and self in handler.callbacks and handler.callbacks[0] is not self:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    def _refuse_ignored_loss(self, args) -> None:
        problems = []
        if getattr(args, "label_smoothing_factor", 0.0):
            problems.append(f"label_smoothing_factor={args.label_smoothing_factor}")
        trainer = _calling_trainer()
        if trainer is None:
            logger.warning(
                "hf_sparse: could not find the Trainer on the call stack, so Trainer(compute_loss_func=...) cannot be "
                "checked here; the distiller still refuses a loss it would not see at the first labelled batch"
            )
        elif getattr(trainer, "compute_loss_func", None) is not None:
            problems.append("compute_loss_func=...")
        if problems:
            raise ValueError(
                f"hf_sparse distillation puts the KD term into outputs.loss, but Trainer({', '.join(problems)}) "
                "computes its own loss and ignores outputs.loss, so distillation would be silently skipped. "
                "Remove those options or the distillation settings."
            )

    def _resume(self, args, state) -> None:
        folders = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        resumed = _resume_path()
        if resumed is not None and resumed not in folders:
            folders.insert(0, resumed)
        for folder in folders:
            path = folder / STATE_FILE
            if path.is_file():
                self.sparsifier.load(path)
                logger.info("hf_sparse: restored masks and method state from %s", path)
                return
        if self.sparsifier.method.state_dict():
            raise FileNotFoundError(
                f"hf_sparse: resuming at step {state.global_step} needs {STATE_FILE} (the masks and the "
                f"{self.config.method} method's state, e.g. movement scores, which the weights cannot give back), "
                f"but none was found in {', '.join(repr(str(f)) for f in folders)}. Copy it from the run's checkpoint "
                "folder into the folder you resume from"
            )
        # The checkpoint's weights hold the zeros exactly, so the masks can be recovered from them.
        keep = {n: self.sparsifier.pattern.keep_from_weight(m.weight) for n, m in self.sparsifier.targets.items()}
        self.sparsifier.set_masks(keep)
        self.sparsifier.global_step = state.global_step
        self.sparsifier.last_prune_step = self.sparsifier.timeline.last_update_at_or_before(state.global_step)
        logger.warning(
            "hf_sparse: no %s in %s; masks rebuilt from the zeros in the resumed weights", STATE_FILE, folders[0]
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.sparsifier is not None:
            self.sparsifier.remove()
            report = self.sparsifier.sparsity()
            logger.info("hf_sparse: training ended at %.4f sparsity over the targeted weights", report["global"])

    # ---- steps ----------------------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.sparsifier is not None:
            self.sparsifier.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step is incremented after this event: this is the end of optimizer step global_step + 1
        if self.sparsifier is not None:
            self.sparsifier.step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        # DeepSpeed steps inside backward, before the optimizer events: zero again at the very end of the step
        if self.sparsifier is not None:
            self.sparsifier.apply_masks()

    # ---- logging and checkpoints ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        if self.sparsifier is None:
            return {}
        measured = self.sparsifier.sparsity()
        out = {"sparsity/global": measured.pop("global"), "sparsity/target": self.sparsifier.target_sparsity()}
        if self.log_per_module:
            out.update({f"sparsity/{name}": value for name, value in measured.items()})
        if self.sparsifier.distiller is not None:
            out.update(self.sparsifier.distiller.pop_metrics())
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.sparsifier is None:
            return
        extra = self.metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if self.sparsifier is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.sparsifier.save(folder / STATE_FILE)
