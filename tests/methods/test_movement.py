"""Movement pruning: scores against direct computation, ranking, the soft variant's Adam, checkpoint state."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hf_sparse import SparseConfig, sparsify_


class TwoLinear(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(12, 8), nn.Linear(8, 3)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]


def train(model, sp, data, lr=0.1, on_step=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if on_step is not None:
            on_step()
        sp.before_optimizer_step()
        opt.step()
        sp.step()
        opt.zero_grad()


def movement_config(**kwargs):
    base = {"method": "movement", "sparsity": 0.5, "schedule": "one-shot", "start": 4}
    return SparseConfig(**{**base, **kwargs})


def test_hard_scores_are_the_accumulated_movement_and_masks_keep_the_top():
    model = TwoLinear()
    sp = sparsify_(model, movement_config(start=4))
    expected = {n: torch.zeros_like(m.weight) for n, m in sp.targets.items()}

    def accumulate():
        for n, m in sp.targets.items():
            expected[n] -= m.weight.detach() * m.weight.grad

    train(model, sp, batches(3), on_step=accumulate)
    assert sp.sparsity()["global"] == 0.0
    for n in expected:
        torch.testing.assert_close(sp.method.scores_[n], expected[n])

    train(model, sp, batches(1, seed=2), on_step=accumulate)  # step 4 prunes
    flat = torch.cat([expected[n].flatten() for n in sp.targets])
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[torch.topk(flat, flat.numel() // 2).indices] = True
    got = torch.cat([sp.masks[n].flatten() for n in sp.targets])
    assert torch.equal(got, kept)
    for n, m in sp.targets.items():
        assert torch.equal(m.weight != 0, sp.masks[n])


def test_pruned_scores_freeze_and_pruned_weights_stay_pruned():
    model = TwoLinear()
    config = movement_config(schedule="linear", sparsity=0.6, initial_sparsity=0.3, start=2, end=6, update_every=2)
    sp = sparsify_(model, config)
    train(model, sp, batches(2))
    first = {n: m.clone() for n, m in sp.masks.items()}
    frozen = {n: sp.method.scores_[n][~first[n]].clone() for n in first}
    train(model, sp, batches(4, seed=3))
    for n in first:
        assert not (sp.masks[n] & ~first[n]).any(), "a pruned weight came back"
        # zero weights have zero movement W * dL/dW, so their scores no longer change
        torch.testing.assert_close(sp.method.scores_[n][~first[n]], frozen[n])
    assert sp.sparsity()["global"] == pytest.approx(0.6, abs=0.01)


def test_4block_groups_rank_by_the_sum_of_their_scores():
    model = TwoLinear()
    sp = sparsify_(model, movement_config(pattern="4-block", start=3))
    train(model, sp, batches(2))
    scores = {n: s.clone() for n, s in sp.method.scores_.items()}
    grads_hook = {}

    def last_movement():
        for n, m in sp.targets.items():
            grads_hook[n] = -m.weight.detach() * m.weight.grad

    train(model, sp, batches(1, seed=5), on_step=last_movement)
    sums = torch.cat([(scores[n] + grads_hook[n]).view(-1, 4).sum(-1) for n in sp.targets])
    kept = torch.zeros_like(sums, dtype=torch.bool)
    kept[torch.topk(sums, sums.numel() // 2).indices] = True
    got = torch.cat([sp.masks[n].view(-1, 4).all(-1) for n in sp.targets])
    assert torch.equal(got, kept)


def test_soft_scores_follow_adam_on_the_straight_through_gradient_plus_regulariser():
    model = TwoLinear()
    lam, lr = 50.0, 0.05
    sp = sparsify_(
        model, movement_config(start=10, method_args={"variant": "soft", "score_lr": lr, "regularization": lam})
    )
    ref = {n: nn.Parameter(torch.zeros_like(m.weight)) for n, m in sp.targets.items()}
    opt = torch.optim.Adam(ref.values(), lr=lr)
    numel = sum(p.numel() for p in ref.values())

    def reference_step():
        for n, m in sp.targets.items():
            s = ref[n]
            reg = lam / numel * torch.sigmoid(s) * (1 - torch.sigmoid(s))
            s.grad = m.weight.detach() * m.weight.grad + reg.detach()
        opt.step()

    train(model, sp, batches(5), on_step=reference_step)
    for n in ref:
        torch.testing.assert_close(sp.method.scores_[n], ref[n].detach(), rtol=1e-5, atol=1e-7)


def test_state_round_trip_through_the_sparsifier_file(tmp_path):
    for variant in ("hard", "soft"):
        model = TwoLinear()
        config = movement_config(start=8, method_args={"variant": variant})
        sp = sparsify_(model, config)
        train(model, sp, batches(3))
        path = sp.save(tmp_path / f"{variant}.safetensors")
        saved = load_file(str(path))
        for n in sp.targets:
            torch.testing.assert_close(saved[f"method.scores.{n}"], sp.method.scores_[n])
        sp.remove()

        fresh = TwoLinear()
        sp2 = sparsify_(fresh, config)
        sp2.load(path)
        assert sp2.method.steps == 3
        for n in sp.targets:
            torch.testing.assert_close(sp2.method.scores_[n], saved[f"method.scores.{n}"])
            if variant == "soft":
                torch.testing.assert_close(sp2.method.exp_avg_sq[n], saved[f"method.exp_avg_sq.{n}"])


def test_state_from_another_variant_or_shape_is_refused():
    model = TwoLinear()
    sp = sparsify_(model, movement_config(start=8, method_args={"variant": "soft"}))
    state = sp.method.state_dict()
    hard = sparsify_(TwoLinear(), movement_config(start=8))
    with pytest.raises(KeyError, match=r"movement pruning state \(hard\) does not match.*unexpected \['exp_avg"):
        hard.method.load_state_dict(state)
    bad = {k: (v[:1] if k == "scores.layers.0" else v) for k, v in hard.method.state_dict().items()}
    with pytest.raises(ValueError, match=r"'scores.layers.0' has shape \(1, 12\).*weight shape \(8, 12\)"):
        hard.method.load_state_dict(bad)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"cannot prune at step 0 \(start=0\).*start=0.1"):
        sparsify_(TwoLinear(), movement_config(start=0))
    with pytest.raises(ValueError, match=r"method_args.variant must be one of \('hard', 'soft'\)"):
        movement_config(method_args={"variant": "medium"})
    with pytest.raises(ValueError, match=r"method_args.score_lr must be a number > 0"):
        movement_config(method_args={"score_lr": 0})
    model = TwoLinear()
    sp = sparsify_(model, movement_config(start=1))
    with pytest.raises(ValueError, match=r"no scores yet.*before_optimizer_step\(\)"):
        sp.step(1)  # a loop that never called before_optimizer_step
    with pytest.raises(ValueError, match=r"no gradient on any targeted weight.*after loss.backward\(\)"):
        sp.before_optimizer_step()


def _trainer_run(model, data, out_dir, config, resume=None):
    from transformers import Trainer, TrainingArguments

    from hf_sparse import SparseCallback

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=2, disable_tqdm=True, learning_rate=1e-3, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[SparseCallback(config)]).train(
        resume_from_checkpoint=resume
    )


def test_scores_are_saved_with_trainer_checkpoints_and_restored_on_resume(tiny_bert, tiny_data, tmp_path):
    from safetensors import safe_open

    fresh = copy.deepcopy(tiny_bert)
    config = movement_config(start=3, end=4, schedule="linear", initial_sparsity=0.3, sparsity=0.5)
    _trainer_run(tiny_bert, tiny_data, tmp_path / "straight", config)
    straight = load_file(str(tmp_path / "straight" / "checkpoint-4" / "hf_sparse_state.safetensors"))
    at_2 = load_file(str(tmp_path / "straight" / "checkpoint-2" / "hf_sparse_state.safetensors"))
    names = [k for k in at_2 if k.startswith("method.scores.")]
    assert names and all(at_2[k].abs().sum() > 0 for k in names)

    # resume a second run from the first one's step-2 checkpoint: the scores must carry on, not restart at zero
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
    _trainer_run(fresh, tiny_data, resumed_dir, config, resume=str(resumed_dir / "checkpoint-2"))
    resumed = load_file(str(resumed_dir / "checkpoint-4" / "hf_sparse_state.safetensors"))
    with safe_open(str(resumed_dir / "checkpoint-4" / "hf_sparse_state.safetensors"), "pt") as f:
        assert '"global_step": 4' in f.metadata()["hf_sparse"]
    for key in names + [k for k in straight if k.startswith("masks.")]:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)
