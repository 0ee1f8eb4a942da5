"""The live rank probe: hooks in forward order, scheduled by the loop, all experiments."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from experiments.logger import ExperimentLogger
from experiments.rank_probe import ProbeSchedule, RankProbe, hooked_features, input_rank


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 6)  # defined first, called second: order must follow forward
        self.a = nn.Linear(10, 8)
        self.c = nn.Linear(6, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.drop(torch.relu(self.a(x))))))


def test_hooks_follow_forward_order_and_restore_mode():
    net = Net().train()
    batch = torch.randn(32, 10)
    feats = hooked_features(net, ["c", "a", "b"], batch)()
    assert list(feats) == ["a", "b", "c"]
    assert [f.shape[1] for f in feats.values()] == [8, 6, 2]
    assert net.training  # eval mode only while probing
    again = hooked_features(net, ["a", "b", "c"], batch)()
    assert all(torch.equal(feats[k], again[k]) for k in feats)  # dropout off: deterministic


def test_probe_metrics_scheduled_by_the_loop_through_the_logger(tmp_path):
    net, batch = Net(), torch.randn(64, 10)
    probe = RankProbe(hooked_features(net, ["a", "b", "c"], batch), every=2,
                      input_rank=input_rank(batch), layers=["a", "b", "c"])  # fmt: skip
    schedule = ProbeSchedule(probe, spent=1.5)  # a resumed run: the earlier launch's time
    with ExperimentLogger(tmp_path, {}, mode="disabled") as lg:
        lg.attach_rank_probe(probe)
        lg.log({"loss": 0.0}, step=0)  # the logger alone only records: it never probes
        for step in range(1, 5):
            schedule.log(lg, {"loss": 1.0 / step}, step=step)
            schedule.log(lg, {"other": 1.0}, step=step)  # a second call at the step: no probe
        schedule.log(lg, {"loss": 0.1}, step=5, force=True)  # the end of training
        schedule.log(lg, {"loss": 0.1}, step=5, force=True)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in lines if "ranks/a/effective_rank" in r]
    assert [r["_step"] for r in probed] == [2, 4, 5] and "other" not in probed[0]
    seconds = [r["rank_probe_seconds"] for r in probed]
    assert 1.5 < seconds[0] <= seconds[1] <= seconds[2]  # the run's running total
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rank_probe_seconds"] == seconds[-1]
    r = probed[0]
    assert r["ranks/input_rank"] == 10
    assert r["ranks/c/numerical_rank"] <= 2 and r["ranks/a/numerical_rank"] <= 8
    assert len([k for k in r if k.startswith("ranks/")]) == 1 + 3 * 4
    dyn = [
        k for k in r if k.endswith(("_rank_drop_gini", "_rank_decay_centroid", "_normalized_aurc"))
    ]
    assert len(dyn) == 12
    assert 0 < r["effective_rank_normalized_aurc"] <= 1 or math.isnan(
        r["effective_rank_normalized_aurc"]
    )
    record = json.loads((tmp_path / "run.json").read_text())
    assert (
        record["rank_probe"]["every"] == 2 and record["rank_probe"]["prepend_input_rank"] is False
    )
    assert record["rank_probe"]["layers"] == ["a", "b", "c"]  # readers order the ranks by it


def test_a_probe_whose_features_come_in_another_order_than_it_records_is_refused():
    net, batch = Net(), torch.randn(16, 10)
    probe = RankProbe(hooked_features(net, ["a", "b", "c"], batch), every=1,
                      input_rank=input_rank(batch), layers=["b", "a", "c"])  # fmt: skip
    with pytest.raises(RuntimeError, match="not as its recorded layer order"):
        probe.measure()
