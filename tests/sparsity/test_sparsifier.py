import pytest
import torch

from hf_sparse import SparseConfig, sparsify_
from hf_sparse.sparsity.schedules import Timeline
from hf_sparse.sparsity.targets import layer_stack_linears
from tests.conftest import TinyClassificationData, make_tiny_bert


def cubic(step, start, end, s_i, s_f):
    x = min(1.0, max(0.0, (step - start) / (end - start)))
    return s_f + (s_i - s_f) * (1 - x) ** 3


def train(model, sparsifier, steps, *, accumulation=1, lr=1e-3, weight_decay=0.1, clip=1.0, check=None):
    """A plain PyTorch loop: AdamW (momentum + decoupled weight decay), accumulation, clipping."""
    data = TinyClassificationData(n=16 * steps * accumulation)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    it = iter(loader)
    for step in range(1, steps + 1):
        for _ in range(accumulation):
            loss = model(**next(it)).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        sparsifier.before_optimizer_step()
        opt.step()
        sparsifier.step()
        opt.zero_grad()
        if check is not None:
            check(step)
    return opt


def test_default_targets_are_the_layer_stack_linears(tiny_bert):
    sp = sparsify_(tiny_bert, SparseConfig(sparsity=0.5, schedule="one-shot"))
    names = list(sp.targets)
    assert names == layer_stack_linears(tiny_bert)
    assert len(names) == 2 * 6
    assert not any(("pooler" in n or "classifier" in n or "embeddings" in n) for n in names)


@pytest.mark.parametrize("pattern, block", [("unstructured", 1), ("4-block", 4)])
def test_uniform_schedule_follows_closed_form_in_every_module(pattern, block):
    model = make_tiny_bert()
    cfg = SparseConfig(
        sparsity=0.9,
        pattern=pattern,
        distribution="uniform",
        schedule="cubic",
        initial_sparsity=0.3,
        start=2,
        end=12,
        update_every=3,
    )
    sp = sparsify_(model, cfg, total_steps=16)
    tl = Timeline(2, 12, 3)

    def check(step):
        last = tl.last_update_at_or_before(step)
        expected = 0.0 if last is None else cubic(last, 2, 12, 0.3, 0.9)
        for name, module in sp.targets.items():
            zeros = int((module.weight == 0).sum())
            rows = module.weight.shape[0]
            # within one block of the closed form, measured on the weights themselves
            assert abs(zeros - expected * module.weight.numel()) <= block, (step, name, zeros)
            assert rows > 0

    train(model, sp, 16, check=check)
    for _name, module in sp.targets.items():
        assert abs(float((module.weight == 0).float().mean()) - 0.9) <= block / module.weight.numel()


def test_global_distribution_hits_the_overall_target_exactly():
    model = make_tiny_bert()
    sp = sparsify_(model, SparseConfig(sparsity=0.8, schedule="one-shot", distribution="global"))
    total = sum(m.weight.numel() for m in sp.targets.values())
    zeros = sum(int((m.weight == 0).sum()) for m in sp.targets.values())
    assert zeros == round(0.8 * total)
    per_module = [float((m.weight == 0).float().mean()) for m in sp.targets.values()]
    assert max(per_module) - min(per_module) > 0.01, "global ranking gives modules different sparsities"
    # global magnitude = the smallest |w| over all targeted weights together
    everything = torch.cat([m.weight.detach().abs().flatten() for m in sp.targets.values()])
    assert (everything == 0).sum() == zeros


def test_global_magnitude_selection_equals_reference():
    model = make_tiny_bert()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sp = sparsify_(model, SparseConfig(sparsity=0.6, schedule="one-shot"))
    flat = torch.cat([before[n].abs().flatten() for n in sp.targets])
    k = round(0.6 * flat.numel())
    threshold = flat.sort().values[k - 1]
    for name, module in sp.targets.items():
        expected = before[name].abs() > threshold
        assert torch.equal(module.weight != 0, expected), name


def test_sparsity_overrides_and_excludes():
    model = make_tiny_bert()
    cfg = SparseConfig(
        sparsity=0.9,
        schedule="one-shot",
        exclude=["attention.output.dense"],
        sparsity_overrides={"intermediate.dense": 0.5},
    )
    sp = sparsify_(model, cfg)
    assert not any(n.endswith("attention.output.dense") for n in sp.targets)
    for name, module in sp.targets.items():
        if name.endswith("intermediate.dense"):
            assert float((module.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    rest = [m for n, m in sp.targets.items() if not n.endswith("intermediate.dense")]
    zeros = sum(int((m.weight == 0).sum()) for m in rest)
    assert zeros == round(0.9 * sum(m.weight.numel() for m in rest))


@pytest.mark.parametrize("pattern", ["4-block", "2:4"])
def test_patterns_hold_exactly_after_training_and_untargeted_modules_are_untouched(pattern):
    model = make_tiny_bert()
    sparsity = 0.5 if pattern == "2:4" else 0.75
    cfg = SparseConfig(sparsity=sparsity, pattern=pattern, schedule="cubic", start=0, end=6, update_every=2)
    sp = sparsify_(model, cfg, total_steps=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if not any(n.startswith(t + ".") for t in sp.targets):
            p.requires_grad_(False)
    train(model, sp, 8)
    for name, module in sp.targets.items():
        keep = module.weight != 0
        assert sp.pattern.follows(keep, final=True), name
        assert torch.equal(keep, sp.masks[name])
    for n, p in model.named_parameters():
        if not any(n.startswith(t + ".") for t in sp.targets):
            assert torch.equal(p, frozen[n]), f"{n} changed"


@pytest.mark.parametrize("accumulation", [1, 3])
def test_pruned_weights_stay_exactly_zero_through_adamw(accumulation):
    model = make_tiny_bert()
    sp = sparsify_(model, SparseConfig(sparsity=0.7, schedule="one-shot", start=0))
    masks = {n: m.clone() for n, m in sp.masks.items()}

    def check(step):
        for name, module in sp.targets.items():
            w = module.weight
            assert torch.equal(w[~masks[name]], torch.zeros_like(w[~masks[name]])), (step, name)
            assert not torch.signbit(w[~masks[name]]).any(), "exact +0.0"

    # large lr and weight decay: AdamW's momentum would move pruned weights if they were not re-zeroed
    opt = train(model, sp, 6, accumulation=accumulation, lr=0.05, weight_decay=0.5, check=check)
    # gradients of pruned weights were masked, so Adam never accumulated momentum for them
    for name, module in sp.targets.items():
        state = opt.state[module.weight]
        assert torch.equal(state["exp_avg"][~masks[name]], torch.zeros(int((~masks[name]).sum())))


def test_state_round_trip(tmp_path):
    model = make_tiny_bert()
    sp = sparsify_(model, SparseConfig(sparsity=0.5, pattern="4-block", start=0, end=4), total_steps=4)
    for _ in range(3):
        sp.step()
    path = sp.save(tmp_path)
    other = make_tiny_bert(seed=1)
    sp2 = sparsify_(other, SparseConfig(sparsity=0.5, pattern="4-block", start=0, end=4), total_steps=4)
    sp2.load(path)
    assert sp2.global_step == 3 and sp2.last_prune_step == 3
    for name in sp.masks:
        assert torch.equal(sp.masks[name], sp2.masks[name])
        assert not other.get_submodule(name).weight[~sp.masks[name]].any()


def test_load_rejects_corrupt_state(tmp_path):
    sp = sparsify_(make_tiny_bert(), SparseConfig(sparsity=0.5, schedule="one-shot"))
    path = tmp_path / "state.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="state.safetensors"):
        sp.load(path)


def test_remove_leaves_a_plain_model():
    model = make_tiny_bert()
    keys = set(model.state_dict())
    sp = sparsify_(model, SparseConfig(sparsity=0.5, schedule="one-shot"))
    sp.remove()
    assert set(model.state_dict()) == keys
    assert all(not p._backward_hooks for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks
    sparsify_(model, SparseConfig(sparsity=0.6, schedule="one-shot")).remove()  # can attach again


def test_second_sparsifier_on_same_model_is_refused():
    model = make_tiny_bert()
    sparsify_(model, SparseConfig(sparsity=0.5, schedule="one-shot"))
    with pytest.raises(ValueError, match="already has an active Sparsifier"):
        sparsify_(model, SparseConfig(sparsity=0.5, schedule="one-shot"))


def test_constant_schedule_keeps_existing_zeros():
    model = make_tiny_bert()
    sparsify_(model, SparseConfig(sparsity=0.8, pattern="4-block", schedule="one-shot")).remove()
    zeros_before = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sp = sparsify_(model, SparseConfig(schedule="constant", pattern="4-block"))
    train(model, sp, 3, lr=0.05)
    for name, module in sp.targets.items():
        assert torch.equal(module.weight == 0, zeros_before[name])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"targets": ["no_such_layer"]}, "targets entry 'no_such_layer'"),
        ({"exclude": ["nothing.here"]}, "exclude entry 'nothing.here'"),
        ({"sparsity_overrides": {"zzz": 0.5}}, "sparsity_overrides entry 'zzz'"),
    ],
)
def test_entries_matching_nothing_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sparsify_(make_tiny_bert(), SparseConfig(schedule="one-shot", **kwargs))


def test_fraction_schedule_without_total_steps_is_explained():
    with pytest.raises(ValueError, match="total_steps"):
        sparsify_(make_tiny_bert(), SparseConfig(start=0.1, end=0.5))
