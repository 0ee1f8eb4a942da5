"""A live rank probe: every ``every`` logged steps, the rank measures of chosen layers on a fixed
probe batch, plus the 12 rank-decay dynamics metrics at the same step (no backfill needed).

The training loop schedules it (:class:`ProbeSchedule`: when it is due, or at the end) and hands
its metrics to the logger with that step's own; ``logger.attach_rank_probe(probe)`` only records
the probe's settings in run.json. The metrics:

- ``ranks/{layer}/{measure}`` for each probed layer, in forward order;
- ``ranks/input_rank``: the probe batch's theoretical rank min(B, D_in);
- ``{measure}_rank_drop_gini``, ``{measure}_rank_decay_centroid``, ``{measure}_normalized_aurc``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.ranks import (
    DYNAMICS_METRICS,
    RANK_MEASURES,
    compute_rank_decay_dynamics,
    rank_measures_batched,
)

Features = Callable[[], dict[str, torch.Tensor]]


@dataclass
class RankProbe:
    features: Features  # returns {layer: (B, ...) output} in forward order
    every: int
    input_rank: float
    mode: str = "difference"
    prepend_input_rank: bool = False  # R_0 = input_rank in the dynamics: recorded, explicit
    prop: float = 0.99
    eps: float = 0.01
    # the probed layers in forward order, as ``features`` returns them: the logger records them
    # in run.json, so that readers order a run's ranks without rebuilding its model
    layers: Sequence[str] = ()

    @classmethod
    def from_config(cls, features: Features, batch: torch.Tensor, config,
                    layers: Sequence[str] = (), every: int | None = None):  # fmt: skip
        """A probe of ``features`` (the ``layers``, in forward order) on ``batch`` with a
        RankProbeConfig's settings (``every``: another schedule than ``config.every``)."""
        every = config.every if every is None else every
        return cls(features, every, input_rank(batch), config.mode, config.prepend_input_rank,
                   config.prop, config.eps, layers=layers)  # fmt: skip

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self) -> dict[str, float]:
        feats = self.features()
        layers = list(feats)
        if self.layers and layers != list(self.layers):  # what run.json says must be what ran
            raise RuntimeError(f"the probe's features came as {layers}, not as its recorded "
                               f"layer order {list(self.layers)}")  # fmt: skip
        values = rank_measures_batched(feats, prop=self.prop, eps=self.eps)
        metrics: dict[str, float] = {"ranks/input_rank": float(self.input_rank)}
        for measure in RANK_MEASURES:
            for layer, value in zip(layers, values[measure], strict=True):
                metrics[f"ranks/{layer}/{measure}"] = float(value)
            dyn = compute_rank_decay_dynamics(
                values[measure],
                mode=self.mode,
                input_rank=self.input_rank if self.prepend_input_rank else None,
            )
            for name in DYNAMICS_METRICS:
                metrics[f"{measure}_{name}"] = dyn[name]
        return metrics


class ProbeSchedule:
    """The loop's side of a rank probe: it runs when due (or when asked, e.g. at the end of
    training), at most once per step, and keeps the run's probe time (``rank_probe_seconds``).

    ``spent``: the time an earlier launch of a resumed run already spent probing."""

    def __init__(self, probe: RankProbe | None, spent: float = 0.0):
        self.probe, self.spent = probe, spent
        self._probed_step: int | None = None

    def take(self, step: int, force: bool = False) -> dict[str, float]:
        """The probe's metrics and the time spent so far when it runs at ``step``; else {}."""
        probe = self.probe
        if probe is None or step == self._probed_step or not (force or probe.due(step)):
            return {}
        started = time.perf_counter()
        values = probe.measure()
        self._probed_step = step  # once per step, however many log calls land there
        self.spent = round(self.spent + time.perf_counter() - started, 4)
        values["rank_probe_seconds"] = self.spent
        return values

    def log(self, logger, metrics: Mapping[str, Any], step: int, force: bool = False) -> int:
        """``logger.log`` of ``metrics`` at ``step``, joined by the probe's when it runs; its
        cost goes in the step's row and the summary (benchmarks/bench_rank_probe.py reads it)."""
        ranks = self.take(step, force)
        logged = logger.log({**metrics, **ranks}, step=step)
        if ranks:
            logger.log_summary(rank_probe_seconds=ranks["rank_probe_seconds"])
        return logged


def hooked_features(model: nn.Module, layers: Sequence[str], batch: torch.Tensor) -> Features:
    """Outputs of the named submodules on ``batch``, captured by forward hooks, in the order
    the forward pass reaches them (eval mode, no grad; the model's mode is restored)."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"no module named {', '.join(missing)} in {type(model).__name__}")

    @torch.no_grad()
    def run() -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = [
            modules[name].register_forward_hook(
                lambda _m, _i, out, name=name: captured.setdefault(name, out.detach())
            )
            for name in layers
        ]
        was_training = model.training
        model.eval()
        try:
            model(batch)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return captured

    return run


def input_rank(batch: torch.Tensor) -> float:
    return float(min(batch.shape[0], batch[0].numel()))


# -- which layers each experiment probes, and their forward order --------------------------------


def chain_probe_layers(num_factors: int) -> list[str]:
    """The KS chain's probed layers: every factor's output, in application order."""
    return [f"factor_{i}" for i in range(num_factors)]


def mlp_probe_layers(depth: int) -> list[str]:
    """The scaling sweep's MLP student: each hidden layer's activations."""
    return [f"hidden_{i}" for i in range(depth)]


def encoder_probe_layers(encoder: nn.Module) -> list[str]:
    """The multimodal image encoder: each conv block's output (after its activation), then
    the latent projection."""
    blocks = [f"net.{i}" for i, m in enumerate(encoder.net) if isinstance(m, nn.GELU)]
    return [*blocks, "proj"]
