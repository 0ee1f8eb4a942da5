"""The chain structures a KS chain can take (``butterfly``, ``monarch``, ``lowrank``): their
names, parameter counts, and the check that a shape, rank and block count fit one."""

STRUCTURES = ("butterfly", "monarch", "lowrank")


def dense_parameters(out_features: int, in_features: int) -> int:
    return out_features * in_features


def monarch_nblocks(out_features: int, in_features: int, rank: int = 1) -> int:
    """Auto block count: the largest k dividing M and N with k*k <= min(M, N) whose blocks
    (M/k x N/k) still hold the rank (rank <= min(M, N) / k); at least 1."""
    m, n = out_features, in_features
    best = 1
    for k in range(1, min(m, n) + 1):
        if k * k > min(m, n):
            break
        if m % k == 0 and n % k == 0 and rank * k <= min(m, n):
            best = k
    return best


def check_structure(out_features, in_features, rank, structure="butterfly", nblocks=None):
    """Validate a request; returns the resolved nblocks for monarch (None otherwise)."""
    m, n = out_features, in_features
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}.")
    if m < 1 or n < 1:
        raise ValueError(f"in_features and out_features must be >= 1, got {n} and {m}.")
    if int(rank) != rank or rank <= 0 or rank > min(m, n):
        raise ValueError(
            f"rank must be an integer in 1 <= rank <= min(in_features, out_features) = {min(m, n)}"
            f", got {rank}."
        )
    if structure != "monarch":
        return None
    k = monarch_nblocks(m, n, rank) if nblocks is None else nblocks
    if int(k) != k or k < 1 or m % k or n % k:
        raise ValueError(
            f"nblocks={k} must be a positive integer dividing both in_features={n} and "
            f"out_features={m}."
        )
    if rank > min(m // k, n // k):
        raise ValueError(
            f"monarch rank {rank} exceeds the block size min(out/nblocks, in/nblocks) = "
            f"{min(m // k, n // k)} for nblocks={k}; allowed range is 1 <= rank <= "
            f"{min(m // k, n // k)}."
        )
    return k
