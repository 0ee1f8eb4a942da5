"""Every experiment's sweep through `hydra/launcher=slurm` on a real SLURM cluster, at tiny
sizes: no mock of SLURM or submitit. The sweep folder is under pytest's tmp_path, which the
node sees (one node: any local path). Jobs run with this Python (the venv) and this
environment, as sbatch exports it.

The fault cases at the end: a hard time limit and scancel of one array task still end in the
sweep's outcome (hydra_plugins/ks_slurm_launcher/slurm_launcher.py settles the jobs' records)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from entrypoint import run_script
from test_multimodal import TINY

REPO = Path(__file__).resolve().parents[1]
RANK_SWEEP = REPO / "experiments" / "rank_sweep.py"
SCALING = REPO / "experiments" / "laplace_scaling.py"
MULTIMODAL = REPO / "experiments" / "multimodal.py"

# the default suite's tiny configs (tests/test_rank_sweep.py, test_laplace_scaling.py,
# test_multimodal.py)
RANK_SMALL = [
    "weight.out_features=32",
    "weight.in_features=64",
    "train.num_epochs=3",
    "train.steps_per_epoch=20",
    "train.batch_size=32",
]
SCALING_SMALL = [
    "task.n_features=8",
    "task.n_train=256",
    "task.n_val=128",
    "train.epochs=2",
    "logger=disabled",
]
MULTIMODAL_TINY = [*TINY, "train.max_steps=1"]  # the default suite's tiny model
SLURM = "hydra/launcher=slurm"
# two array tasks at once on a 2-core node (the default, 2 CPUs a task, runs them in turn)
ONE_CPU = "hydra.launcher.cpus_per_task=1"


def sweep(script: Path, args: list[str], sweep_dir: Path, timeout: float = 300):
    return run_script(script, ["-m", SLURM, *args, f"hydra.sweep.dir={sweep_dir}"],
                      sweep_dir.parent, timeout)  # fmt: skip


def job_states(sweep_dir: Path) -> dict[str, str]:
    """Job folder name -> the state its run.json records."""
    return {
        p.parent.name: json.loads(p.read_text())["state"]
        for p in sorted(sweep_dir.glob("*/run.json"))
    }


LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"}


def slurm_states(sweep_dir: Path, wait: float = 60) -> dict[str, str]:
    """Array task (e.g. '12_0', or '12' for a sweep of one job) -> its state in SLURM's
    accounting, for the tasks this sweep's submitit folder names. Accounting lags: a task's end
    reaches the database a moment after its result file is written, and for a moment after an
    array ends sacct can list it as one line ('12|COMPLETED') before its tasks' lines. So sacct
    is asked again, up to ``wait`` s, until every task has its own line and none is still live."""
    jobs = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    # an array's tasks ('12_0', '12_1'; '12' is the array's own folder); a sweep of one job is a
    # plain job ('12')
    tasks = sorted(j for j in jobs if "_" in j) or sorted(j for j in jobs if j.isdigit())
    assert tasks, f"no SLURM job in {sweep_dir / '.submitit'}"
    deadline = time.time() + wait
    while True:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(tasks)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        listed = dict(line.split("|", 1) for line in proc.stdout.splitlines() if line)
        states = {task: listed[task] for task in tasks if task in listed}
        settled = len(states) == len(tasks) and not LIVE & set(states.values())
        if settled or time.time() > deadline:
            return states if settled else listed
        time.sleep(1)


def assert_ran_on_slurm(sweep_dir: Path, tasks: int, failed: tuple[int, ...] = ()) -> None:
    """Each job was a task of a SLURM array that ran to its end and left submitit's result;
    SLURM calls the tasks in ``failed`` (whose runs failed) FAILED, the others COMPLETED."""
    states = slurm_states(sweep_dir)
    assert len(states) == tasks, states
    for task, state in states.items():
        assert state == ("FAILED" if int(task.split("_")[-1]) in failed else "COMPLETED"), states
    for task in states:
        assert list((sweep_dir / ".submitit" / task).glob("*_result.pkl")), task


def test_rank_sweep_with_the_default_slurm_resources(tmp_path):
    """The launcher's defaults as they are (no GPU, 2 CPUs, 4 GB) run on a node without GPUs;
    W&B offline as by default."""
    out = tmp_path / "sweep"
    proc = sweep(RANK_SWEEP, ["rank=2,4", *RANK_SMALL], out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = pd.read_csv(out / "rank_sweep_summary.csv")
    assert summary["rank"].tolist() == [2, 4]
    assert summary["status"].tolist() == ["finished", "finished"]
    assert "rank_sweep_summary.csv" in proc.stdout and "did not finish" not in proc.stdout
    assert (out / "rank_sweep_loss_curves.png").stat().st_size > 10_000
    assert job_states(out) == {"0_rank_2": "finished", "1_rank_4": "finished"}
    assert_ran_on_slurm(out, tasks=2)


def test_rank_sweep_failed_job_is_listed_and_the_sweep_exits_1(tmp_path):
    """A job whose input is refused is a failed row; the other job goes on. The failed job's
    process exits 1 after handing its result to the master, so SLURM sees it FAILED too."""
    out = tmp_path / "sweep"
    proc = sweep(RANK_SWEEP, ["rank=2,1000", *RANK_SMALL, "logger=disabled", ONE_CPU], out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 of 2 jobs did not finish: 1_rank_1000 (failed)" in proc.stdout
    summary = pd.read_csv(out / "rank_sweep_summary.csv")
    assert summary["status"].tolist() == ["finished", "failed"]
    assert "above min(shape)" in summary["reason"].iloc[1]
    assert job_states(out) == {"0_rank_2": "finished", "1_rank_1000": "failed"}
    assert_ran_on_slurm(out, tasks=2, failed=(1,))
    # 2 cores, 1 CPU a task: each job takes 1 torch thread
    assert json.loads((out / "0_rank_2" / "summary.json").read_text())["torch_threads"] == 1


def test_scaling_sweep_on_slurm(tmp_path):
    out = tmp_path / "sweep"
    args = ["batch_size=8,64", "lr=1.0e-3", "seed=0", *SCALING_SMALL, ONE_CPU]
    proc = sweep(SCALING, args, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["batch_size"]) == [8, 64]
    assert set(results["status"]) == {"finished"}
    assert set(job_states(out).values()) == {"finished"} and len(job_states(out)) == 2
    assert_ran_on_slurm(out, tasks=2)


def test_multimodal_sweep_on_slurm(tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(MULTIMODAL, ["train.grad_clip=1.0,0.5", *MULTIMODAL_TINY, ONE_CPU], out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "did not finish" not in proc.stdout
    states = job_states(out)
    assert len(states) == 2 and set(states.values()) == {"finished"}, states
    for job in states:
        assert (out / job / "metrics.jsonl").stat().st_size > 0
    assert_ran_on_slurm(out, tasks=2)


# -- fault cases: what SLURM does to a job, and what the sweep says about it ----------------------

LONG = ["rank=2", *RANK_SMALL[:2], "train.num_epochs=100000", "train.steps_per_epoch=20",
        "logger=disabled", ONE_CPU]  # fmt: skip


def test_hard_time_limit_is_reported_by_the_sweep(tmp_path):
    """timeout_min=1 with signal_delay_s=0 (no USR2 warning): at the limit slurmstepd sends
    SIGTERM, then SIGKILL after KillWait."""
    out = tmp_path / "sweep"
    args = [*LONG, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=0"]
    proc = sweep(RANK_SWEEP, args, out, timeout=420)
    assert list(slurm_states(out).values()) == ["TIMEOUT"]
    # the job closed its record on SIGTERM; the master adds SLURM's word for why
    assert job_states(out) == {"0_rank_2": "timeout"}
    record = json.loads((out / "0_rank_2" / "run.json").read_text())
    assert record["slurm_state"] == "TIMEOUT" and "TIMEOUT" in record["reason"]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[:2000]
    assert "1 of 1 jobs did not finish: 0_rank_2 (timeout; log " in proc.stdout
    assert (out / "rank_sweep_summary.csv").exists()


def test_scancel_of_one_array_task_is_reported_by_the_sweep(tmp_path):
    out = tmp_path / "sweep"
    args = ["rank=2,4", *RANK_SMALL[:2], "train.num_epochs=300", "train.steps_per_epoch=20",
            "logger=disabled", ONE_CPU]  # fmt: skip
    with running_sweep(RANK_SWEEP, args, out) as master:
        # wait until task 1 trains (its run record exists), then cancel it alone
        deadline = time.time() + 180
        while not (out / "1_rank_4" / "run.json").exists():
            assert time.time() < deadline and master.poll() is None, "task 1 never started"
            time.sleep(0.5)
        (array,) = {p.name.split("_")[0] for p in (out / ".submitit").iterdir() if p.is_dir()}
        subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30)
        stdout, stderr = master.communicate(timeout=300)
    states = slurm_states(out)
    assert states[f"{array}_0"] == "COMPLETED" and states[f"{array}_1"].startswith("CANCELLED")
    assert job_states(out) == {"0_rank_2": "finished", "1_rank_4": "interrupted"}
    assert master.returncode == 1
    assert "Traceback" not in stderr, stderr[:2000]
    assert "1 of 2 jobs did not finish: 1_rank_4 (interrupted; log " in stdout
    summary = pd.read_csv(out / "rank_sweep_summary.csv")
    assert summary["status"].tolist()[0] == "finished"


def test_a_killed_job_is_reported_killed_by_the_sweep(tmp_path):
    """kill -9 of the job's Python (as the OOM killer or a crash would): SLURM sees the step
    fail; the record the process could not close is settled as killed."""
    out = tmp_path / "sweep"
    with running_sweep(RANK_SWEEP, LONG, out) as master:
        record = out / "0_rank_2" / "run.json"
        deadline = time.time() + 180
        while not record.exists():
            assert time.time() < deadline and master.poll() is None, "the job never started"
            time.sleep(0.5)
        os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)  # one node: this host
        stdout, stderr = master.communicate(timeout=300)
    assert master.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert job_states(out) == {"0_rank_2": "killed"}
    settled = json.loads(record.read_text())
    assert settled["slurm_state"] == "FAILED" and "FAILED" in settled["reason"]
    assert "1 of 1 jobs did not finish: 0_rank_2 (killed; log " in stdout
    assert (out / "rank_sweep_summary.csv").exists()


def test_a_killed_job_is_reported_without_slurm_accounting(tmp_path):
    """On a cluster without accounting sacct fails, so submitit never learns that a job ended
    without a result, and the master waited forever. The master here reads a copy of the
    cluster's slurm.conf with accounting off (sacct: "Slurm accounting storage is disabled";
    sbatch, squeue and scontrol work as before): scontrol's word ends the wait."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    lines = [line for line in conf.read_text().splitlines()
             if not line.startswith("AccountingStorage")]  # fmt: skip
    no_accounting = tmp_path / "slurm.conf"
    no_accounting.write_text("\n".join([*lines, "AccountingStorageType=accounting_storage/none"]))
    check = subprocess.run(["sacct", "-n"], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "SLURM_CONF": str(no_accounting)})  # fmt: skip
    assert check.returncode != 0 and "accounting storage is disabled" in check.stderr
    out = tmp_path / "sweep"
    started = time.time()
    with running_sweep(RANK_SWEEP, LONG, out, SLURM_CONF=str(no_accounting)) as master:
        record = out / "0_rank_2" / "run.json"
        while not record.exists():
            assert time.time() < started + 180 and master.poll() is None, "the job never started"
            time.sleep(0.5)
        os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
        killed = time.time()
        stdout, stderr = master.communicate(timeout=300)
    assert master.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert time.time() - killed < 120  # scontrol polled every 10 s, 30 s of grace
    assert job_states(out) == {"0_rank_2": "killed"}
    assert json.loads(record.read_text())["slurm_state"] == "FAILED"
    assert "1 of 1 jobs did not finish: 0_rank_2 (killed; log " in stdout


def test_a_request_no_node_can_satisfy_is_one_line_before_submitting(tmp_path):
    """Too much memory, too many CPUs or a GPU on this CPU node: one line and exit 2, nothing
    submitted, no sweep folder (SLURM would keep such an array PENDING without a word)."""
    for ask in ("hydra.launcher.mem_gb=4096", "hydra.launcher.cpus_per_task=512",
                "hydra.launcher.gpus_per_node=1"):  # fmt: skip
        out = tmp_path / "sweep"
        proc = sweep(RANK_SWEEP, ["rank=2", *RANK_SMALL, "logger=disabled", ask], out)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "no node can run a task asking for" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()


# -- requeue: SLURM's warning (SIGUSR2) with a requeue left; the job goes on from its checkpoint -


@contextlib.contextmanager
def running_sweep(script: Path, args: list[str], sweep_dir: Path, **env: str):
    """The sweep's master, running; interrupted on the way out if a check failed first."""
    master = start_sweep(script, args, sweep_dir, **env)
    try:
        yield master
    finally:
        if master.poll() is None:
            master.send_signal(signal.SIGINT)
            master.wait(30)


def start_sweep(script: Path, args: list[str], sweep_dir: Path, **env: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **env}
    return subprocess.Popen(
        [sys.executable, str(script), "-m", SLURM, *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=sweep_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def warn_when(master: subprocess.Popen, job: Path, task: int, past_step: int) -> str:
    """Send task ``task`` of the sweep's array SLURM's SIGUSR2 (as ``--signal`` does before the
    time limit) once its run has logged past ``past_step``; returns the array's id."""
    deadline = time.time() + 240
    while True:
        assert master.poll() is None, master.communicate()
        assert time.time() < deadline, f"{job} never got past step {past_step}"
        steps = [json.loads(line).get("_step", 0) for line in _lines(job / "metrics.jsonl")]
        if steps and max(steps) > past_step:
            break
        time.sleep(0.05)
    (array,) = {p.name.split("_")[0] for p in (job.parent / ".submitit").iterdir() if p.is_dir()}
    # a sweep of one job is a plain job (no array task ids)
    target = f"{array}_{task}" if (job.parent / ".submitit" / f"{array}_{task}").is_dir() else array
    subprocess.run(["scancel", "--signal=USR2", target], check=True, timeout=30)
    return array


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return []


def job_log(sweep_dir: Path, task: str) -> str:
    """A task's batch log, both streams (each launch of a requeued task appends to it)."""
    return "".join((sweep_dir / ".submitit" / task / f"{task}_0_log.{ext}").read_text()
                   for ext in ("out", "err"))  # fmt: skip


def restarts(job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout  # fmt: skip
    return int(out.split("Restarts=")[1].split()[0])


def test_a_requeued_multimodal_job_ends_with_the_numbers_of_an_uninterrupted_one(tmp_path):
    """Two jobs, the same config; job 0 gets SIGUSR2 after its checkpoint at step 5, is requeued
    (max_num_timeout=1) and goes on from last.pt in the same folder and W&B run. Its final
    numbers equal job 1's, which ran through; each step is recorded once."""
    out = tmp_path / "sweep"
    args = ["seed=0,0", *TINY, "train.epochs=40", "train.checkpoint_frequency=5",
            "train.log_frequency=1", "logger=wandb", ONE_CPU,
            "hydra.launcher.max_num_timeout=1"]  # fmt: skip
    with running_sweep(MULTIMODAL, args, out) as master:
        array = warn_when(master, out / "0", task=0, past_step=6)
        stdout, stderr = master.communicate(timeout=420)
    assert master.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "did not finish" not in stdout
    assert restarts(f"{array}_0") == 1 and restarts(f"{array}_1") == 0
    assert job_states(out) == {"0": "finished", "1": "finished"}
    summaries = [json.loads((out / j / "summary.json").read_text()) for j in ("0", "1")]
    final = {k: v for k, v in summaries[1].items() if k.startswith("final_")}
    assert final and {k: summaries[0][k] for k in final} == final
    steps = [json.loads(line)["_step"] for line in _lines(out / "0" / "metrics.jsonl")]
    assert sorted(steps) == sorted(json.loads(line)["_step"]
                                   for line in _lines(out / "1" / "metrics.jsonl"))  # fmt: skip
    log = job_log(out, f"{array}_0")
    assert "SLURM's SIGUSR2" in log and "resuming" in log
    # one W&B run: the requeued launch continues the first one's id
    runs = {p.name.rsplit("-", 1)[-1] for p in (out / "0" / "wandb").glob("offline-run-*")}
    assert len(runs) == 1, runs


def test_a_rank_sweep_job_warned_before_its_time_limit_goes_on_after_a_requeue(tmp_path):
    """The real time-limit path: timeout_min=8 and signal_delay_s=380, so SLURM itself sends
    SIGUSR2 100 s into the job (up to 60 s earlier: SLURM's event resolution), while the job
    needs about 3 minutes on an idle 2-core machine (5000 epochs at ~36 ms; 2000 epochs took
    71 s once, finishing before the warning). With one requeue allowed the job stops, is
    requeued and goes on from its last epoch, and finishes inside its next 8 minutes. Each
    epoch is recorded once (tests/test_run_records.py shows the curves equal an uninterrupted
    run's)."""
    epochs = 5000
    args = ["rank=2", *RANK_SMALL[:2], f"train.num_epochs={epochs}", "train.steps_per_epoch=40",
            "logger=disabled", ONE_CPU, "hydra.launcher.timeout_min=8",
            "hydra.launcher.signal_delay_s=380", "hydra.launcher.max_num_timeout=1"]  # fmt: skip
    out = tmp_path / "sweep"
    proc = sweep(RANK_SWEEP, args, out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert job_states(out) == {"0_rank_2": "finished"}
    (task,) = slurm_states(out)
    assert restarts(task) == 1
    log = job_log(out, task)
    assert "its time limit is near; requeued" in log and "after epoch" in log
    curves = pd.read_csv(out / "0_rank_2" / "loss_curves.csv")
    assert curves["epoch"].tolist() == list(range(1, epochs + 1))
    steps = [json.loads(line)["_step"] for line in _lines(out / "0_rank_2" / "metrics.jsonl")]
    assert steps == list(range(1, epochs + 1))


def test_a_warned_job_without_a_requeue_left_trains_on(tmp_path):
    """max_num_timeout=0 (the default): SIGUSR2 near the time limit is one log line, and the job
    trains on to its end (here it finishes; otherwise the limit would end it as a timeout)."""
    out = tmp_path / "sweep"
    args = ["rank=2", *RANK_SMALL[:2], "train.num_epochs=400", "train.steps_per_epoch=40",
            "logger=disabled", ONE_CPU, "hydra.launcher.timeout_min=3",
            "hydra.launcher.signal_delay_s=0"]  # fmt: skip
    with running_sweep(RANK_SWEEP, args, out) as master:
        warn_when(master, out / "0_rank_2", task=0, past_step=20)
        stdout, stderr = master.communicate(timeout=300)
    assert master.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert job_states(out) == {"0_rank_2": "finished"}
    (task,) = slurm_states(out)
    assert restarts(task) == 0
    log = job_log(out, task)
    assert "no requeue is left (hydra.launcher.max_num_timeout): the job trains on" in log
    assert pd.read_csv(out / "0_rank_2" / "loss_curves.csv")["epoch"].tolist() == list(
        range(1, 401)
    )
