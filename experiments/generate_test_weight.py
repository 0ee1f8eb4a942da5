"""Write a test weight matrix for the rank sweeps (its flags kept compatible with earlier use).

    python experiments/generate_test_weight.py --output_features 1024 --input_features 2048 \
        --output_path ./my_weight.pth --init_method xavier_uniform
"""

from __future__ import annotations

from common.cli import ArgumentParser, UserError, run_cli
from experiments.resources import F32, F64, check_memory
from experiments.weights import DTYPES, INIT_METHODS, make_weight, save_weight


def memory_needed(out_features: int, in_features: int, init: str, dtype: str) -> int:
    """Bytes at the peak, rough and high: the float32 draw (x4 for orthogonal's QR and
    hadamard's concatenations), the weight in its dtype, the copy save_weight writes, and the
    float64 copy the printed norm is taken on."""
    mn = out_features * in_features
    draw = F32 * mn * (4 if init in ("orthogonal", "hadamard") else 1)
    return draw + 2 * DTYPES[dtype].itemsize * mn + F64 * mn


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Generate a test weight matrix (.pth holding a tensor).")
    parser.add_argument("--output_features", type=int, default=2048, help="rows (default 2048)")
    parser.add_argument("--input_features", type=int, default=4096, help="columns (default 4096)")
    parser.add_argument("--output_path", default="./test_weight.pth", help="where to save")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--init_method", choices=INIT_METHODS, default="xavier_uniform")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # Everything is validated before anything is written, so bad input leaves no file behind.
    for flag in ("output_features", "input_features"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    m, n = args.output_features, args.input_features
    check_memory(
        memory_needed(m, n, args.init_method, args.dtype),
        f"the {m}x{n} {args.dtype} weight",
        "use smaller --output_features/--input_features",
    )
    weight = make_weight(m, n, args.init_method, args.dtype, args.seed)
    path = save_weight(weight, args.output_path)
    norm = weight.double().norm().item()
    print(
        f"wrote {path}: shape {tuple(weight.shape)}, dtype {args.dtype}, "
        f"init {args.init_method}, seed {args.seed}, Frobenius norm {norm:.6g}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
