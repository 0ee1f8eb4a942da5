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

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import open_dict

from common import runstore
from experiments.callbacks import SweepOutcome
from experiments.logger import ExperimentLogger

log = logging.getLogger(__name__)

# SLURM's word for how a job ended -> the run record's state
# (a record still "running" means the process died without closing it: SLURM's FAILED is then
# a killed step, as NODE_FAIL and OUT_OF_MEMORY are; a Python error closes its record itself)
SLURM_END_STATES = {"TIMEOUT": "timeout", "CANCELLED": "interrupted", "PREEMPTED": "interrupted",
                    "NODE_FAIL": "killed", "OUT_OF_MEMORY": "killed", "FAILED": "killed"}  # fmt: skip


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:  # fmt: skip
        """The job, inside SLURM. A requeued job goes on in its folder (``resume=true``). On
        SLURM's warning (SIGUSR2 before the time limit, or a preemption) with a requeue left,
        the run stops, closes its record and the job is requeued to go on from its checkpoint."""
        overrides = list(sweep_overrides)
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            overrides = self._resumed(overrides, job_num)
        warning = TimeLimitWarning()
        exit_code = FailedRunExitCode()  # before the run registers its own exit handlers
        with warning.handled():
            try:
                result = super().__call__(overrides, job_dir_key, job_num, job_id,
                                          singleton_state)  # fmt: skip
            except BaseException:
                if warning.requeues_left is None:
                    raise
            else:
                exit_code.note(result)
                return result
        self._requeue(warning)

    def _resumed(self, overrides: list[str], job_num: int) -> list[str]:
        """A requeued job's overrides: ``resume=true`` when its folder holds its run (it may
        have been stopped before the run began: then it starts afresh)."""
        kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"]
        if (self._job_folder(kept, job_num) / runstore.RUN_FILE).is_file():
            kept.append("resume=true")
        log.info("requeued (restart %s): %s", os.environ["SLURM_RESTART_COUNT"], " ".join(kept))
        return kept

    def _requeue(self, warning: TimeLimitWarning) -> NoReturn:
        """Requeue this job (submitit's checkpoint: the same call, the budget one less) and
        exit; the run record already says why it stopped and that it goes on (the stop
        request's reason)."""
        import submitit
        from submitit.core.job_environment import _checkpoint

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # scontrol requeue ends this process
        env = submitit.JobEnvironment()
        problem = _checkpoint(warning.delayed, env.paths.submitted_pickle, warning.requeues_left)
        if problem:
            log.error("not requeued: %s", problem)
            sys.exit(1)
        env._requeue(warning.requeues_left)
        sys.exit(130)

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
            ended_as = wait_for(job)  # a state: gone without a result, and sacct cannot say so
            try:
                if ended_as is None:
                    returns.append(job.results()[0])
                    continue
            except submitit.core.utils.UncompletedJobError:
                pass
            # composed only for a job SLURM ended: a config load per job would slow a big sweep
            folder = self._job_folder(list(overrides), initial_job_idx + idx)
            returns.append(self._ended_by_slurm(job, folder, list(overrides), ended_as))
        return returns

    def _job_folder(self, overrides: list[str], num: int) -> Path:
        """Where Hydra put the job: the sweep folder and the subdir resolved for its overrides."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    def _ended_by_slurm(self, job: Any, folder: Path, overrides: list[str],
                        state: str | None = None) -> JobReturn:  # fmt: skip
        state = (state or str(job.state)).split()[0]  # "CANCELLED by 0" -> CANCELLED
        SweepOutcome.ended_by_cluster[folder] = (state, Path(job.paths.stderr))
        settle_record(folder, state, job.job_id)
        log.error("job %s (%s) ended by SLURM: %s; log %s", job.job_id, folder.name, state,
                  job.paths.stderr)  # fmt: skip
        # "completed" for Hydra (a failed JobReturn re-raises in the sweeper, before the sweep's
        # report): the run record and the sweep outcome say how it ended
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, working_dir=str(folder))


# SLURM job states (scontrol's JobState) of a job that has ended
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
         "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}  # fmt: skip


def wait_for(job: Any, poll_s: float = 10, grace_s: float = 30) -> str | None:
    """Wait until ``job`` is done; None when submitit can tell (its result file, or sacct), or
    the state of a job that ended without a result when only scontrol can. submitit learns that
    a job ended from sacct, which fails on a cluster without accounting: a job that died without
    a result was then waited for forever. scontrol keeps an ended job for MinJobAge (300 s by
    default): a job it shows ended for ``grace_s`` with no result (which a shared filesystem
    may show late) ended as it says; one it no longer knows, with no result, is gone."""
    ended_since = asked = None
    while not job.done():
        if asked is None or time.monotonic() - asked >= poll_s:
            asked = time.monotonic()
            state = scontrol_state(job.job_id)
            if state in ENDED or state == "GONE":
                ended_since = ended_since or asked
                if asked - ended_since >= grace_s and not job.done():
                    return "UNKNOWN" if state == "GONE" else state
            else:  # live (or requeued), or scontrol could not be asked: wait as submitit does
                ended_since = None
        time.sleep(1)
    return None


def scontrol_state(job_id: str) -> str | None:
    """The job's state as slurmctld has it (no accounting needed); "GONE" when it no longer
    knows the job, None when scontrol cannot be asked."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return "GONE" if "Invalid job id" in proc.stderr else None
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


class TimeLimitWarning:
    """SLURM's SIGUSR2 in the job: ``signal_delay_s`` before the time limit (submitit asks for
    it) or on a preemption. With a requeue left (``max_num_timeout`` for time limits; always for
    a preemption, as submitit counts) the run is stopped at once; without one it trains on and
    the limit decides. ``requeues_left`` is set once the run was stopped for a requeue."""

    def __init__(self) -> None:
        import submitit
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        env = submitit.JobEnvironment()
        self.delayed = DelayedSubmission.load(env.paths.submitted_pickle)
        self._submitit = SignalHandler(env, env.paths, self.delayed)  # knows the time limit
        self.requeues_left: int | None = None
        self.reason = ""

    @contextlib.contextmanager
    def handled(self):
        previous = signal.signal(signal.SIGUSR2, self._on_warning)
        try:
            yield self
        finally:
            signal.signal(signal.SIGUSR2, previous)

    def _on_warning(self, signum: int, frame: Any) -> None:
        timed_out = self._submitit.has_timed_out()
        left = self.delayed._timeout_countdown - int(timed_out)
        what = "its time limit is near" if timed_out else "it is preempted"
        if left < 0:
            log.warning("SIGUSR2: %s and no requeue is left (hydra.launcher.max_num_timeout): "
                        "the job trains on until SLURM ends it", what)  # fmt: skip
            return
        run = ExperimentLogger.active
        if run is None and ExperimentLogger.closed_in_process:
            return  # the run has ended: nothing to go on with
        self.requeues_left = left
        self.reason = (f"SLURM's SIGUSR2: {what}; requeued to go on from its checkpoint "
                       f"({left} more time-limit requeues allowed)")  # fmt: skip
        log.warning(self.reason)
        if run is not None:
            run.request_stop(self.reason)  # raises, unless the record is being closed
            self.requeues_left = None  # it was: the run ends as it is
            return
        raise KeyboardInterrupt(self.reason)  # before the run began: nothing is kept


class FailedRunExitCode:
    """A job whose run failed (bad input, a Python error) hands its result to the master like
    any other, which lists it as failed; but its process would exit 0 and SLURM call it
    COMPLETED 0:0. This exits 1 once submitit has written the result, so sacct says FAILED 1:0.
    Registered before the run starts, so it runs after the run's own exit handlers (W&B's):
    exit handlers run last in, first out, and ``os._exit`` skips the ones registered before."""

    def __init__(self) -> None:
        self.failed = False
        atexit.register(self._exit)

    def note(self, result: JobReturn) -> None:
        try:  # the job's output folder (working_dir is the launch folder unless Hydra chdirs)
            folder = Path(str(result.hydra_cfg.hydra.runtime.output_dir))
            record = runstore.read_json(folder / runstore.RUN_FILE)
        except (AttributeError, OSError, ValueError):
            record = {}  # no record: Hydra's own status says
        self.failed = record.get("state", "") == "failed" or result.status == JobStatus.FAILED

    def _exit(self) -> None:
        if self.failed:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


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
