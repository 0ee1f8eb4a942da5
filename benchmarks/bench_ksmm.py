"""Forward+backward time of KS chains against dense and low-rank baselines.

python benchmarks/bench_ksmm.py [--device auto|cpu|cuda] [--repeats 15] [--quick]
"""

import argparse
import statistics
import time

import torch
from torch import nn

from ksmm import KSLinearChain, ks_einsum, native

# steps a model runs back to back in its turn for the b2b ratio (after one untimed step)
BLOCK = 5


class EinsumChain(nn.Module):
    """The same chain run through the einsum reference, one factor at a time."""

    def __init__(self, chain: KSLinearChain):
        super().__init__()
        self.chain = chain

    def forward(self, x):
        for f in self.chain.factors:
            x = ks_einsum(x, f.weight_abcd())
        return x


def time_together(models: dict, x, repeats, device, block: int = 1) -> dict:
    """Forward+backward times (s) of each model, measured in turns: each repeat runs every model
    (in a rotating order), so a slow spell of a shared machine hits all of them alike and ratios
    can be taken repeat by repeat. With ``block`` > 1 a model's turn is one untimed step and
    then ``block`` steps back to back, of which the median is kept: each model runs with its own
    data hot in cache (the small low-rank pair's best case) and the turns still cancel slow
    spells."""
    # each model's parameters as an optimizer holds them: a flat list, not a module walk
    params = {id(model): list(model.parameters()) for model in models.values()}

    def step(model):
        for p in params[id(model)]:
            p.grad = None
        x.grad = None
        model(x).sum().backward()

    def timed(model):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for model in models.values():
        for _ in range(2):  # warm-up
            step(model)
    names = list(models)
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if block > 1:
                step(models[name])  # the first step after another model's runs cold
            times[name].append(statistics.median(timed(models[name]) for _ in range(block)))
    return times


def paired_ratio(times: dict, name: str, ref: str) -> float:
    """Median over repeats of this model's time over the reference's in the same repeat."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref], strict=True))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="one small shape, a few seconds")
    args = ap.parse_args(argv)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    shapes, ranks, batch, repeats = (
        [(1024, 2048), (2048, 4096)],
        [8, 64, 512],
        args.batch,
        args.repeats,
    )
    if args.quick:
        shapes, ranks, batch, repeats = [(256, 512)], [8, 64], 64, min(repeats, 3)
    torch.manual_seed(0)
    fused = native.available(torch.zeros(1, device=device))
    print(
        f"device={device} threads={torch.get_num_threads()} batch={batch} repeats={repeats} "
        f"fused butterfly kernel={'on' if fused else 'off (PyTorch ops)'}"
    )
    print("ms = median forward+backward (weight and input grads); FLOP = forward 2*B*params;")
    print("the models of one shape and rank run in turns; a ratio is the median over repeats of")
    print("the two models' times in the same repeat; min ms shows the noise floor; b2b /lowrank:")
    print(f"the same ratio with each model's turn {BLOCK} steps back to back (hot caches: the")
    print("pair's best case)")

    rows = []  # (m, n, rank, method, flops, median ms, min ms, /lowrank, /dense)
    for m, n in shapes:
        x = torch.randn(batch, n, device=device, requires_grad=True)
        dense = nn.Linear(n, m, bias=False, device=device)
        f_dense = 2 * batch * m * n
        for r in ranks:
            models = {
                "dense": dense,
                "lowrank pair": nn.Sequential(
                    nn.Linear(n, r, bias=False, device=device),
                    nn.Linear(r, m, bias=False, device=device),
                ),
            }
            flops = {"dense": f_dense, "lowrank pair": 2 * batch * r * (m + n)}
            for name in ["butterfly", "monarch"]:
                chain = KSLinearChain(n, m, r, name, device=device)
                label = f"{name} chain" + (f" k={chain.nblocks}" if name == "monarch" else "")
                models[label] = chain
                flops[label] = 2 * batch * chain.num_parameters
                if name == "butterfly":
                    models["butterfly einsum ref"] = EinsumChain(chain)
                    flops["butterfly einsum ref"] = flops[label]
            times = time_together(models, x, repeats, device)
            # the target pair once more, each model back to back in its turn
            target = {k: models[k] for k in ["lowrank pair", "butterfly chain"]}
            b2b = paired_ratio(
                time_together(target, x, repeats, device, block=BLOCK),
                "butterfly chain",
                "lowrank pair",
            )
            for name in models:
                if name == "dense" and r != ranks[0]:
                    continue  # one dense row per shape
                ms = [t * 1e3 for t in times[name]]
                vs_low = None if name == "dense" else paired_ratio(times, name, "lowrank pair")
                vs_dense = paired_ratio(times, name, "dense")
                rank = "-" if name == "dense" else r
                row = (m, n, rank, name, flops[name], statistics.median(ms), min(ms))
                rows.append((*row, vs_low, vs_dense, b2b if name == "butterfly chain" else None))

    head = f"{'out x in':>11} {'rank':>5} {'method':<22} {'GFLOP':>7} {'ms':>9} {'min ms':>9} {'/lowrank':>9} {'/dense':>7} {'b2b /lowrank':>12}"
    print(head)
    print("-" * len(head))
    verdict = {"in turns": True, "back to back": True, "dense": True}
    misses = []
    for m, n, r, name, f, t, best, vs_low, vs_dense, b2b in rows:
        low = f"{vs_low:9.2f}" if vs_low is not None else f"{'':>9}"
        b2b_s = f"{b2b:12.2f}" if b2b is not None else ""
        print(
            f"{m:>5}x{n:<5} {r:>5} {name:<22} {f / 1e9:7.3f} {t:9.2f} {best:9.2f} {low} {vs_dense:7.2f} {b2b_s}"
        )
        for way, ratio in [("in turns", vs_low), ("back to back", b2b)]:
            if name == "butterfly chain" and ratio > 1.5:
                verdict[way] = False
                misses.append(f"butterfly {m}x{n} r={r}: {ratio:.2f}x the low-rank pair ({way})")
        if " chain" in name and f < 2 * batch * m * n and vs_dense >= 1:
            verdict["dense"] = False
            misses.append(f"{name} {m}x{n} r={r}: fewer FLOPs but {vs_dense:.2f}x dense time")
    if args.quick:
        print("targets: not checked (--quick times a small shape, where fixed costs dominate)")
        return rows
    word = {True: "HOLDS", False: "MISSED"}
    print(
        f"targets: chain within 1.5x of the low-rank pair of the same rank: "
        f"{word[verdict['in turns']]} in turns, {word[verdict['back to back']]} back to back "
        f"(the pair's best case); chain faster than dense wherever it has fewer FLOPs: "
        f"{word[verdict['dense']]}"
    )
    for line in misses:
        print("  missed:", line)
    return rows


if __name__ == "__main__":
    main()
