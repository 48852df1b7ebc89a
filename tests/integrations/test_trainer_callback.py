import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sparse import SparseCallback, SparseConfig
from hf_sparse.distillation import kd_loss
from hf_sparse.sparsity.sparsifier import STATE_FILE
from tests.conftest import TinyClassificationData, make_tiny_bert


def args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 12,
        "logging_steps": 4,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
    }
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_trainer_prunes_to_target_in_pattern_and_logs(tmp_path):
    model = make_tiny_bert()
    cfg = SparseConfig(
        sparsity=0.9,
        pattern="4-block",
        distribution="uniform",
        schedule="cubic",
        start=0.1,
        end=0.7,
        update_every=2,
    )
    cb = SparseCallback(cfg)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=TinyClassificationData(n=96), callbacks=[cb])
    trainer.train()
    for name, module in cb.sparsifier.targets.items():
        w = module.weight
        assert abs(float((w == 0).float().mean()) - 0.9) <= 4 / w.numel(), name
        assert cb.sparsifier.pattern.follows(w != 0), name
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("sparsity/global" in h for h in logged)
    assert logged[-1]["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
    assert "sparsity/bert.encoder.layer.0.attention.self.query" in logged[-1]
    # nothing left behind: no hooks, no extra state dict keys
    assert set(model.state_dict()) == set(make_tiny_bert().state_dict())
    assert all(not p._backward_hooks for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_schedule_is_followed_at_intermediate_steps(tmp_path):
    model = make_tiny_bert()
    cfg = SparseConfig(sparsity=0.8, schedule="linear", start=0, end=8, update_every=2, distribution="uniform")
    cb = SparseCallback(cfg)
    seen = {}

    class Probe(TrainerCallback):  # runs after SparseCallback
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = cb.sparsifier.sparsity()["global"]

    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=10),
        train_dataset=TinyClassificationData(n=96),
        callbacks=[cb, Probe()],
    )
    trainer.train()
    numel = sum(m.weight.numel() for m in cb.sparsifier.targets.values())
    for step, measured in seen.items():
        last = min(8, step // 2 * 2)
        expected = 0.8 * last / 8
        assert abs(measured - expected) <= len(cb.sparsifier.targets) / numel, (step, measured, expected)


def run(tmp_path, model, cfg, resume=None, **kwargs):
    cb = SparseCallback(cfg)
    trainer = Trainer(
        model=model, args=args(tmp_path, **kwargs), train_dataset=TinyClassificationData(n=96), callbacks=[cb]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


@pytest.mark.slow
def test_resume_mid_schedule_gives_the_same_masks(tmp_path):
    cfg = SparseConfig(sparsity=0.85, pattern="4-block", schedule="cubic", start=2, end=10, update_every=2)
    _, straight = run(tmp_path / "a", make_tiny_bert(), cfg)
    straight_w = linear_weights(straight.sparsifier.model)

    run(tmp_path / "b", make_tiny_bert(), cfg, save_strategy="steps", save_steps=5)
    ckpt = tmp_path / "b" / "checkpoint-5"
    assert (ckpt / STATE_FILE).is_file()
    cb = SparseCallback(cfg)
    at_begin = {}

    class Probe(TrainerCallback):  # runs after SparseCallback's on_train_begin
        def on_train_begin(self, args, state, control, **kwargs):
            at_begin.update({n: m.clone() for n, m in cb.sparsifier.masks.items()})
            at_begin["step"] = cb.sparsifier.global_step

    trainer = Trainer(
        model=make_tiny_bert(seed=7),
        args=args(tmp_path / "b"),
        train_dataset=TinyClassificationData(n=96),
        callbacks=[cb, Probe()],
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert at_begin.pop("step") == 5
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, mask in at_begin.items():
        assert torch.equal(mask, saved[f"{name}.weight"] != 0), name
        assert not mask.all()
    resumed = cb
    resumed_w = linear_weights(resumed.sparsifier.model)
    for name in straight.sparsifier.targets:
        assert torch.equal(straight_w[name] != 0, resumed_w[name] != 0), name
        assert torch.allclose(straight_w[name], resumed_w[name], atol=1e-6), name


def test_resume_from_a_checkpoint_outside_output_dir_reads_its_state(tmp_path, caplog):
    import shutil

    cfg = SparseConfig(method="movement", sparsity=0.5, schedule="linear", start=2, end=10, update_every=2)
    run(tmp_path / "a", make_tiny_bert(), cfg, save_strategy="steps", save_steps=6)
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "a" / "checkpoint-6", moved)
    saved = load_file(str(moved / STATE_FILE))
    cb = SparseCallback(cfg)
    at_begin = {}

    class Probe(TrainerCallback):  # runs after SparseCallback's on_train_begin
        def on_train_begin(self, args, state, control, **kwargs):
            at_begin.update({k: v.clone() for k, v in cb.sparsifier.state_dict()["tensors"].items()})

    trainer = Trainer(
        model=make_tiny_bert(seed=7),
        args=args(tmp_path / "b"),  # another output_dir: no checkpoint-6 there
        train_dataset=TinyClassificationData(n=96),
        callbacks=[cb, Probe()],
    )
    with caplog.at_level(logging.INFO, logger="hf_sparse"):
        trainer.train(resume_from_checkpoint=str(moved))
    assert f"restored masks and method state from {moved / STATE_FILE}" in caplog.text
    assert set(at_begin) == set(saved) and any(k.startswith("method.") for k in saved)  # movement scores
    for key, value in saved.items():
        assert torch.equal(at_begin[key], value), key


def test_resume_without_the_state_a_method_needs_is_an_error(tmp_path):
    cfg = SparseConfig(method="movement", sparsity=0.5, schedule="linear", start=2, end=10, update_every=2)
    run(tmp_path, make_tiny_bert(), cfg, save_strategy="steps", save_steps=6)
    (tmp_path / "checkpoint-6" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"resuming at step 6 needs hf_sparse_state.*movement.*Copy it"):
        run(tmp_path, make_tiny_bert(seed=3), cfg, resume=str(tmp_path / "checkpoint-6"))


def test_resume_under_another_recipe_is_refused(tmp_path):
    cfg = SparseConfig(sparsity=0.5, pattern="4-block", schedule="linear", start=2, end=10, update_every=2)
    run(tmp_path, make_tiny_bert(), cfg, save_strategy="steps", save_steps=6)
    other = SparseConfig(**{**cfg.to_dict(), "sparsity": 0.75})
    with pytest.raises(ValueError, match=r"another recipe \(sparsity: saved 0.5, now 0.75\)"):
        run(tmp_path, make_tiny_bert(seed=3), other, resume=str(tmp_path / "checkpoint-6"))


def test_resume_without_state_file_rebuilds_masks_from_zeros(tmp_path, caplog):
    cfg = SparseConfig(sparsity=0.5, schedule="one-shot", start=0)
    run(tmp_path, make_tiny_bert(), cfg, save_strategy="steps", save_steps=6)
    (tmp_path / "checkpoint-6" / STATE_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        _, cb = run(tmp_path, make_tiny_bert(seed=3), cfg, resume=str(tmp_path / "checkpoint-6"))
    assert "rebuilt from the zeros" in caplog.text
    assert cb.sparsifier.sparsity()["global"] == pytest.approx(0.5, abs=1e-3)


def test_hardness_zero_reproduces_plain_training_bit_for_bit(tmp_path):
    cfg_plain = SparseConfig(sparsity=0.6, schedule="cubic", start=0, end=6, update_every=2)
    cfg_kd = SparseConfig(
        sparsity=0.6,
        schedule="cubic",
        start=0,
        end=6,
        update_every=2,
        distillation={"teacher": make_tiny_bert(seed=5), "hardness": 0.0},
    )
    a, _ = run(tmp_path / "a", make_tiny_bert(), cfg_plain, max_steps=8)
    b, cb = run(tmp_path / "b", make_tiny_bert(), cfg_kd, max_steps=8)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert any("distillation/kd_loss" in h for h in b.state.log_history)


def test_logged_kd_term_matches_independent_computation(tmp_path):
    teacher = make_tiny_bert(seed=5)
    student = make_tiny_bert()
    data = TinyClassificationData(n=8)
    full = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = float(kd_loss(student(**full).logits, teacher(**full).logits, 3.0))
    cfg = SparseConfig(
        sparsity=0.5,
        schedule="one-shot",
        start=1,
        distillation={"teacher": teacher, "hardness": 1.0, "temperature": 3.0},
    )
    cb = SparseCallback(cfg)
    trainer = Trainer(
        model=student, args=args(tmp_path, max_steps=1, logging_steps=1), train_dataset=data, callbacks=[cb]
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "distillation/kd_loss" in h][0]
    assert logged["distillation/kd_loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["loss"] == pytest.approx(expected, rel=1e-5)  # hardness 1: the training loss is the KD term


def test_accumulation_gives_the_same_first_update_with_kd(tmp_path):
    """SGD makes the update proportional to the loss scale, so a mis-normalised loss would show."""

    def first_update(batch_size, accumulation):
        model = make_tiny_bert()
        before = linear_weights(model)
        cfg = SparseConfig(
            sparsity=0.5,
            schedule="one-shot",
            start=5,
            distillation={"teacher": make_tiny_bert(seed=5), "hardness": 0.5, "temperature": 2.0},
        )
        run(
            tmp_path / f"{batch_size}",
            model,
            cfg,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,
        )
        after = linear_weights(model)
        return {n: after[n] - before[n] for n in before}

    one, two = first_update(8, 1), first_update(4, 2)
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6), name
    assert any(d.abs().max() > 1e-4 for d in one.values())


@pytest.mark.parametrize("option", ["compute_loss_func", "label_smoothing_factor"])
def test_distillation_refuses_setups_that_ignore_its_loss(tmp_path, option):
    cfg = SparseConfig(sparsity=0.5, schedule="one-shot", distillation={"teacher": make_tiny_bert(seed=5)})
    kwargs = {}
    extra_args = {}
    if option == "compute_loss_func":
        kwargs["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum() * 0
    else:
        extra_args["label_smoothing_factor"] = 0.1
    trainer = Trainer(
        model=make_tiny_bert(),
        args=args(tmp_path, **extra_args),
        train_dataset=TinyClassificationData(n=16),
        callbacks=[SparseCallback(cfg)],
        **kwargs,
    )
    with pytest.raises(ValueError, match=option):
        trainer.train()


def test_callback_accepts_a_recipe_file(tmp_path):
    cfg = SparseConfig(sparsity=0.5, pattern="2:4", schedule="one-shot")
    cfg.save_file(tmp_path / "recipe.yaml")
    assert SparseCallback(str(tmp_path / "recipe.yaml")).config == cfg


def test_reporting_callbacks_see_the_sparsity_metrics(tmp_path):
    """Reporters (TensorBoard, W&B) sit before user callbacks; hf_sparse must fill `logs` before they read it."""
    seen = []

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    cb = SparseCallback(SparseConfig(sparsity=0.5, schedule="one-shot", start=0))
    trainer = Trainer(
        model=make_tiny_bert(),
        args=args(tmp_path, max_steps=4, logging_steps=2),
        train_dataset=TinyClassificationData(n=32),
        callbacks=[Reporter(), cb],
    )
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("Reporter") < names.index("SparseCallback")
    trainer.train()
    train_logs = [log for log in seen if "loss" in log]
    assert train_logs and all(log["sparsity/global"] == pytest.approx(0.5, abs=1e-3) for log in train_logs)
