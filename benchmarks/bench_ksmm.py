"""Forward+backward time of KS chains against dense and low-rank baselines.

python benchmarks/bench_ksmm.py [--device auto|cpu|cuda] [--repeats 15] [--quick]
    [--isa auto|avx2|generic] [--grad both|input|weights]

--isa builds the fused kernel for that instruction set (KSMM_ISA): avx2 leaves out the AVX-512
code, to measure what an AVX2-only CPU runs on an AVX-512 one. --grad picks the tables: with an
input gradient (x requires grad, pair and dense without biases) and/or without one, as the rank
sweep trains (x is data; pair and dense with biases).
"""

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ksmm import KSLinearChain, ks_einsum, native

# steps a model runs back to back in its turn for the b2b ratio (after one untimed step)
BLOCK = 5
GRAD_MODES = {"input": "x and weights", "weights": "weights only"}


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


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="one small shape, a few seconds")
    ap.add_argument("--isa", choices=["auto", "avx2", "generic"], help="KSMM_ISA for the kernel")
    ap.add_argument("--grad", default="both", choices=["both", *GRAD_MODES])
    ap.add_argument("--no-ref", action="store_true", help="leave out the einsum reference")
    return ap.parse_args(argv)


def cpu_description() -> str:
    """The CPU model and its widest vector extension (what the kernel could use)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no AVX")
    return f"{model} ({widest}, {os.cpu_count()} cores)"


def print_header(device, batch, repeats) -> None:
    info = native.kernel_info() if native.available(torch.zeros(1, device=device)) else None
    kernel = "off (PyTorch ops)" if info is None else f"on, {info['isa']}"
    if info is not None and not (info["openmp"] and info["x86_variants"]):
        kernel += f" (openmp={info['openmp']}, x86 variants={info['x86_variants']})"
    print(f"cpu: {cpu_description()}")
    print(
        f"device={device} threads={torch.get_num_threads()} batch={batch} repeats={repeats} "
        f"fused butterfly kernel={kernel} (KSMM_ISA={os.environ.get('KSMM_ISA', 'auto')})"
    )
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("ms = median forward+backward; grad: what the backward pass computes (x and weights:")
    print("pair and dense without biases; weights only: x is data and pair and dense have biases,")
    print("as the rank sweep trains); step GF = 2*B*params for the forward pass, the weight and")
    print("the input gradients, less the first layer's input gradient where x needs none; the")
    print("models of one shape, rank and grad run in turns; a ratio is the median over repeats of")
    print("the two models' times in the same repeat; min ms shows the noise floor; b2b /lowrank:")
    print(f"the same ratio with each model's turn {BLOCK} steps back to back (hot caches: the")
    print("pair's best case)")


def step_flops(batch, params: int, first: int, input_grad: bool) -> int:
    """A training step's FLOPs from the parameter count: forward, weight gradients and input
    gradients, 2*B*params each, less the first layer's (``first`` parameters) input gradient
    when x needs none: without it a dense layer skips a third of its step, a chain far less."""
    return 2 * batch * (3 * params - (0 if input_grad else first))


def build_models(m, n, r, batch, device, bias: bool, ref: bool):
    """(models, step FLOPs) of one shape and rank, the dense layer first."""
    input_grad = not bias  # the two modes: see GRAD_MODES and measure_shape
    models = {
        "dense": nn.Linear(n, m, bias=bias, device=device),
        "lowrank pair": nn.Sequential(
            nn.Linear(n, r, bias=bias, device=device), nn.Linear(r, m, bias=bias, device=device)
        ),
    }
    flops = {
        "dense": step_flops(batch, m * n, m * n, input_grad),
        "lowrank pair": step_flops(batch, r * (m + n), r * n, input_grad),
    }
    for name in ["butterfly", "monarch"]:
        chain = KSLinearChain(n, m, r, name, device=device)
        label = f"{name} chain" + (f" k={chain.nblocks}" if name == "monarch" else "")
        models[label] = chain
        first = chain.patterns[0].nnz
        flops[label] = step_flops(batch, chain.num_parameters, first, input_grad)
        if name == "butterfly" and ref:
            models["butterfly einsum ref"] = EinsumChain(chain)
            flops["butterfly einsum ref"] = flops[label]
    return models, flops


def measure_shape(m, n, ranks, args, device, grad: str) -> list[tuple]:
    """The table rows of one shape and grad mode: (m, n, rank, grad, method, flops, median ms,
    min ms, /lowrank, /dense, b2b /lowrank)."""
    batch, bias = args.batch, grad == "weights"
    x = torch.randn(batch, n, device=device, requires_grad=grad == "input")
    rows = []
    for r in ranks:
        models, flops = build_models(m, n, r, batch, device, bias, not args.no_ref)
        times = time_together(models, x, args.repeats, device)
        # the target pair once more, each model back to back in its turn
        target = {k: models[k] for k in ["lowrank pair", "butterfly chain"]}
        b2b_times = time_together(target, x, args.repeats, device, block=BLOCK)
        b2b = paired_ratio(b2b_times, "butterfly chain", "lowrank pair")
        for name in models:
            if name == "dense" and r != ranks[0]:
                continue  # one dense row per shape
            ms = [t * 1e3 for t in times[name]]
            vs_low = None if name == "dense" else paired_ratio(times, name, "lowrank pair")
            rank = "-" if name == "dense" else r
            row = (m, n, rank, grad, name, flops[name], statistics.median(ms), min(ms), vs_low)
            rows.append(
                (*row, paired_ratio(times, name, "dense"), b2b if "butterfly c" in name else None)
            )
    return rows


def print_table(rows) -> None:
    head = (
        f"{'out x in':>11} {'rank':>5} {'grad':<13} {'method':<22} {'step GF':>7} {'ms':>9} "
        f"{'min ms':>9} {'/lowrank':>9} {'/dense':>7} {'b2b /lowrank':>12}"
    )
    print(head)
    print("-" * len(head))
    for m, n, r, grad, name, f, t, best, vs_low, vs_dense, b2b in rows:
        low = f"{vs_low:9.2f}" if vs_low is not None else f"{'':>9}"
        b2b_s = f"{b2b:12.2f}" if b2b is not None else ""
        print(
            f"{m:>5}x{n:<5} {r:>5} {GRAD_MODES[grad]:<13} {name:<22} {f / 1e9:7.3f} {t:9.2f} "
            f"{best:9.2f} {low} {vs_dense:7.2f} {b2b_s}"
        )


def check_targets(rows, batch) -> tuple[dict, list[str]]:
    """The targets per grad mode: chain within 1.5x of the pair (in turns, back to back) and
    faster than dense wherever it has fewer FLOPs."""
    verdict, misses = {}, []
    dense_flops = {(m, n, g): f for m, n, _, g, name, f, *_ in rows if name == "dense"}
    for m, n, r, grad, name, f, _, _, vs_low, vs_dense, b2b in rows:
        v = verdict.setdefault(grad, {"in turns": True, "back to back": True, "dense": True})
        for way, ratio in [("in turns", vs_low), ("back to back", b2b)]:
            if name == "butterfly chain" and ratio > 1.5:
                v[way] = False
                misses.append(
                    f"butterfly {m}x{n} r={r} ({GRAD_MODES[grad]}): {ratio:.2f}x the low-rank "
                    f"pair ({way})"
                )
        if " chain" in name and f < dense_flops[m, n, grad] and vs_dense >= 1:
            v["dense"] = False
            misses.append(
                f"{name} {m}x{n} r={r} ({GRAD_MODES[grad]}): fewer FLOPs but {vs_dense:.2f}x "
                "dense time"
            )
    return verdict, misses


def main(argv=None):
    args = parse_args(argv)
    if args.isa:  # before the kernel's first use, which builds it
        os.environ["KSMM_ISA"] = args.isa
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    shapes, ranks = [(1024, 2048), (2048, 4096)], [8, 64, 512]
    if args.quick:
        shapes, ranks, args.batch, args.repeats = [(256, 512)], [8, 64], 64, min(args.repeats, 3)
    grads = list(GRAD_MODES) if args.grad == "both" else [args.grad]
    torch.manual_seed(0)
    print_header(device, args.batch, args.repeats)
    rows = [
        row for g in grads for m, n in shapes for row in measure_shape(m, n, ranks, args, device, g)
    ]
    print_table(rows)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.quick:
        print("targets: not checked (--quick times a small shape, where fixed costs dominate)")
        return rows
    verdict, misses = check_targets(rows, args.batch)
    word = {True: "HOLDS", False: "MISSED"}
    for grad, v in verdict.items():
        print(
            f"targets ({GRAD_MODES[grad]}): chain within 1.5x of the low-rank pair of the same "
            f"rank: {word[v['in turns']]} in turns, {word[v['back to back']]} back to back (the "
            f"pair's best case); chain faster than dense wherever it has fewer FLOPs: "
            f"{word[v['dense']]}"
        )
    for line in misses:
        print("  missed:", line)
    return rows


if __name__ == "__main__":
    main()
