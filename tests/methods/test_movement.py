"""Movement pruning: scores against direct computation, ranking, the soft variant's Adam, checkpoint state."""

from __future__ import annotations

import copy
import logging
import re
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


class Reference:
    """The paper's quantities kept independently of the method: masks M, stored values W, scores S.

    Hard: S -= W * dL/dW' summed over steps, masks the top of S over all weights (groups: sums) to the schedule's
    target. Soft: S learned by torch.optim.Adam from W * dL/dW' + the regulariser's gradient; masks sigmoid(S) > tau
    during the ramp.
    """

    def __init__(self, sp, grads, block=1, lam=0.0, lr=None, tau=0.1):
        self.sp, self.grads, self.block, self.lam, self.tau = sp, grads, block, lam, tau
        weights = {n: m.weight for n, m in sp.targets.items()}
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        self.saved = {n: torch.zeros_like(w.detach()) for n, w in weights.items()}
        self.scores = {n: nn.Parameter(torch.zeros_like(w.detach())) for n, w in weights.items()}
        self.adam = torch.optim.Adam(self.scores.values(), lr=lr) if lr is not None else None
        self.numel = sum(w.numel() for w in weights.values())
        self.regrown = 0
        self.ramp_sparsities = []

    @torch.no_grad()
    def after_backward(self, scale=1.0):
        """`scale`: the factor gradient clipping applied to this step's gradients (the scores' too)."""
        for n, m in self.sp.targets.items():
            stored = torch.where(self.masks[n], m.weight, self.saved[n])
            # dL/dW', masked weights included (the module's .grad has them zeroed), clipped like the weights'
            grad = scale * self.grads[n]
            if self.adam is None:
                self.scores[n] -= stored * grad
            else:
                sig = torch.sigmoid(self.scores[n])
                self.scores[n].grad = stored * grad + self.lam / self.numel * sig * (1 - sig)
        if self.adam is not None:
            self.adam.step()

    def hard_masks(self, sparsity):
        names = list(self.sp.targets)
        groups = [self.scores[n].detach().view(self.scores[n].shape[0], -1, self.block).sum(-1) for n in names]
        flat = torch.cat([g.flatten() for g in groups])
        k = round(round(sparsity * self.numel) / self.block)
        pruned = torch.zeros_like(flat, dtype=torch.bool)
        pruned[torch.argsort(flat, stable=True)[:k]] = True
        out = {}
        for n, p in zip(names, torch.split(pruned, [g.numel() for g in groups])):
            out[n] = (~p).view(groups[names.index(n)].shape).repeat_interleave(self.block, 1)
        return out

    @torch.no_grad()
    def after_step(self, after_opt, expected):
        """Check the method's masks, weights and stored values against the reference after sp.step()."""
        sp = self.sp
        if expected is not None:
            for n in sp.targets:
                assert torch.equal(sp.masks[n], expected[n]), f"{n}: masks differ from the reference at step"
            for n, m in sp.targets.items():
                newly, regrown = self.masks[n] & ~expected[n], ~self.masks[n] & expected[n]
                self.saved[n][newly] = after_opt[n][newly]
                # a regrown weight comes back with exactly the value it had when it was pruned
                assert torch.equal(m.weight[regrown], self.saved[n][regrown])
                self.saved[n][regrown] = 0
                self.regrown += int(regrown.sum())
                self.masks[n] = expected[n].clone()
        for n, m in sp.targets.items():
            masked = ~self.masks[n]
            assert torch.equal(m.weight[masked], torch.zeros_like(m.weight[masked])), f"{n}: masked weight not zero"
            assert torch.equal(sp.method.values[n][masked], self.saved[n][masked]), f"{n}: stored values moved"


def capture_grads(model) -> dict[str, torch.Tensor]:
    """dL/dW' of every Linear weight at each backward, as autograd produces it: hooks registered before
    sparsify_'s run first and see the gradient before the method masks it."""
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.weight.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().clone()))
    return grads


def run_with_reference(model, sp, ref, data, opt, masks_at, max_norm=None):
    """Train, checking everything against `ref`; masks_at(step) gives the reference masks of a pruning step.

    `max_norm`: clip the gradients as the Trainer does (torch's clip_grad_norm_ over all parameters).
    """
    for step, (x, y) in enumerate(data, start=sp.global_step + 1):
        nn.functional.cross_entropy(model(x), y).backward()
        # masked weights do not train (dL/dW = dL/dW' * M), and gradient clipping, which runs here, sees only
        # the kept weights' gradients
        for n, m in sp.targets.items():
            assert not m.weight.grad[~ref.masks[n]].any()
        scale = 1.0
        if max_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            scale = min(1.0, max_norm / (norm + 1e-6))  # torch's clip coefficient
            assert scale < 0.5, "the test means to clip every step"
        ref.after_backward(scale)
        sp.before_optimizer_step()
        opt.step()
        after_opt = {n: m.weight.detach().clone() for n, m in sp.targets.items()}
        pruned = sp.step()
        ref.after_step(after_opt, masks_at(step) if pruned else None)
        opt.zero_grad()


@pytest.mark.parametrize("pattern", ["unstructured", "4-block"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_hard_regrows_masked_weights_with_their_stored_values(pattern, optimizer):
    model = TwoLinear()
    config = movement_config(
        pattern=pattern, schedule="linear", sparsity=0.5, initial_sparsity=0.3, start=2, end=12, update_every=1,
        method_args={"regrow": True},
    )  # fmt: skip
    grads = capture_grads(model)
    sp = sparsify_(model, config)
    assert sp.method.mask_gradients is False and sp._hooks == []
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
    else:  # weight decay and momentum both move masked weights unless the engine re-zeroes them
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ref = Reference(sp, grads, block=4 if pattern == "4-block" else 1)

    def masks_at(step):
        return ref.hard_masks(0.3 + 0.2 * (step - 2) / 10)

    run_with_reference(model, sp, ref, batches(16, seed=7), opt, masks_at)
    for n in sp.targets:  # every weight's score, masked ones included, is the accumulated -W * dL/dW'
        torch.testing.assert_close(sp.method.scores_[n], ref.scores[n].detach(), rtol=1e-5, atol=1e-7)
    assert ref.regrown > 0, "no masked weight came back: the test does not exercise regrowth"
    assert sp.sparsity()["global"] == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_scores_move_with_the_clipped_gradient(variant):
    # The loop clips between backward (where the hooks read dL/dW') and the optimizer step. The scores must move
    # with the gradient the optimizer applies, scaled by the same clip coefficient, masked weights included: with
    # unclipped scores, the few steps whose gradient norm spikes after a cut outweigh all the others, and every
    # SST-2 run of this method collapsed to a constant-output model.
    model = TwoLinear()
    if variant == "hard":
        args, lr, final = {"regrow": True}, None, 0.5
        schedule = {"schedule": "linear", "initial_sparsity": 0.3, "start": 2, "end": 10, "update_every": 1}
    else:  # lambda = 0 keeps the ramp under the final sparsity, where its masks are exactly sigmoid(S) > tau
        args, lr, final = {"variant": "soft", "score_lr": 0.6, "regularization": 0.0, "regrow": True}, 0.6, 0.6
        schedule = {"schedule": "cubic", "start": 3, "end": 9, "update_every": 2}
    grads = capture_grads(model)
    sp = sparsify_(model, movement_config(sparsity=final, method_args=args, **schedule))
    ref = Reference(sp, grads, lr=lr)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)

    def masks_at(step):
        if variant == "soft":  # the ramp keeps sigmoid(S) > tau, the last step the exact target
            return {n: torch.sigmoid(s.detach()) > ref.tau for n, s in ref.scores.items()} if step < 9 else None
        return ref.hard_masks(0.3 + 0.2 * (step - 2) / 8)

    def masks_or_final(step):
        return masks_at(step) or ref.hard_masks(final)

    run_with_reference(model, sp, ref, batches(12, seed=7), opt, masks_or_final, max_norm=0.05)
    for n in sp.targets:
        torch.testing.assert_close(sp.method.scores_[n], ref.scores[n].detach(), rtol=1e-4, atol=1e-7)
    assert ref.regrown > 0, "no masked weight came back: the test does not exercise regrowth"


def test_scores_under_the_trainer_follow_its_clipped_gradients(tiny_bert, tiny_data, tmp_path):
    # The Trainer clips before on_pre_optimizer_step: the scores must be -sum W * .grad as the optimizer sees it
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_sparse import SparseCallback

    expected, scores = {}, {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for n, m in model.named_modules():
                if isinstance(m, nn.Linear):
                    expected[n] = expected.get(n, 0) - m.weight.detach() * m.weight.grad

        def on_step_end(self, args, state, control, **kwargs):  # the scores are gone after training
            scores.update({n: s.clone() for n, s in callback.sparsifier.method.scores_.items()})

    callback = SparseCallback(movement_config(start=8))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0, dataloader_num_workers=0,
        max_grad_norm=1e-3,
    )  # fmt: skip
    Trainer(model=tiny_bert, args=args, train_dataset=tiny_data, callbacks=[callback, Record()]).train()
    assert scores and set(scores) <= set(expected)
    for n, s in scores.items():
        torch.testing.assert_close(s, expected[n], rtol=1e-4, atol=1e-4 * float(expected[n].abs().max()))


def test_soft_ramp_masks_are_the_threshold_and_the_last_step_hits_the_target(caplog):
    ramps = {}
    for lam in (0.0, 0.5):
        model = TwoLinear()
        lr, tau = 0.6, 0.1
        config = movement_config(
            schedule="cubic", sparsity=0.6, start=3, end=9, update_every=2,
            method_args={"variant": "soft", "score_lr": lr, "regularization": lam, "threshold": tau, "regrow": True},
        )  # fmt: skip
        grads = capture_grads(model)
        sp = sparsify_(model, config)
        ref = Reference(sp, grads, lam=lam, lr=lr, tau=tau)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)

        def masks_at(step, sp=sp, ref=ref, tau=tau):
            if step < 9:  # the ramp: sigmoid(S) > tau, whatever the schedule says
                masks = {n: torch.sigmoid(s.detach()) > tau for n, s in ref.scores.items()}
                ref.ramp_sparsities.append(sum(int((~k).sum()) for k in masks.values()) / ref.numel)
                return masks
            # the last step: the exact target, from the method's scores (the reference's agree to rounding)
            for n in sp.targets:
                torch.testing.assert_close(sp.method.scores_[n], ref.scores[n].detach(), rtol=1e-5, atol=1e-6)
            return ref.hard_masks(0.6)

        with caplog.at_level(logging.INFO, logger="hf_sparse.methods.movement.method"):
            run_with_reference(model, sp, ref, batches(10, seed=3), opt, masks_at)
        assert sp.sparsity()["global"] == round(0.6 * ref.numel) / ref.numel
        ramps[lam] = ref.ramp_sparsities
    # the schedule asks 0.425 and 0.575 at steps 5 and 7; the threshold gives what the scores (and lambda) give
    for lam, ramp in ramps.items():
        assert all(0 < r < 0.6 and r != target for r, target in zip(ramp[1:], (51 / 120, 69 / 120))), (lam, ramp)
    assert all(a < b for a, b in zip(ramps[0.0][1:], ramps[0.5][1:])), ramps
    assert re.search(r"sigmoid\(S\) <= 0.1 for 0\.\d+ of the weights \(regularization=0.5\); pruning", caplog.text)


def test_soft_ramp_never_prunes_past_the_final_sparsity():
    model = TwoLinear()
    config = movement_config(
        schedule="cubic", sparsity=0.6, start=3, end=9, update_every=2,
        method_args={"variant": "soft", "score_lr": 0.6, "regularization": 5.0},
    )  # fmt: skip
    sp = sparsify_(model, config)
    train(model, sp, batches(5, seed=3), lr=0.05)
    below = sum(int((torch.sigmoid(s) <= 0.1).sum()) for s in sp.method.scores_.values())
    assert below > 72, "the regulariser should have pushed more than the final 60% below the threshold"
    assert sp.sparsity()["global"] == 72 / 120 and sp.pools[0].target == 72


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


def test_hard_scores_with_adam_follow_adam_on_the_straight_through_gradient_and_masks_keep_the_top():
    """score_update='adam' (the paper's code): an Adam step on W * dL/dW' per optimizer step, against
    torch.optim.Adam on a parameter holding the scores; the one-shot step keeps the top half of them."""
    model = TwoLinear()
    lr = 0.05
    sp = sparsify_(model, movement_config(start=5, method_args={"score_update": "adam", "score_lr": lr}))
    ref = {n: nn.Parameter(torch.zeros_like(m.weight)) for n, m in sp.targets.items()}
    opt = torch.optim.Adam(ref.values(), lr=lr)

    def reference_step():
        for n, m in sp.targets.items():
            ref[n].grad = m.weight.detach() * m.weight.grad
        opt.step()

    train(model, sp, batches(5), on_step=reference_step)  # the one-shot pruning at step 5 ranks these scores
    for n in ref:
        torch.testing.assert_close(sp.method.scores_[n], ref[n].detach(), rtol=1e-5, atol=1e-7)
    # the masks: the top 50% of all scores (one global ranking), ties aside
    flat = torch.cat([ref[n].detach().flatten() for n in ref])
    cut = flat.kthvalue(flat.numel() - flat.numel() // 2).values
    assert int(sum(m.sum() for m in sp.masks.values())) == flat.numel() - flat.numel() // 2
    for n in ref:
        clear = (ref[n].detach() - cut).abs() > 1e-6
        assert torch.equal(sp.masks[n][clear], (ref[n].detach() > cut)[clear]), n
    assert set(sp.method.state_dict()) >= {f"exp_avg.{n}" for n in ref} | {f"exp_avg_sq.{n}" for n in ref}


def test_state_round_trip_through_the_sparsifier_file(tmp_path):
    for variant, update in (("hard", "sum"), ("hard", "adam"), ("soft", "adam")):
        model = TwoLinear()
        args = {"variant": variant, "threshold": 0.6, "score_update": update}
        config = movement_config(schedule="linear", initial_sparsity=0.3, start=2, end=8, method_args=args)
        sp = sparsify_(model, config)
        train(model, sp, batches(3))
        path = sp.save(tmp_path / f"{variant}-{update}.safetensors")
        saved = load_file(str(path))
        for n in sp.targets:
            torch.testing.assert_close(saved[f"method.scores.{n}"], sp.method.scores_[n])
            # the stored values of masked weights: non-zero where masked, zero where kept
            values = saved[f"method.values.{n}"]
            assert torch.equal(values, sp.method.values[n]) and values[~sp.masks[n]].ne(0).all()
            assert not values[sp.masks[n]].any()
        sp.remove()

        fresh = TwoLinear()
        sp2 = sparsify_(fresh, config)
        sp2.load(path)
        assert sp2.method.steps == 3
        for n in sp.targets:
            torch.testing.assert_close(sp2.method.scores_[n], saved[f"method.scores.{n}"])
            assert torch.equal(sp2.method.values[n], saved[f"method.values.{n}"])
            assert torch.equal(sp2.masks[n], sp.masks[n])
            if update == "adam":
                torch.testing.assert_close(sp2.method.exp_avg[n], saved[f"method.exp_avg.{n}"])
                torch.testing.assert_close(sp2.method.exp_avg_sq[n], saved[f"method.exp_avg_sq.{n}"])
                assert sp2.method.exp_avg_sq[n].abs().sum() > 0  # three steps of moments, not zeros


def test_state_from_another_variant_or_shape_is_refused():
    model = TwoLinear()
    sp = sparsify_(model, movement_config(start=8, method_args={"variant": "soft"}))
    state = sp.method.state_dict()
    hard = sparsify_(TwoLinear(), movement_config(start=8))
    with pytest.raises(KeyError, match=r"state \(hard, score_update='sum'\) does not match.*unexpected \['exp_avg"):
        hard.method.load_state_dict(state)
    bad = {k: (v[:1] if k == "scores.layers.0" else v) for k, v in hard.method.state_dict().items()}
    with pytest.raises(ValueError, match=r"'scores.layers.0' has shape \(1, 12\).*weight shape \(8, 12\)"):
        hard.method.load_state_dict(bad)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"cannot prune at step 0 \(start=0\).*start=0.1"):
        sparsify_(TwoLinear(), movement_config(start=0))
    with pytest.raises(ValueError, match=r"method_args.variant must be one of \('hard', 'soft'\)"):
        movement_config(method_args={"variant": "medium"})
    with pytest.raises(ValueError, match=r"method_args.score_update must be one of \('adam', 'sum'\)"):
        movement_config(method_args={"score_update": "sgd"})
    with pytest.raises(ValueError, match=r"score_update='sum' does not work with variant='soft'.*leave score_update"):
        movement_config(method_args={"variant": "soft", "score_update": "sum"})
    with pytest.raises(ValueError, match=r"method_args.score_lr must be a number > 0"):
        movement_config(method_args={"score_lr": 0})
    with pytest.raises(ValueError, match=r"method_args.threshold must be in \(0, 1\).*0.1"):
        movement_config(method_args={"variant": "soft", "threshold": 1.0})
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


def test_gradient_accumulation_sums_the_movement_and_remove_leaves_no_hook():
    # two half batches then one step move the scores as one full batch does
    full, halves = TwoLinear(), TwoLinear()
    sps = [sparsify_(m, movement_config(start=5)) for m in (full, halves)]
    x, y = batches(1)[0]
    nn.functional.cross_entropy(full(x), y).backward()
    for part in (slice(0, 8), slice(8, 16)):
        (nn.functional.cross_entropy(halves(x[part]), y[part]) / 2).backward()
    for sp in sps:
        sp.before_optimizer_step()
    for n in sps[0].targets:
        torch.testing.assert_close(sps[0].method.scores_[n], sps[1].method.scores_[n], rtol=1e-5, atol=1e-8)
    for model, sp in zip((full, halves), sps):
        sp.remove()
        assert all(not p._backward_hooks for p in model.parameters())


@pytest.mark.parametrize("pattern", ["unstructured", "4-block"])
def test_without_regrow_masked_weights_stay_masked_and_the_rest_rank_by_score(pattern):
    # the default: a masked weight never comes back, whatever its score; the kept ones still rank by their scores
    model = TwoLinear()
    config = movement_config(
        pattern=pattern, schedule="linear", sparsity=0.6, initial_sparsity=0.2, start=2, end=10, update_every=1
    )
    sp = sparsify_(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    block = 4 if pattern == "4-block" else 1
    for step, (x, y) in enumerate(batches(12, seed=4), start=1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        nn.functional.cross_entropy(model(x), y).backward()
        sp.before_optimizer_step()
        opt.step()
        scores = {n: s.clone() for n, s in sp.method.scores_.items()}
        if sp.step():
            names = list(sp.targets)
            groups = [scores[n].view(scores[n].shape[0], -1, block).sum(-1) for n in names]
            kept_before = [before[n].view(before[n].shape[0], -1, block).any(-1) for n in names]
            flat = torch.cat([g.masked_fill(~k, float("-inf")).flatten() for g, k in zip(groups, kept_before)])
            k = round(round(sp.sparsity()["global"] * sum(g.numel() for g in groups) * block) / block)
            pruned = torch.zeros_like(flat, dtype=torch.bool)
            pruned[torch.argsort(flat, stable=True)[:k]] = True
            got = torch.cat([(~sp.masks[n]).view(sp.masks[n].shape[0], -1, block).all(-1).flatten() for n in names])
            assert torch.equal(got, pruned), step
        for n in sp.targets:
            assert not (sp.masks[n] & ~before[n]).any(), f"{n}: a masked weight came back at step {step}"
        opt.zero_grad()
    assert sp.sparsity()["global"] == pytest.approx(0.6, abs=1e-9)
