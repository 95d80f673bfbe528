"""The batch-size study across processes: per-rank BN, synchronized BN, GN and SN at a fixed per-rank batch.

    torchrun --nproc_per_node 2 -m normlab.study.distributed --dataset digits --batch-size 4 --epochs 5

Data-parallel training as on several GPUs: every step takes a global batch of B·P samples (B per rank, P
processes), each rank computes its shard of B, and the gradients are averaged across ranks (one packed
all-reduce per step), so every rank holds the same weights. What differs between methods is only which
samples a normalization's statistics see:

    bn       BN per rank: statistics over the rank's B samples (what DDP with BatchNorm gives)
    sync_bn  BN synchronized across ranks: over all B·P samples (`normlab.convert_sync_batchnorm`)
    gn       GroupNorm: per sample, whatever the batch
    sn       Switchable Norm per rank (its BN source over the rank's B samples)
    sync_sn  Switchable Norm with a synchronized BN source (not in the default list)

so sync_bn at B per rank computes what bn computes in one process at B·P. The protocol is the study's
(`normlab.study.train`): the same initial weights and data order for a seed, whatever the method; the
learning rate scaled with the global batch, ``lr = base_lr · B·P / 32``, SGD with momentum 0.9 and a cosine
decay; the last incomplete global batch dropped. Test error in eval mode with rank 0's running statistics
(DDP broadcasts rank 0's buffers), the test set split across ranks; training error and loss over the last
epoch's batches, summed over ranks. Without torchrun (no RANK/WORLD_SIZE in the environment) it runs as one
process. gloo on the CPU, NCCL on GPUs; rank 0 prints the table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from normlab.convert import convert, convert_sync_batchnorm
from normlab.study.data import DATASETS, StudyData, load_dataset
from normlab.study.model import StudyNet, sn_importance
from normlab.study.train import REFERENCE_BATCH  # the global batch at which the learning rate is base_lr

METHODS = ("bn", "sync_bn", "gn", "sn")  # the default comparison; "sync_sn" may be added


@dataclass(frozen=True)
class DistributedRunSpec:
    method: str  # one of METHODS or "sync_sn"
    batch_per_rank: int
    world_size: int
    seed: int
    epochs: int
    base_lr: float

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    @property
    def lr(self) -> float:
        return self.base_lr * self.global_batch / REFERENCE_BATCH


def build_model(method: str, data: StudyData, seed: int, process_group=None) -> nn.Module:
    """The study's network for ``method``; the synchronized ones are the local ones, converted."""
    base = {"sync_bn": "bn", "sync_sn": "sn"}.get(method, method)
    model = StudyNet(base, data.in_channels, data.spatial, data.num_classes, seed=seed)
    if method == "sync_bn":
        model = convert_sync_batchnorm(model, process_group, switch_norm=False)
    elif method == "sync_sn":
        model = convert(model, "sync_sn", only="sn", process_group=process_group)
    return model


def train_distributed(spec: DistributedRunSpec, data: StudyData, device: torch.device, group=None) -> dict:
    """Train one network data-parallel over ``group`` (every rank calls this) and return its metrics."""
    start = time.perf_counter()
    rank, world = _rank(group), spec.world_size
    n = len(data.y_train)
    steps_per_epoch = n // spec.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global batch {spec.global_batch} is larger than the training set ({n} samples)")
    model = build_model(spec.method, data, spec.seed, group).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    order = torch.Generator().manual_seed(spec.seed)  # the same on every rank: a function of the seed alone
    total_steps = steps_per_epoch * spec.epochs

    step = 0
    last = torch.zeros(3, dtype=torch.float64, device=device)  # wrong, seen, loss sum over the last epoch
    model.train()
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(steps_per_epoch):
            lo = i * spec.global_batch + rank * spec.batch_per_rank
            idx = perm[lo : lo + spec.batch_per_rank]  # this rank's shard of the global batch
            for param_group in optimizer.param_groups:  # cosine decay, evaluated before each step
                param_group["lr"] = spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            logits = model(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            _average_gradients(model, world, group)
            optimizer.step()
            step += 1
            if epoch == spec.epochs - 1:
                last += torch.stack([(logits.argmax(1) != y_train[idx]).sum().double(),
                                     torch.tensor(float(len(idx)), device=device),
                                     loss.detach().double() * len(idx)])
    train_time = time.perf_counter() - start

    _broadcast_buffers(model, world, group)  # eval with rank 0's running statistics, as DDP does
    model.eval()
    test = _test_counts(model, data, rank, world, device)
    totals = _sum(torch.cat([last, test]), world, group).tolist()
    wrong, seen, loss_sum, test_wrong, test_seen = totals
    loss_value = loss_sum / max(seen, 1.0)
    return {
        **asdict(spec),
        "global_batch": spec.global_batch,
        "lr": spec.lr,
        "steps": total_steps,
        "test_error": test_wrong / max(test_seen, 1.0),
        "train_error": wrong / max(seen, 1.0),
        "train_loss": loss_value if math.isfinite(loss_value) else None,
        "sn_importance": sn_importance(model),
        "train_s": train_time,
        "wall_s": time.perf_counter() - start,
        "device": str(device),
    }


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _sum(t: torch.Tensor, world: int, group) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, group=group)
    return t


def _average_gradients(model: nn.Module, world: int, group) -> None:
    """Gradients averaged over the ranks: one all-reduce of all of them packed in one tensor."""
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is None:  # unused on this rank this step: every rank must pack the same parameters
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters()]
    packed = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(packed, group=group)
    packed /= world
    offset = 0
    for g in grads:
        g.copy_(packed[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_buffers(model: nn.Module, world: int, group) -> None:
    if world == 1:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for buffer in model.buffers():
        dist.broadcast(buffer, src=src, group=group)


@torch.no_grad()
def _test_counts(model: nn.Module, data: StudyData, rank: int, world: int, device, chunk: int = 1000):
    """(wrong, seen) on this rank's contiguous share of the test set."""
    n = len(data.y_test)
    lo, hi = rank * n // world, (rank + 1) * n // world
    wrong = 0
    for i in range(lo, hi, chunk):
        x = data.x_test[i : min(i + chunk, hi)].to(device)
        y = data.y_test[i : min(i + chunk, hi)].to(device)
        wrong += int((model(x).argmax(1) != y).sum())
    return torch.tensor([float(wrong), float(hi - lo)], dtype=torch.float64, device=device)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab study --distributed",
        description="The batch-size study across processes (run it under torchrun).",
    )
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--data-dir", default=None, help="folder of the cifar10 / mnist files")
    parser.add_argument("--train-size", type=int, default=None, help="a fixed subset of the training set")
    parser.add_argument("--test-size", type=int, default=None, help="a fixed subset of the test set")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, among {', '.join((*METHODS, 'sync_sn'))}")
    parser.add_argument("--batch-size", type=int, default=4, help="images per rank (fixed)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate at a global batch of 32")
    parser.add_argument("--dist-backend", default=None, choices=("gloo", "nccl"),
                        help="default: nccl with CUDA, else gloo")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK with nccl, else cpu")
    parser.add_argument("--json", default=None, help="write the results here (rank 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in (*METHODS, "sync_sn")]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected among {', '.join((*METHODS, 'sync_sn'))}")
    owns_group = False
    if "WORLD_SIZE" in os.environ and not (dist.is_available() and dist.is_initialized()):
        backend = args.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        owns_group = True
    try:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = _rank(None)
        device = torch.device(args.device or _default_device())
        data = load_dataset(args.dataset, args.data_dir, args.train_size, args.test_size)
        results = []
        for method in methods:
            spec = DistributedRunSpec(method, args.batch_size, world, args.seed, args.epochs, args.lr)
            results.append(train_distributed(spec, data, device))
            if rank == 0:
                print(_row(results[-1]), flush=True)
        if rank == 0 and args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        if owns_group:
            dist.barrier()  # no rank tears gloo down while another still talks to it (aborts at exit)
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


def _default_device() -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _row(r: dict) -> str:
    share = ""
    if r["sn_importance"]:
        share = f"  SN BN share (mean) {r['sn_importance']['mean'].get('bn', float('nan')):.2f}"
    return (
        f"{r['method']:8s} {r['batch_per_rank']:3d}/rank x {r['world_size']} = {r['global_batch']:4d}  "
        f"test error {100 * r['test_error']:5.1f}%  train error {100 * r['train_error']:5.1f}%  "
        f"loss {r['train_loss'] if r['train_loss'] is None else round(r['train_loss'], 4)}{share}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
