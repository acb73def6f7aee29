"""initdoctor.watch: sampling, warnings, TensorBoard output read back, training untouched, DDP."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
from torch import nn

import initdoctor
from initdoctor.watcher import InitDoctorWarning

EA = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


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


def _scalars(log_dir: str):
    acc = EA.EventAccumulator(log_dir, size_guidance={EA.SCALARS: 0, EA.IMAGES: 0, EA.TENSORS: 0,
                                                      EA.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_every_series(tmp_path):
    model = tanh_mlp(3)
    with initdoctor.watch(model, log_dir=str(tmp_path), every=2, images_every=1) as doctor:
        train(model, 6, doctor)
    acc = _scalars(str(tmp_path))
    tags = acc.Tags()
    weight_layers = ["0", "2", "4", "6"]
    for name in weight_layers:
        for metric in ("signal", "gradient"):
            events = acc.Scalars(f"initdoctor/{metric}/{name}")
            assert [e.step for e in events] == [0, 2, 4]
            assert all(e.value > 0 for e in events)
    for act in ("1", "3", "5"):
        assert [e.step for e in acc.Scalars(f"initdoctor/saturation/{act}")] == [0, 2, 4]
    # the scalar equals what the watcher measured
    first = doctor.history[0]["layers"]["2"]["signal"]
    assert acc.Scalars("initdoctor/signal/2")[0].value == pytest.approx(first, rel=1e-6)
    assert "initdoctor/depth_profile" in tags["images"]
    assert "initdoctor/history" in tags["images"]
    assert any(t.startswith("initdoctor/weights/") for t in tags["histograms"])
    assert any(t.startswith("initdoctor/activations/") for t in tags["histograms"])
    text = [t for t in tags["tensors"] if t.startswith("initdoctor/findings")]
    assert text
    layout = [t for t in tags["tensors"] if "custom_scalars" in t]
    assert layout


def test_custom_scalar_layout_has_one_chart_per_metric(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    model = tanh_mlp(2)
    with initdoctor.watch(model, log_dir=str(tmp_path), every=1, images_every=100) as doctor:
        train(model, 1, doctor)
    acc = _scalars(str(tmp_path))
    tensor = acc.Tensors("custom_scalars__config__")[0]
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["gradient G = mean((dL/dy)^2)"] == ["initdoctor/gradient/.*"]
    assert any(tags == ["initdoctor/dead/.*"] for tags in charts.values())


def test_check_tensorboard_writes_before_and_after(tmp_path):
    from initdoctor.cli import main

    model_file = tmp_path / "m.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n"
        "    torch.manual_seed(0)\n"
        "    layers = []\n"
        "    for _ in range(6):\n"
        "        lin = nn.Linear(32, 32); nn.init.normal_(lin.weight, 0, 1.0); layers += [lin, nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.Linear(32, 2))\n"
        "def example_input():\n    return torch.randn(64, 32)\n")
    tb = tmp_path / "tb"
    assert main(["check", str(model_file), "--fix", "--tensorboard", str(tb), "--fail-on", "never",
                 "--format", "json", "--output", str(tmp_path / "r.json")]) == 0
    acc = _scalars(str(tb))
    events = acc.Scalars("initdoctor/scale/0")
    assert [e.step for e in events] == [0, 1]
    # N(0, 1) weights blow the scale up; the cure brings it down
    assert events[0].value > 10 * events[1].value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, fsdp: bool = False) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            model = tanh_mlp(3)
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m)
            fully_shard(model)
        else:
            model = DDP(tanh_mlp(3))
        x = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
        eps = torch.randn(32, 4, generator=torch.Generator().manual_seed(6))
        part = slice(rank * 16, (rank + 1) * 16)
        with initdoctor.watch(model, every=1, warn=False) as doctor:
            (model(x[part]) * eps[part]).sum().backward()
            diag = doctor.step()
        if rank == 0:
            torch.save({lay.name: (lay.signal, lay.q, lay.grad_q, lay.weight_std, lay.weight_grad_rms)
                        for lay in diag.stats.ran()}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_whole_batch(tmp_path, fsdp):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), fsdp), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model = tanh_mlp(3)
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(32, 4, generator=torch.Generator().manual_seed(6))
    with initdoctor.watch(model, every=1, warn=False) as doctor:
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
