"""initdoctor.watch: sampling, warnings, training untouched, DDP (TensorBoard output: test_tensorboard.py)."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.watcher import InitDoctorWarning


def tanh_mlp(depth: int = 5, width: int = 32, std: float | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if std is not None:
            nn.init.normal_(lin.weight, 0.0, std)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


def train(model: nn.Module, steps: int, doctor=None, lr: float = 0.1, dropout_seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(dropout_seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if doctor is not None:
            doctor.step()
    return [p.detach().clone() for p in model.parameters()]


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_training_is_bit_identical_with_and_without_watch(tmp_path):
    with_dropout = lambda: nn.Sequential(tanh_mlp(3), nn.Dropout(0.3))  # noqa: E731 - RNG-driven
    bare = train(with_dropout(), 12)
    model = with_dropout()
    with initdoctor.watch(model, log_dir=str(tmp_path), every=3, images_every=2) as doctor:
        watched = train(model, 12, doctor)
    assert all(torch.equal(a, b) for a, b in zip(bare, watched))
    assert doctor.sampled == 4 and [h["step"] for h in doctor.history] == [0, 3, 6, 9]
    assert all_hooks(model) == 0
    assert not torch._C._is_torch_function_mode_enabled()


def test_a_replaced_layer_is_measured_at_the_next_sample():
    """The watch reads its model's structure once, and again when a module or parameter is replaced."""
    model = tanh_mlp(2)
    with initdoctor.watch(model, every=1, warn=False) as doctor:
        train(model, 1, doctor)
        first = doctor.structure_reads
        train(model, 2, doctor)
        assert doctor.structure_reads == first  # the same modules: read once
        old = model[2]
        model[2] = nn.Linear(32, 32)
        with torch.no_grad():
            model[2].weight.normal_(0.0, 3.0)
        train(model, 1, doctor)
        assert doctor.structure_reads == first + 1
        assert all_hooks(old) == 0 and all_hooks(model[2]) > 0  # hooks kept between samples moved over
        model[0].weight = nn.Parameter(torch.zeros(32, 32))  # a parameter replaced, modules the same
        train(model, 1, doctor)
        assert doctor.structure_reads == first + 2
    layer_std = {lay.name: lay.weight_std for lay in doctor.last.stats.layers}
    # the new parameter is the one measured: zeros after one SGD step, against ~0.10 for the old one
    assert layer_std["0"] < 0.03
    assert 2.5 < layer_std["2"] < 3.5


def test_consecutive_samples_keep_their_hooks_and_equal_samples_taken_afresh():
    """At every=1 the hooks stay on from one sampled step to the next (each pass is handed off to be
    built); the samples equal those of a watch that puts its hooks on anew for each (every=2, the
    same training run), and nothing is left on the model at the end."""
    runs = {}
    for every in (1, 2):
        model = tanh_mlp(3)
        hooks = []
        with initdoctor.watch(model, every=every, warn=False) as doctor:
            recorders = []
            for _ in range(6):
                train(model, 1, doctor, dropout_seed=len(hooks))
                hooks.append(all_hooks(model))
                recorders.append(doctor._rec)
        assert all_hooks(model) == 0
        runs[every] = (doctor.history, hooks, recorders)
    (h1, hooks1, recs1), (h2, hooks2, _) = runs[1], runs[2]
    assert all(r is recs1[0] for r in recs1) and min(hooks1) > 0  # one recorder, never off between steps
    assert hooks2[0::2] == [0, 0, 0] and min(hooks2[1::2]) > 0  # every other step unhooked
    assert [h["step"] for h in h1] == [0, 1, 2, 3, 4, 5] and [h["step"] for h in h2] == [0, 2, 4]
    assert [h for h in h1 if h["step"] % 2 == 0] == h2


def test_hooks_only_on_sampled_steps_and_removed_on_error():
    model = tanh_mlp(2)
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with initdoctor.watch(model, every=4) as doctor:
            for _ in range(6):
                seen.append(doctor.sampling)
                train(model, 1)
                doctor.step()
            raise RuntimeError("boom")
    assert seen == [True, False, False, False, True, False]
    assert all_hooks(model) == 0


def test_user_hooks_still_fire():
    model = tanh_mlp(2)
    calls = []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    with initdoctor.watch(model, every=1) as doctor:
        train(model, 2, doctor)
    train(model, 1)
    handle.remove()
    assert len(calls) == 3


def test_finding_that_appears_warns_exactly_once():
    # A healthy start; then the weights are blown up mid-run so saturation appears and stays.
    model = tanh_mlp(4, std=0.15)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with initdoctor.watch(model, every=2) as doctor:
            train(model, 4, doctor, lr=0.0)
            assert not [w for w in caught if issubclass(w.category, InitDoctorWarning)]
            with torch.no_grad():
                for m in model:
                    if isinstance(m, nn.Linear):
                        m.weight.mul_(20)
            train(model, 8, doctor, lr=0.0)
    ours = [str(w.message) for w in caught if issubclass(w.category, InitDoctorWarning)]
    sat = [m for m in ours if "ID301" in m]
    assert len(sat) == 1, ours
    assert "step 4" in sat[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, fsdp: bool = False, wait: bool = True) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # a CPU mesh named outright: by default FSDP2 picks CUDA wherever it is present
            mesh = init_device_mesh("cpu", (world,))
            model = tanh_mlp(3)
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            model = DDP(tanh_mlp(3))
        x = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
        eps = torch.randn(32, 4, generator=torch.Generator().manual_seed(6))
        part = slice(rank * 16, (rank + 1) * 16)
        with initdoctor.watch(model, every=1, warn=False) as doctor:
            (model(x[part]) * eps[part]).sum().backward()
            diag = doctor.step(wait=wait)
            if not wait:  # built on the worker thread; the collective ran in step() all the same
                (model(x[part]) * eps[part]).sum().backward()
                doctor.step(wait=False)
                doctor.wait()
                assert [h["step"] for h in doctor.history] == [0, 1]
                diag = doctor.last
        if rank == 0:
            torch.save({lay.name: (lay.signal, lay.q, lay.grad_q, lay.weight_std, lay.weight_grad_rms)
                        for lay in diag.stats.ran()}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp, wait", [(False, True), (True, True), (False, False)],
                         ids=["ddp", "fsdp2", "ddp-background"])
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path, fsdp, wait):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), fsdp, wait), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model = tanh_mlp(3)
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(32, 4, generator=torch.Generator().manual_seed(6))
    with initdoctor.watch(model, every=1, warn=False) as doctor:
        for _ in range(1 if wait else 2):  # the same gradients accumulated, as on the ranks
            (model(x) * eps).sum().backward()
            diag = doctor.step()
    want = {lay.name: (lay.signal, lay.q, lay.grad_q, lay.weight_std, lay.weight_grad_rms)
            for lay in diag.stats.ran()}
    assert {k.removeprefix("module.") for k in got} == set(want)
    for name, values in got.items():
        signal, q, grad_q, wstd, wgrad = values
        ref = want[name.removeprefix("module.")]
        assert (signal, q, grad_q, wstd) == pytest.approx(ref[:4], rel=1e-5)
        # each rank's gradient comes from its half of a summed loss; DDP/FSDP average them
        assert wgrad == pytest.approx(ref[4] / 2, rel=1e-5)
