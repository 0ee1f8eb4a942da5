"""Kronecker-sparse (KS) factors and chains: PyTorch modules, with a fused CPU kernel for the
butterfly levels behind registered ops (ksmm/native.py) and a PyTorch path that computes the
same thing."""

from .chain import KSLinearChain, butterfly_patterns, chain_patterns, merge_abcd
from .factor import KSLinear, KSPattern, ks_apply_fm, ks_dense, ks_einsum
from .floors import expected_mse, loss_floor, zero_predictor_loss
from .projections import lowrank_factors, monarch_factors, projection
from .structures import STRUCTURES, check_structure, dense_parameters, monarch_nblocks

__all__ = [
    "KSLinear",
    "KSLinearChain",
    "KSPattern",
    "STRUCTURES",
    "butterfly_patterns",
    "chain_patterns",
    "check_structure",
    "dense_parameters",
    "expected_mse",
    "ks_apply_fm",
    "ks_dense",
    "ks_einsum",
    "loss_floor",
    "lowrank_factors",
    "merge_abcd",
    "monarch_factors",
    "monarch_nblocks",
    "projection",
    "zero_predictor_loss",
]
