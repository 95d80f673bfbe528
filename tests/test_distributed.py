"""SyncBatchNorm and SyncSwitchNorm over 2 gloo processes on the CPU equal one process on the full batch.

Starting processes costs seconds, so the module spawns its two workers once (`results`): each runs every
case of CASES on its shard of the batch and saves what it computed; each test then checks one case against
a single process holding the whole batch — outputs, every gradient, running statistics, within 1e-4 in
float32 — and that each pass made exactly one collective. Processes talk over 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normlab
from normlab._layout import is_channels_last
from normlab.distributed import SyncBatchNorm, SyncSwitchNorm

WORLD = 2
TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32
PARAMS = ("weight", "bias", "mean_weight", "var_weight")


@dataclass(frozen=True)
class Case:
    method: str  # "bn" or "sn"
    shape: tuple[int, ...]  # the full batch
    shards: tuple[int, ...]  # samples per rank
    kwargs: dict = field(default_factory=dict)
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    offset: float = 0.0


# name: case — why it exists
CASES = {
    "bn2d_unequal": Case("bn", (4, 3, 3, 2), (3, 1)),  # the common case, unequal shards
    "bn2d_rank0_empty": Case("bn", (4, 3, 3, 2), (0, 4)),  # an empty shard: adds nothing, still joins
    "bn2d_rank1_empty": Case("bn", (3, 3, 2, 2), (3, 0)),
    "bn1d_nc": Case("bn", (5, 4), (2, 3)),  # (N, C): one position per channel
    "bn1d_ncl": Case("bn", (3, 2, 5), (1, 2), {"momentum": 0.3}),
    "bn3d": Case("bn", (3, 2, 2, 3, 2), (2, 1)),
    "bn_channels_last": Case("bn", (5, 3, 3, 2), (3, 2), channels_last=True),  # layout kept
    "bn_momentum_none": Case("bn", (4, 3, 2, 2), (1, 3), {"momentum": None}),  # cumulative average
    "bn_no_affine": Case("bn", (4, 3, 2, 2), (3, 1), {"affine": False}),
    "bn_no_bias": Case("bn", (4, 3, 2, 2), (1, 3), {"bias": False}),  # weight without bias
    "bn_no_running": Case("bn", (4, 3, 2, 2), (2, 2), {"track_running_stats": False}),
    # a large common offset: the combination stays centered (float64 to separate it from input rounding)
    "bn_offset_f64": Case("bn", (5, 3, 2, 2), (4, 1), dtype=torch.float64, offset=1e6),
    "sn2d_unequal": Case("sn", (4, 3, 3, 2), (3, 1)),
    "sn2d_rank0_empty": Case("sn", (3, 3, 2, 2), (0, 3)),
    "sn1d_nc": Case("sn", (5, 4), (3, 2)),  # LN + BN, one position per channel
    "sn2d_authors": Case("sn", (4, 3, 3, 2), (1, 3), {"authors_compat": True}),  # unbiased IN variance
    "sn1d_authors": Case("sn", (5, 4), (2, 3), {"authors_compat": True}),  # unbiased LN/BN variances
    "sn3d": Case("sn", (3, 2, 2, 2, 3), (2, 1)),
    "sn_channels_last": Case("sn", (4, 3, 2, 3), (1, 3), channels_last=True),
    "sn_momentum_none": Case("sn", (4, 3, 2, 2), (3, 1), {"momentum": None, "affine": False}),
}


COMPILED = ["bn_momentum_none", "sn2d_rank0_empty"]  # compiling costs seconds per case


def spatial_dims(case: Case) -> int:
    return len(case.shape) - 2


def make_layers(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(sync layer, local layer) in the same random state: affine parameters, SN logits, running stats."""
    channels, dim = case.shape[1], spatial_dims(case)
    if case.method == "bn":
        sync = SyncBatchNorm(channels, **case.kwargs)
        local = normlab.create_norm("bn", channels, dim=dim, **case.kwargs)
    else:
        sync = SyncSwitchNorm(channels, dim=dim, **case.kwargs)
        local = normlab.create_norm("sn", channels, dim=dim, **case.kwargs)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sync.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0.0))
        if sync.running_mean is not None:
            sync.running_mean.copy_(torch.randn(sync.running_mean.shape, generator=gen))
            sync.running_var.copy_(torch.rand(sync.running_var.shape, generator=gen) + 0.5)
    local.load_state_dict(sync.state_dict())
    return sync.to(case.dtype), local.to(case.dtype)


def batches(case: Case) -> list[torch.Tensor]:
    """x1 (forward + backward), dy1, x2 (a second training step), x3 (eval): full batches."""
    gen = torch.Generator().manual_seed(11)
    out = [torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2 for _ in range(4)]
    out = [t if i == 1 else t + case.offset + 1 for i, t in enumerate(out)]  # out[1] is dy
    out = [t.to(case.dtype) for t in out]
    if case.channels_last:
        fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
        out = [t.contiguous(memory_format=fmt) for t in out]
    return out


def shard(t: torch.Tensor, case: Case, rank: int) -> torch.Tensor:
    start = sum(case.shards[:rank])
    return t[start : start + case.shards[rank]]


def run_layer(layer: torch.nn.Module, x1, dy1, x2, x3) -> dict:
    """Train step with backward, a second train step, an eval step: everything the tests compare.
    ``layer`` may be compiled (torch.compile's wrapper around the module)."""
    module = getattr(layer, "_orig_mod", layer)
    counting = count_collectives if module is layer else contextlib.nullcontext  # compiled: traced once
    layer.train()
    x1 = x1.clone().requires_grad_()
    with counting() as forward:
        y1 = layer(x1)
    with counting() as backward:
        y1.backward(dy1)
    layer(x2)
    layer.eval()
    with counting() as evaluation, torch.no_grad():
        y3 = layer(x3) if module is layer else None  # eval is the local path, compiled in test_compile
    params = dict(module.named_parameters())
    return {
        "y": y1.detach(),
        "dx": x1.grad,
        "y_eval": y3,
        "grads": {name: params[name].grad.clone() for name in PARAMS if name in params},
        "buffers": {name: b.clone() for name, b in module.named_buffers()},
        "collectives": {"forward": forward, "backward": backward, "eval": evaluation},
        "layout": (is_channels_last(x1), is_channels_last(y1)),
    }


class count_collectives:  # noqa: N801 - used as a context manager
    """Counts the collectives torch.distributed makes inside the block: {"all_gather": k, "all_reduce": k}."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce")

    def __enter__(self) -> dict:
        self.counts = {"all_gather": 0, "all_reduce": 0}
        self.saved = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counting(name, fn))
        return self.counts

    def _counting(self, name, fn):
        key = "all_reduce" if name == "all_reduce" else "all_gather"

        def wrapper(*args, **kwargs):
            self.counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------- the workers


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {"cases": {}, "compiled": {}, "errors": {}, "solo": {}}
        for name, case in CASES.items():
            sync, _ = make_layers(case)
            data = batches(case)
            x1, dy1, x2, x3 = (shard(t, case, rank) for t in data)
            results["cases"][name] = run_layer(sync, x1, dy1, x2, x3)

        # torch.compile(fullgraph=True) traces the collectives and the custom Functions whole.
        for name in COMPILED:
            case = CASES[name]
            sync, _ = make_layers(case)
            torch._dynamo.reset()  # a fresh cache per case: the recompile limit counts per code object
            compiled = torch.compile(sync, fullgraph=True, backend="aot_eager")
            x1, dy1, x2, x3 = (shard(t, case, rank) for t in batches(case))
            results["compiled"][name] = run_layer(compiled, x1, dy1, x2, x3)

        # Fallback: a group of one process computes exactly what the local layer computes, with no collective.
        solos = [dist.new_group([r]) for r in range(world)]
        for name in ("bn2d_unequal", "sn2d_unequal"):
            case = CASES[name]
            sync, local = make_layers(case)
            sync.process_group = solos[rank]
            x1, dy1, x2, x3 = (t[rank : rank + 2] for t in batches(case))
            results["solo"][name] = (run_layer(sync, x1, dy1, x2, x3), run_layer(local, x1, dy1, x2, x3))

        # Too few values over the whole group: every process raises the same error (none waits forever).
        for name, (layer, x) in {
            "bn_all_empty": (SyncBatchNorm(3), torch.randn(0, 3, 2, 2)),
            "bn_one_value": (SyncBatchNorm(3), torch.randn(1 - rank, 3)),
            "sn_all_empty": (SyncSwitchNorm(3, dim=1), torch.randn(0, 3)),
        }.items():
            try:
                layer(x)
                results["errors"][name] = None
            except ValueError as err:
                results["errors"][name] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------- the checks


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_full_batch(results, name):
    case = CASES[name]
    _, local = make_layers(case)
    full = run_layer(local, *batches(case))
    tol = TOL if case.dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    per_rank = [r["cases"][name] for r in results]
    for rank, got in enumerate(per_rank):
        for key in ("y", "dx", "y_eval"):
            want = shard(full[key], case, rank)
            if key == "y_eval" and not full["buffers"]:  # no running statistics: eval uses the shard's own
                own = run_layer(make_layers(case)[1], *(shard(t, case, rank) for t in batches(case)))
                want = own["y_eval"]
            torch.testing.assert_close(got[key], want, **tol, msg=f"{key} on rank {rank}")
        for key, want in full["buffers"].items():  # running statistics (and the batch count) on every rank
            torch.testing.assert_close(got["buffers"][key], want, **tol, msg=f"{key} on rank {rank}")
        x_layout, y_layout = got["layout"]
        assert y_layout == x_layout, "the output keeps the input's memory format"
    for key, want in full["grads"].items():  # parameter gradients: each rank's share, summed
        total = sum(got["grads"][key] for got in per_rank)
        torch.testing.assert_close(total, want, **tol, msg=f"d{key}")


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_equals_eager(results, name):
    for rank, r in enumerate(results):
        got, want = r["compiled"][name], r["cases"][name]
        for key in ("y", "dx"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=f"{key} on rank {rank}")
        for group in ("grads", "buffers"):
            assert got[group].keys() == want[group].keys()
            for key in want[group]:
                torch.testing.assert_close(got[group][key], want[group][key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_one_collective_per_pass(results, name):
    for rank, r in enumerate(results):
        counts = r["cases"][name]["collectives"]
        assert counts["forward"] == {"all_gather": 1, "all_reduce": 0}, rank
        assert counts["backward"] == {"all_gather": 0, "all_reduce": 1}, rank
        assert counts["eval"] == {"all_gather": 0, "all_reduce": 0}, rank  # eval: the local path


@pytest.mark.parametrize("name", ["bn2d_unequal", "sn2d_unequal"])
def test_group_of_one_process_is_the_local_path(results, name):
    for r in results:
        got, want = r["solo"][name]
        for key in ("y", "dx", "y_eval"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        for key in want["grads"]:
            torch.testing.assert_close(got["grads"][key], want["grads"][key], rtol=0, atol=0)
        assert all(v == 0 for counts in got["collectives"].values() for v in counts.values())


def test_too_few_values_raise_on_every_rank(results):
    for r in results:
        for name, message in r["errors"].items():
            assert message is not None, name
            assert "more than 1 value per channel over all processes" in message, message


# ---------------------------------------------------------------- without a process group


@pytest.mark.parametrize("method", ["bn", "sn"])
def test_without_torch_distributed_is_the_local_path(method):
    assert not (dist.is_available() and dist.is_initialized())
    case = Case(method, (4, 3, 2, 2), (4,))
    sync, local = make_layers(case)
    got, want = run_layer(sync, *batches(case)), run_layer(local, *batches(case))
    for key in ("y", "dx", "y_eval"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_sync_switch_norm_state_dict_matches_switch_norm():
    for dim, cls in ((1, normlab.SwitchNorm1d), (2, normlab.SwitchNorm2d), (3, normlab.SwitchNorm3d)):
        for compat in (False, True):
            sync, local = SyncSwitchNorm(6, dim=dim, authors_compat=compat), cls(6, authors_compat=compat)
            assert {k: v.shape for k, v in sync.state_dict().items()} == {
                k: v.shape for k, v in local.state_dict().items()
            }
            assert sync.momentum == local.momentum and sync.sources == local.sources
    with pytest.raises(ValueError, match="dim"):
        SyncSwitchNorm(4, dim=4)


def test_layout_and_errors():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="expects 2D or 3D or 4D or 5D"):
        layer(torch.randn(3))
    assert math.isclose(SyncSwitchNorm(3, dim=3, authors_compat=True).momentum, 0.003)


# ---------------------------------------------------------------- the study under torchrun


def test_study_under_torchrun(tmp_path):
    pytest.importorskip("sklearn")  # the digits data set
    from normlab.study.distributed import main

    common = ["--dataset", "digits", "--train-size", "128", "--test-size", "64", "--epochs", "1"]
    out = tmp_path / "torchrun.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "normlab.cli", "study", "--distributed", *common, "--batch-size", "4", "--json", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["bn", "sync_bn", "gn", "sn"]
    for r in rows:
        assert r["world_size"] == WORLD and r["global_batch"] == 4 * WORLD and r["steps"] == 128 // 8
        assert 0 <= r["test_error"] <= 1 and math.isfinite(r["train_loss"])
    assert rows[3]["sn_importance"] is not None
    assert "sync_bn" in done.stdout  # rank 0 printed the table

    # Synchronized BN on 2 ranks x 4 trains exactly like BN in one process x 8 (up to float rounding);
    # per-rank BN does not.
    single = tmp_path / "single.json"
    assert main([*common, "--batch-size", "8", "--methods", "bn", "--json", str(single)]) == 0
    one = json.loads(single.read_text())[0]
    assert one["world_size"] == 1 and one["global_batch"] == 8
    assert rows[1]["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
    assert rows[1]["test_error"] == pytest.approx(one["test_error"], abs=2 / 64)
    assert rows[0]["train_loss"] != pytest.approx(one["train_loss"], rel=1e-3)
