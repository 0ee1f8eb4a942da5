"""What the suite's writers and readers share, below the experiments and the analysis.

The error convention and CLI helpers (``cli``: ``UserError``, one-line errors and warnings), the
local run store (``runstore``: run.json, run.lock, metrics.jsonl, atomic writes, ``run_state``),
the rank measures and rank-decay dynamics (``ranks``) and the plain reader of a sweep's outcome
(``sweep_outcome``: which jobs did not finish). It may import ``ksmm`` and nothing else of the
suite, and no Hydra, OmegaConf or W&B (the import contract in pyproject.toml checks both), so
training jobs, the SLURM launcher and the reports can all use it.
"""
