"""Forward+backward time of KS chains against dense and low-rank baselines.

python benchmarks/bench_ksmm.py [--device auto|cpu|cuda] [--repeats 5] [--quick]
"""

import argparse
import statistics
import time

import torch
from torch import nn

from ksmm import KSLinearChain, ks_einsum, native


class EinsumChain(nn.Module):
    """The same chain run through the einsum reference, one factor at a time."""

    def __init__(self, chain: KSLinearChain):
        super().__init__()
        self.chain = chain

    def forward(self, x):
        for f in self.chain.factors:
            x = ks_einsum(x, f.weight_abcd())
        return x


def timeit(model, x, repeats, device):
    def step():
        for p in model.parameters():
            p.grad = None
        x.grad = None
        model(x).sum().backward()

    for _ in range(2):  # warm-up
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7)
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
    print("ratios use the median; min ms shows the noise floor on a shared machine")

    rows = []
    for m, n in shapes:
        x = torch.randn(batch, n, device=device, requires_grad=True)
        dense = nn.Linear(n, m, bias=False, device=device)
        t_dense, best = timeit(dense, x, repeats, device)
        f_dense = 2 * batch * m * n
        rows.append((m, n, "-", "dense", f_dense, t_dense, best, None))
        for r in ranks:
            lowrank = nn.Sequential(
                nn.Linear(n, r, bias=False, device=device),
                nn.Linear(r, m, bias=False, device=device),
            )
            t_low, best = timeit(lowrank, x, repeats, device)
            rows.append((m, n, r, "lowrank pair", 2 * batch * r * (m + n), t_low, best, t_low))
            for name in ["butterfly", "monarch"]:
                chain = KSLinearChain(n, m, r, name, device=device)
                flops = 2 * batch * chain.num_parameters
                label = f"{name} chain" + (f" k={chain.nblocks}" if name == "monarch" else "")
                rows.append((m, n, r, label, flops, *timeit(chain, x, repeats, device), t_low))
                if name == "butterfly":
                    t_ein = timeit(EinsumChain(chain), x, repeats, device)
                    rows.append((m, n, r, "butterfly einsum ref", flops, *t_ein, t_low))

    head = f"{'out x in':>11} {'rank':>5} {'method':<22} {'GFLOP':>7} {'ms':>9} {'min ms':>9} {'/lowrank':>9} {'/dense':>7}"
    print(head)
    print("-" * len(head))
    dense_t = {(m, n): t for m, n, r, name, f, t, *_ in rows if name == "dense"}
    dense_f = {(m, n): f for m, n, r, name, f, *_ in rows if name == "dense"}
    low_ok, fast_ok, misses = True, True, []
    for m, n, r, name, f, t, best, t_low in rows:
        vs_low = f"{t / t_low:9.2f}" if t_low else f"{'':>9}"
        vs_dense = t / dense_t[(m, n)]
        print(
            f"{m:>5}x{n:<5} {r:>5} {name:<22} {f / 1e9:7.3f} {t:9.2f} {best:9.2f} {vs_low} {vs_dense:7.2f}"
        )
        if name == "butterfly chain" and t > 1.5 * t_low:
            low_ok = False
            misses.append(f"butterfly {m}x{n} r={r}: {t / t_low:.1f}x low-rank")
        if " chain" in name and f < dense_f[(m, n)] and t >= dense_t[(m, n)]:
            fast_ok = False
            misses.append(f"{name} {m}x{n} r={r}: fewer FLOPs but {vs_dense:.2f}x dense time")
    print(
        f"targets: chain within 1.5x of the low-rank pair of the same rank: "
        f"{'HOLDS' if low_ok else 'MISSED'}; chain faster than dense wherever it has fewer "
        f"FLOPs: {'HOLDS' if fast_ok else 'MISSED'}"
    )
    for line in misses:
        print("  missed:", line)
    return rows


if __name__ == "__main__":
    main()
