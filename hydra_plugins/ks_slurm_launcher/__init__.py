"""This suite's SLURM launcher (Hydra finds launcher plugins under ``hydra_plugins``)."""
