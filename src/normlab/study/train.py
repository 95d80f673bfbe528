"""One run of the study: train the study net with one method, batch size and seed; measure it.

The protocol (Wu & He's Group Norm paper, at laptop scale) is the same for every method:

- learning rate scaled linearly with the batch: ``lr = base_lr * batch_size / 32``, SGD with momentum 0.9,
  no weight decay, cosine decay of the learning rate to zero over the run;
- the same number of epochs at every batch size (so a batch of 2 takes 16x the steps of a batch of 32);
- the same initial weights and the same data order for a given seed, whatever the method or batch size:
  each epoch is a permutation of the training set drawn from a generator seeded with the seed, cut into
  batches (the last incomplete batch is dropped, so BN never sees a batch of one);
- test error in eval mode (BN and SN use their running statistics, as in the papers); training error is
  the error on the last epoch's batches in training mode, as the papers' training curves show it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from normlab.study.data import StudyData
from normlab.study.model import StudyNet, sn_importance

REFERENCE_BATCH = 32  # the batch size at which the learning rate equals base_lr


@dataclass(frozen=True)
class RunSpec:
    method: str
    batch_size: int
    seed: int
    epochs: int
    base_lr: float

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / REFERENCE_BATCH

    def steps_per_epoch(self, num_train: int) -> int:
        return num_train // self.batch_size


def train_run(spec: RunSpec, data: StudyData, device: str | torch.device = "cpu") -> dict:
    """Train one network and return its metrics (a JSON-ready dict, the spec's fields included)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    device = torch.device(device)
    n = len(data.y_train)
    if spec.batch_size > n:
        raise ValueError(f"batch size {spec.batch_size} is larger than the training set ({n} samples)")
    model = StudyNet(spec.method, data.in_channels, data.spatial, data.num_classes, seed=spec.seed).to(device)
    steps_per_epoch = spec.steps_per_epoch(n)
    total_steps = steps_per_epoch * spec.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    momentum = [torch.zeros_like(p) for p in params]
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    order = torch.Generator().manual_seed(spec.seed)  # the data order: a function of the seed alone

    step, wrong, seen, loss_sum = 0, 0, 0, 0.0
    model.train()
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=order).to(device)
        last_epoch = epoch == spec.epochs - 1
        for i in range(steps_per_epoch):
            idx = perm[i * spec.batch_size : (i + 1) * spec.batch_size]
            logits = model(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            for p in params:
                p.grad = None
            loss.backward()
            lr = spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))  # cosine decay
            _sgd_step(params, momentum, lr)
            step += 1
            if last_epoch:
                wrong += int((logits.argmax(1) != y_train[idx]).sum())
                seen += len(idx)
                loss_sum += float(loss.detach()) * len(idx)
    train_time = time.perf_counter() - start

    model.eval()
    test_error = _error(model, data.x_test.to(device), data.y_test.to(device))
    loss_value = loss_sum / max(seen, 1)
    return {
        **asdict(spec),
        "lr": spec.lr,
        "steps": total_steps,
        "test_error": test_error,
        "train_error": wrong / max(seen, 1),
        "train_loss": loss_value if math.isfinite(loss_value) else None,
        "sn_importance": _finite_or_none(sn_importance(model)),
        "train_s": train_time,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,  # this process's CPU time: wall time on an idle core
        "device": str(device),
    }


def _finite_or_none(importance: dict | None) -> dict | None:
    """SN's weights, with a diverged run's NaNs as None (results.jsonl is strict JSON)."""
    if importance is None:
        return None
    return {
        part: {k: v if math.isfinite(v) else None for k, v in shares.items()} for part, shares in importance.items()
    }


@torch.no_grad()
def _sgd_step(params: list[torch.Tensor], momentum: list[torch.Tensor], lr: float, beta: float = 0.9) -> None:
    """torch.optim.SGD(momentum=0.9)'s update: buf = beta * buf + grad; p -= lr * buf (buf starts at 0).

    Written out because torch.optim imports torch._dynamo on first use, seconds of start-up in every
    worker process; the arithmetic is the same.
    """
    for p, buf in zip(params, momentum, strict=True):
        if p.grad is not None:
            buf.mul_(beta).add_(p.grad)
            p.add_(buf, alpha=-lr)


@torch.no_grad()
def _error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    wrong = 0
    for i in range(0, len(y), chunk):
        wrong += int((model(x[i : i + chunk]).argmax(1) != y[i : i + chunk]).sum())
    return wrong / len(y)
