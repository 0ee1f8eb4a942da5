"""hydra-submitit-launcher's SLURM launcher, with a sweep that outlives the jobs SLURM ends.

The plugin collects results with ``[j.results()[0] for j in jobs]``: a job that SLURM ended
(time limit, ``scancel``, a killed step) raises ``UncompletedJobError`` there, carrying the
job's whole stderr, before Hydra's ``on_multirun_end`` runs. So the sweep had no summary and no
"did not finish" line, only a traceback. Here each such job becomes a result of its own: its
run record is settled (a record still "running" says how SLURM ended the job; one the job
closed itself keeps its state and gains SLURM's word), the job's log paths are kept for the
sweep outcome, and the sweep goes on to its report (experiments/callbacks.py).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import open_dict

from experiments import runstore
from experiments.callbacks import SweepOutcome

log = logging.getLogger(__name__)

# SLURM's word for how a job ended -> the run record's state
SLURM_END_STATES = {"TIMEOUT": "timeout", "CANCELLED": "interrupted", "PREEMPTED": "interrupted",
                    "NODE_FAIL": "killed", "OUT_OF_MEMORY": "killed", "FAILED": "failed"}  # fmt: skip


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        import submitit

        problem = unsatisfiable_request(self.params)
        if problem:  # else the array would stay PENDING (PartitionConfig) without a word
            print(f"error: {problem}", file=sys.stderr)
            _remove_new_sweep_folder(Path(str(self.config.hydra.sweep.dir)))
            sys.exit(2)
        submitted: list[Any] = []
        executor_map_array = submitit.AutoExecutor.map_array

        def map_array(executor, fn, *args):  # keep the jobs, collect them ourselves below
            submitted.extend(executor_map_array(executor, fn, *args))
            return [_Collected() for _ in submitted]

        submitit.AutoExecutor.map_array = map_array
        try:
            super().launch(job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor.map_array = executor_map_array
        returns = []
        for idx, (job, overrides) in enumerate(zip(submitted, job_overrides, strict=True)):
            try:
                returns.append(job.results()[0])
            except submitit.core.utils.UncompletedJobError:
                folder = self._job_folder(list(overrides), initial_job_idx + idx)
                returns.append(self._ended_by_slurm(job, folder, list(overrides)))
        return returns

    def _job_folder(self, overrides: list[str], num: int) -> Path:
        """Where Hydra put the job: the sweep folder and the subdir resolved for its overrides."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    def _ended_by_slurm(self, job: Any, folder: Path, overrides: list[str]) -> JobReturn:
        state = str(job.state).split()[0]  # "CANCELLED by 0" -> CANCELLED
        SweepOutcome.ended_by_cluster[folder] = (state, Path(job.paths.stderr))
        settle_record(folder, state, job.job_id)
        log.error("job %s (%s) ended by SLURM: %s; log %s", job.job_id, folder.name, state,
                  job.paths.stderr)  # fmt: skip
        # "completed" for Hydra (a failed JobReturn re-raises in the sweeper, before the sweep's
        # report): the run record and the sweep outcome say how it ended
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, working_dir=str(folder))


class _Collected:
    """Stands for a job in the plugin's own result loop (our loop collects the real ones)."""

    def results(self) -> list[None]:
        return [None]


def unsatisfiable_request(params: dict[str, Any]) -> str | None:
    """Why no node of the partition can run one task as asked (CPUs, memory, GPUs), or None
    (also when ``sinfo`` cannot tell: then SLURM has its say)."""
    cmd = ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"]
    if params.get("partition"):
        cmd += ["-p", str(params["partition"])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = [line.split("|") for line in out.split() if line.count("|") == 3]
    if not nodes:
        return f"partition {params.get('partition')!r} has no nodes (sinfo)"
    cpus = int(params.get("cpus_per_task") or 1) * int(params.get("tasks_per_node") or 1)
    mem_mb = 1024 * float(params.get("mem_gb") or 0)
    gpus = int(params.get("gpus_per_node") or 0)

    def fits(node: list[str]) -> bool:
        node_gpus = sum(int(g.rsplit(":", 1)[-1].split("(")[0]) for g in node[3].split(",")
                        if g.startswith("gpu") and g.rsplit(":", 1)[-1][:1].isdigit())  # fmt: skip
        return int(node[1]) >= cpus and float(node[2]) >= mem_mb and node_gpus >= gpus

    if any(fits(node) for node in nodes):
        return None
    biggest = max(nodes, key=lambda n: (int(n[1]), float(n[2])))
    return (f"no node can run a task asking for {cpus} CPUs, {mem_mb / 1024:g} GB and {gpus} "
            f"GPUs (the largest has {biggest[1]} CPUs, {float(biggest[2]) / 1024:.1f} GB, gres "
            f"{biggest[3]}): lower hydra.launcher.cpus_per_task / mem_gb / gpus_per_node")  # fmt: skip


def _remove_new_sweep_folder(sweep_dir: Path) -> None:
    """Nothing was submitted: a sweep folder holding only what this launch wrote goes."""
    ours = {"multirun.yaml", runstore.LOCK_FILE}
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= ours:
        runstore.release_all_locks()
        shutil.rmtree(sweep_dir, ignore_errors=True)


def settle_record(folder: Path, slurm_state: str, job_id: str) -> None:
    """Make the run record of a job SLURM ended say so: a record still "running" (the process
    died before closing it) takes the state SLURM names; any record gains SLURM's word."""
    path = folder / runstore.RUN_FILE
    try:
        lock = runstore.RunLock(folder).acquire(retries=40)  # the job's process is gone
    except (runstore.RunFolderInUse, OSError):
        return  # still held (a requeued task runs there) or no folder: nothing to settle
    try:
        record = runstore.read_json(path)
        reason = f"SLURM ended job {job_id}: {slurm_state}"
        # "running": the process died with the record open; "interrupted": it closed the
        # record on SLURM's SIGTERM, not knowing why it came
        if record.get("state") in ("running", "interrupted"):
            record.update(state=SLURM_END_STATES.get(slurm_state, "killed"), reason=reason)
        record["slurm_state"] = slurm_state
        runstore.write_json_atomic(path, record)
    except (OSError, ValueError):
        pass  # no record: the job died before it wrote one; the outcome says so
    finally:
        lock.release()
