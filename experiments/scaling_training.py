"""The batch-size x learning-rate sweep's task, stacked student and training loop.

One (batch size, seed) group trains K learning rates at once: every parameter has a leading
"config" axis, each slice gets its own lr, and all slices see the same minibatches. K = 1 is a
single cell, so the multirun path and the in-process grid run the same code.

Paired design: for one seed, features, teacher, initialisation and minibatch order come from
streams that do not depend on the noise family or the lr; the label noise is one uniform draw
pushed through each family's inverse CDF (common random numbers), matched in variance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from experiments.schemas import (
    Noise,
    ScalingModelConfig,
    ScalingOptimConfig,
    ScalingTaskConfig,
    ScalingTrainConfig,
)

NOISES = tuple(n.value for n in Noise)

# Streams of random numbers per seed; independent of noise family and lr (the paired design).
_DATA, _INIT, _ORDER = 0, 1, 2


def generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000 + stream)


def cell_name(batch_size: int, lr: float) -> str:
    """The per-cell W&B namespace, e.g. ``B8_LR0.000030`` (kept as the phase-2 dashboards use)."""
    return f"B{batch_size}_LR{lr:.6f}"


def noise_from_uniform(u: Tensor, noise: str, std: float, df: float = 5.0) -> Tensor:
    """Label noise of variance std^2 from uniforms u in (0, 1), by the family's inverse CDF."""
    u = u.double().clamp(1e-12, 1 - 1e-12)
    if noise == "gaussian":
        z = math.sqrt(2.0) * torch.special.erfinv(2 * u - 1)
    elif noise == "laplace":  # scale 1/sqrt(2) has variance 1
        centred = u - 0.5
        z = -torch.sign(centred) * torch.log1p(-2 * centred.abs()) / math.sqrt(2.0)
    elif noise == "student_t":
        if df <= 2:
            raise ValueError(f"student_t needs degrees of freedom > 2 for a variance, got {df}")
        z = torch.from_numpy(stats.t.ppf(u.numpy(), df)) * math.sqrt((df - 2) / df)
    else:
        raise ValueError(f"unknown noise {noise!r}; expected one of {NOISES}")
    return (std * z).float()


@dataclass
class Task:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def make_task(task: ScalingTaskConfig, seed: int, noise: str | None = None) -> Task:
    """Linear-teacher regression y = x . w* + noise, with x ~ N(0, I) and w* ~ N(0, I/d).
    ``noise``: the family, when not ``task.noise`` (the grid runner's families)."""
    d, n_train, n_val = task.n_features, task.n_train, task.n_val
    g = generator(seed, _DATA)
    teacher = torch.randn(d, generator=g) / math.sqrt(d)
    x = torch.randn(n_train + n_val, d, generator=g)
    u = torch.rand(n_train + n_val, generator=g, dtype=torch.float64)
    family = task.noise if noise is None else noise
    y = x @ teacher + noise_from_uniform(u, family, task.noise_std, task.student_t_df)
    return Task(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class StackedStudent(torch.nn.Module):
    """K identical copies of a linear or MLP student; forward (B, d) -> (K, B)."""

    def __init__(self, k: int, n_features: int, model: ScalingModelConfig, seed: int):
        super().__init__()
        hidden = [model.hidden] * model.depth if model.kind == "mlp" else []
        dims = [n_features, *hidden, 1]
        g = generator(seed, _INIT)
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init, one copy for all K
            w = (torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound
            b = (torch.rand(1, fan_out, generator=g) * 2 - 1) * bound
            self.weights.append(torch.nn.Parameter(w.expand(k, -1, -1).clone()))
            self.biases.append(torch.nn.Parameter(b.expand(k, -1, -1).clone()))

    def forward(self, x: Tensor) -> Tensor:
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.matmul(h, w) + b  # (B, d) @ (K, d, o) broadcasts to (K, B, o)
            if i < last:
                h = torch.tanh(h)
        return h.squeeze(-1)

    @torch.no_grad()
    def hidden_outputs(self, x: Tensor) -> list[Tensor]:
        """Each hidden layer's activations, (K, B, hidden) per layer (none for linear)."""
        outs, h = [], x
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = torch.tanh(torch.matmul(h, w) + b)
            outs.append(h)
        return outs


class StackedOptimizer:
    """Adam (AdamW-style decay) or SGD with momentum, one lr per slice of the leading axis."""

    def __init__(self, params: Sequence[Tensor], lrs: Tensor, optim: ScalingOptimConfig):
        self.params = list(params)
        self.lrs = lrs
        self.name, self.momentum, self.eps = optim.name, optim.momentum, optim.eps
        self.weight_decay = optim.weight_decay
        self.beta1, self.beta2 = optim.betas
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params] if self.name == "adam" else None

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        self.t += 1
        lr = (self.lrs * active).view(-1, 1, 1)  # a frozen slice (diverged) gets lr 0
        for i, p in enumerate(self.params):
            g = p.grad
            if self.weight_decay:
                p.sub_(lr * self.weight_decay * p)
            if self.name == "sgd":
                self.m[i].mul_(self.momentum).add_(g)
                p.sub_(lr * self.m[i])
                continue
            m, v = self.m[i], self.v[i]
            m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            m_hat = m / (1 - self.beta1**self.t)
            v_hat = v / (1 - self.beta2**self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))


@dataclass
class EvalPoint:
    step: int
    epoch: float
    train_loss: Tensor  # (K,) mean minibatch loss since the last evaluation
    val_loss: Tensor  # (K,)
    active: Tensor  # (K,) bool: not diverged
    model: StackedStudent | None = None  # for probes that look inside (rank probe)


@dataclass
class CellResult:
    lr: float
    final_train_loss: float
    final_val_loss: float
    min_val_loss: float
    initial_val_loss: float
    converged: bool
    diverged: bool
    steps: int
    epochs: float
    wall_time_s: float
    reason: str | None = None
    val_curve: list[float] = field(default_factory=list)


def _finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else math.nan


class Divergence:
    """Which slices of a group still train, and when and why each one stopped."""

    def __init__(self, initial: Tensor):
        k = len(initial)
        self.active = torch.isfinite(initial)
        self.diverged_at = torch.full((k,), -1, dtype=torch.long)
        self.stopped = torch.zeros(k, dtype=torch.long)
        self.reasons: list[str | None] = [None] * k
        for j in (~self.active).nonzero().flatten().tolist():  # never trained: diverged at 0
            self.reasons[j] = f"initial val loss is {initial[j].item()}"
            self.diverged_at[j] = 0

    def freeze(self, bad: Tensor, step: int) -> list[int]:
        """Freeze the active slices in ``bad`` at ``step``; returns them (the caller says why in
        ``reasons``)."""
        newly = (self.active & bad).nonzero().flatten().tolist()
        self.diverged_at[newly] = step
        self.active &= ~bad
        return newly


def _check_group(task: Task, batch_size: int, lrs: Sequence[float]) -> None:
    if not len(lrs):
        raise ValueError("train_group needs at least one learning rate")
    if not len(task.x_val):
        raise ValueError("train_group needs a validation set (task.n_val >= 1)")
    if batch_size > len(task.x_train):
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(task.x_train)} training samples"
        )


def eval_steps(train: ScalingTrainConfig, steps_per_epoch: int) -> tuple[int, set[int]]:
    """The group's number of steps and the steps it evaluates at (the protocol's choice)."""
    if train.protocol == "fixed_epochs":
        return train.epochs * steps_per_epoch, {
            e * steps_per_epoch for e in range(1, train.epochs + 1)
        }
    total = train.steps
    return total, {max(1, round(total * (i + 1) / train.evals)) for i in range(train.evals)}


class _Group:
    """One (batch size, seed) group while it trains: the stacked student, its optimizer, the
    minibatch order, which slices still train and the curves so far."""

    def __init__(self, task: Task, batch_size: int, lrs: Sequence[float], seed: int,
                 model: ScalingModelConfig, optim: ScalingOptimConfig):  # fmt: skip
        self.task, self.batch_size, self.k = task, batch_size, len(lrs)
        self.student = StackedStudent(self.k, task.x_train.shape[1], model, seed)
        self.params = [*self.student.weights, *self.student.biases]
        self.lrs = torch.tensor(list(lrs), dtype=torch.float32)
        self.opt = StackedOptimizer(self.params, self.lrs, optim)
        self.steps_per_epoch = len(task.x_train) // batch_size
        self.order, self.perm = generator(seed, _ORDER), None
        self.initial = self.val_losses()
        self.state = Divergence(self.initial)
        self.train_sum, self.train_n = torch.zeros(self.k), 0
        self.curves: list[list[float]] = [[] for _ in range(self.k)]
        self.train_curves: list[list[float]] = [[] for _ in range(self.k)]

    @torch.no_grad()
    def val_losses(self) -> Tensor:
        return ((self.student(self.task.x_val) - self.task.y_val) ** 2).mean(1)

    def train_step(self, step: int) -> None:
        """One minibatch for every active slice (a new permutation at each epoch's start)."""
        task, state, bs = self.task, self.state, self.batch_size
        pos = (step - 1) % self.steps_per_epoch
        if pos == 0:
            self.perm = torch.randperm(len(task.x_train), generator=self.order)
        idx = self.perm[pos * bs : (pos + 1) * bs]
        per_slice = ((self.student(task.x_train[idx]) - task.y_train[idx]) ** 2).mean(1)
        for j in state.freeze(~torch.isfinite(per_slice), step):
            state.reasons[j] = f"train loss became {per_slice[j].item()} at step {step}"
        for p in self.params:
            p.grad = None
        torch.where(state.active, per_slice, 0.0).sum().backward()
        self.opt.step(state.active)
        state.stopped[state.active] = step
        self.train_sum += torch.where(state.active, per_slice.detach(), 0.0)
        self.train_n += 1

    def evaluate(self, step: int) -> EvalPoint:
        """Val losses (a slice above its initial one diverged), the curves, a new window."""
        val, state, initial = self.val_losses(), self.state, self.initial
        for j in state.freeze(~torch.isfinite(val) | (val > initial), step):
            state.reasons[j] = f"val loss {val[j].item():.4g} above its initial {initial[j]:.4g}"
        train_mean = self.train_sum / self.train_n
        for j in range(self.k):
            self.curves[j].append(float(val[j]))
            self.train_curves[j].append(float(train_mean[j]))
        self.train_sum, self.train_n = torch.zeros(self.k), 0
        return EvalPoint(step, step / self.steps_per_epoch, train_mean, val,
                         state.active.clone(), self.student)  # fmt: skip


def train_group(
    task: Task,
    batch_size: int,
    lrs: Sequence[float],
    seed: int,
    model: ScalingModelConfig | None = None,
    optim: ScalingOptimConfig | None = None,
    train: ScalingTrainConfig | None = None,
    on_eval: Callable[[EvalPoint], None] | None = None,
) -> list[CellResult]:
    """Train one (batch size, seed) group at every lr in ``lrs``; a result per lr. The model,
    optimizer and schedule come from their config sections (defaults: the schemas').

    A slice diverges when its loss is NaN/Inf or its val loss rises above its initial val loss;
    it is frozen there (diverged=True) and the others go on. The group stops when all diverged.
    """
    _check_group(task, batch_size, lrs)
    started = time.perf_counter()
    group = _Group(task, batch_size, lrs, seed, model or ScalingModelConfig(),
                   optim or ScalingOptimConfig())  # fmt: skip
    total, eval_at = eval_steps(train or ScalingTrainConfig(), group.steps_per_epoch)
    step = 0
    for step in range(1, total + 1):
        group.train_step(step)
        if step not in eval_at:
            continue
        point = group.evaluate(step)
        if on_eval is not None:
            on_eval(point)
        if not group.state.active.any():
            break
    wall = (time.perf_counter() - started) / group.k  # the group's time, shared by its cells
    return [
        _cell_result(
            j,
            float(lr_j),
            group.curves[j],
            group.train_curves[j],
            group.initial,
            group.state,
            step,
            group.steps_per_epoch,
            wall,
        )  # fmt: skip
        for j, lr_j in enumerate(lrs)
    ]


def _cell_result(j: int, lr: float, val_curve: list[float], train_curve: list[float],
                 initial: Tensor, state: Divergence, last_step: int, steps_per_epoch: int,
                 wall: float) -> CellResult:  # fmt: skip
    """Slice ``j``'s result from its curves and where it stopped."""
    finite = [v for v in val_curve if math.isfinite(v)]
    diverged = bool(state.diverged_at[j] >= 0)
    final_val = _finite_or_nan(val_curve[-1]) if val_curve else math.nan
    # converged: the val loss improved by less than 1% over the last quarter of training
    quarter = val_curve[-max(1, len(val_curve) // 4) - 1] if len(val_curve) > 1 else math.nan
    converged = (
        not diverged
        and math.isfinite(final_val)
        and math.isfinite(quarter)
        and (quarter - final_val) <= 0.01 * final_val
    )
    stopped = int(state.stopped[j])
    return CellResult(
        lr=lr,
        # a diverged slice's last window holds zeros where it was frozen, not a loss
        final_train_loss=_finite_or_nan(train_curve[-1])
        if train_curve and not diverged
        else math.nan,
        final_val_loss=math.nan if diverged else final_val,
        min_val_loss=min(finite) if finite else math.nan,
        initial_val_loss=float(initial[j]),
        converged=converged,
        diverged=diverged,
        steps=stopped if not diverged else int(state.diverged_at[j]),
        epochs=float(np.round((stopped or last_step) / steps_per_epoch, 6)),
        wall_time_s=wall,
        reason=state.reasons[j],
        val_curve=val_curve,
    )
