"""The multimodal trainer: metrics on hand-made tensors, and the entry point run as a user runs
it (a subprocess) with tiny configs."""

from __future__ import annotations

import json
import logging
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from entrypoint import run_script

from experiments.multimodal_data import ANGLES, Tokenizer, plan_folder, render, synthetic_pairs
from experiments.multimodal_model import caption_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "multimodal.py"
TINY = [
    "data.num_train=16",
    "data.num_val=8",
    "data.image_size=16",
    "model.image_encoder_layers=2",
    "model.conv_width=8",
    "model.latent_dim=16",
    "model.embedding_dim=16",
    "model.transformer_layers=1",
    "model.num_heads=2",
    "train.batch_size=8",
    "train.num_samples=2",
    "logger=disabled",
]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, args, cwd, timeout=120, OMP_NUM_THREADS="1")


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_caption_metrics_ignore_padding():
    pad = 0
    # two real tokens (one right, one wrong) and one pad whose prediction is wrong and confident
    logits = torch.full((1, 3, 4), -1e9)
    logits[0, 0, 1] = 0.0  # predicts 1 with certainty, target 1
    logits[0, 1, :] = 0.0  # uniform over 4, target 2: argmax is token 0, wrong
    logits[0, 2, 3] = 0.0  # at a pad position: must not count
    targets = torch.tensor([[1, 2, pad]])
    m = caption_metrics(logits, targets, pad)
    assert m["caption_accuracy"] == pytest.approx(0.5)
    # mean CE over real tokens = (0 + log 4) / 2, perplexity = exp of it = 2
    assert m["caption_perplexity"] == pytest.approx(2.0)
    assert m["caption_entropy"] == pytest.approx(math.log(4) / 2)


def test_tokenizer_and_data_are_deterministic():
    a, _ = synthetic_pairs(8, 4, 24, 2, seed=3)
    b, val = synthetic_pairs(8, 4, 24, 2, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not set(val.captions) & set(a.captions)  # validation scenes are new combinations
    tok = Tokenizer.build(a.captions, vocab_size=1266)
    ids = tok.encode(a.captions[0], 64)
    assert ids[0] == tok.bos and tok.decode(ids[1:]) == a.captions[0]


@pytest.mark.parametrize("angle", list(ANGLES))
def test_hatching_runs_the_way_its_caption_word_says(angle):
    # one large square, dense hatching, in the middle cell; its interior without the outline
    scene = ((4, 1, list(ANGLES).index(angle), 0, 1),)
    ink = render(scene, 48, np.random.default_rng(0))[19:29, 19:29] < 0.5
    pairs = {  # ink pixels whose neighbour one step along a direction is ink too
        "horizontal": (ink[:, :-1] & ink[:, 1:]).sum(),
        "vertical": (ink[:-1, :] & ink[1:, :]).sum(),
        "rising": (ink[1:, :-1] & ink[:-1, 1:]).sum(),  # right and up (rows go down)
        "falling": (ink[:-1, :-1] & ink[1:, 1:]).sum(),  # right and down
    }
    assert max(pairs, key=pairs.get) == angle, pairs


def test_one_step_train(tmp_path):
    out = tmp_path / "job"
    proc = run(
        [*TINY, "train.epochs=1", "train.log_frequency=1", "train.image_log_frequency=1",
         "data.num_train=8", f"hydra.run.dir={out}"], tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    logged = set().union(*metrics_of(out))
    names = [
        "total_loss",
        "loss_image",
        "loss_caption",
        "loss_alignment",
        "latent_mean",
        "latent_std",
        "latent_min",
        "latent_max",
        "latent_norm",
        "image_mse",
        "image_l1",
        "image_diff",
        "caption_accuracy",
        "caption_perplexity",
        "caption_entropy",
        "grad_mean",
        "grad_std",
        "grad_max",
        "grad_norm",
        "cpu_percent",
        "learning_rate",
        "batch_size",
        "epoch",
        "epoch_train_loss_avg",
        "epoch_val_loss_avg",
        "val_train_loss_ratio",
        "image_caption_loss_ratio",
        "sample_captions",
    ]
    assert set(names) <= logged, set(names) - logged
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_samples"] == 8 and summary["total_parameters"] > 0
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["step"] == 1 and "<pad>" in ckpt["tokenizer"]["itos"]


def test_resume_continues_at_the_step_where_it_stopped(tmp_path):
    out = tmp_path / "job"
    args = [*TINY, "train.epochs=2", "train.log_frequency=1", f"hydra.run.dir={out}"]
    first = run([*args, "train.max_steps=3"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "training to step 3 (train.max_steps; the schedule has 4)" in first.stdout + first.stderr
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    second = run([*args, "resume=true", f"run_dir={out}"], tmp_path)
    assert second.returncode == 0, second.stderr
    steps = [m["_step"] for m in metrics_of(out) if "total_loss" in m and "val_loss" not in m]
    assert steps[:3] == [1, 2, 3] and steps[3] == 4 and steps[-1] == 4  # 2 epochs of 2 steps
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 4
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id
    config = (out / "config.yaml").read_text()
    assert "prefix_tokens: 4" in config and "train_samples: 16" in config  # old flat names too


def test_resume_with_other_settings_is_an_error(tmp_path):
    out = tmp_path / "job"
    args = [*TINY, "train.epochs=2", f"hydra.run.dir={out}"]
    assert run([*args, "train.max_steps=1"], tmp_path).returncode == 0
    # run.lock only names the process that last held the folder (liveness is its flock)
    record = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "run.lock")
    before = {p: p.read_bytes() for p in record}
    proc = run([*args, "data.num_train=12", "resume=true", f"run_dir={out}"], tmp_path)
    assert proc.returncode == 2
    assert "data.num_train (16 there, 12 now)" in proc.stderr.strip().splitlines()[-1]
    # the run's record, Hydra's .hydra/ included, is untouched, and nothing was added
    assert sorted(p for p in out.rglob("*") if p.is_file() and p.name != "run.lock") == record
    assert all(p.read_bytes() == before[p] for p in record)


def test_excel_csv_and_unicode_captions(tmp_path):
    root = _folder(
        tmp_path, "\ufeffimage,caption\n0.png,un chat élevé\n1.png,日本の猫\n2.png,a bird\n"
    )
    from PIL import Image

    Image.new("L", (20, 20), 0).save(root / "uncaptioned.png")  # in the folder, not in the file
    out = tmp_path / "job"
    proc = run([*TINY, "train.max_steps=1", "data.source=folder", f"data.folder={root}",
                f"hydra.run.dir={out}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    itos = torch.load(out / "last.pt", weights_only=False)["tokenizer"]["itos"]
    assert "élevé" in itos or "日本の猫" in itos
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "no caption" in line]
    assert len(warned) == 1 and "1 of the 4 images in" in warned[0], warned
    assert "are left out (uncaptioned.png)" in warned[0]


def test_images_without_a_caption_are_counted_in_one_warning(tmp_path, caplog):
    from PIL import Image

    root = _folder(tmp_path, "image,caption\n0.png,a cat\n1.png,a dog\n")  # 2.png: none
    for i in range(3, 8):
        Image.new("L", (20, 20), 255).save(root / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="experiments.multimodal_data"):
        plan = plan_folder(str(root), None, 1)
    assert plan.num_images == 2 and [name for name, _ in plan.rows] == ["0.png", "1.png"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"6 of the 8 images in {root} have no caption in captions.csv")
    assert warning.endswith("are left out (2.png, 3.png, 4.png, ...)")


def _folder(tmp_path: Path, captions: str, image_bytes: bytes | None = None) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("L", (20, 20), 255).save(root / f"{i}.png")
    if image_bytes is not None:
        (root / "bad.png").write_bytes(image_bytes)
    (root / "captions.csv").write_text(captions)
    return root


OK = "image,caption\n0.png,a cat\n1.png,a dog\n2.png,a bird\n"


BAD_INPUTS = {
    "missing folder": (None, None, "nope does not exist"),
    "unreadable image": (OK + "bad.png,a fox\n", b"not a png", "bad.png cannot be read"),
    "empty caption file": ("image,caption\n", None, "holds no image-caption pairs"),
    "empty caption": (OK + "1.png,  \n", None, "caption of 1.png"),
    "a folder listed as an image": (
        OK + "sub,a fox\n",
        None,
        "sub listed in the captions file is a folder",
    ),
    # every missing one named at once, before any image is decoded
    "captions naming missing images": (
        OK + "x.png,a fox\ny.png,an owl\n",
        None,
        "2 of the 5 images listed in",
    ),
    "captions naming none of the images": (
        "image,caption\na.png,a cat\nb.png,a dog\n",
        None,
        "none of the 3 images in the folder is named in it (e.g. 0.png): do the names match?",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_folder_one_line_nonzero(tmp_path, case):
    captions, image_bytes, message = BAD_INPUTS[case]
    folder = tmp_path / "nope" if captions is None else _folder(tmp_path, captions, image_bytes)
    if captions is not None:
        (folder / "sub").mkdir()
    check_one_line_error(tmp_path, ["data.source=folder", f"data.folder={folder}"], message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.vocab_size=4", "data.vocab_size=4 is too small"),
        ("trian.lr=0.1", "unknown config key 'trian.lr'"),
        ("model.latentdim=3", "unknown config key 'model.latentdim'"),
        ("loss.alignment=l2", "loss.alignment must be one of"),
        ("experiment=nope", "unknown experiment 'nope'"),
        ("experiment=demo", "experiment 'demo' is for another entry point"),
        ("+logger.api_key=abc", "looks like a secret"),
        ("train.lr=abc", "train.lr=abc: Value 'abc'"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("data.max_caption_len=1", "data.max_caption_len=1 leaves no room"),
        ("data.max_objects=1 data.num_train=600", "only 576 different scenes exist"),
    ],
)
def test_bad_config_one_line_nonzero(tmp_path, override, message):
    check_one_line_error(tmp_path, override.split(), message)


def check_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "job"
    proc = run([*TINY, *args, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


def test_encoder_layers_are_rank_probed(tmp_path):
    out = tmp_path / "job"
    args = [*TINY, "train.epochs=1", "train.log_frequency=1", "rank_probe.every=1",
            f"hydra.run.dir={out}"]  # fmt: skip
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    logged = set().union(*metrics_of(out))
    # two encoder blocks (after their activations) and the latent projection, in forward order
    assert {"ranks/net.2/effective_rank", "ranks/net.5/numerical_rank", "ranks/proj/effective_rank",
            "ranks/input_rank", "approximate_rank_rank_decay_centroid"} <= logged  # fmt: skip


def test_a_sweep_with_a_failed_job_exits_non_zero(tmp_path):
    """The sweep goes on past a job that fails, then names it and exits 1 (also with job folders
    nested below the sweep folder); a later launch into the same folder answers for its own
    jobs only."""
    sweep = tmp_path / "sweep"
    args = [*TINY, "train.max_steps=1", f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=run/${hydra.job.num}"]  # fmt: skip
    proc = run(["-m", "train.grad_clip=1.0,-1", *args], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "1 of 2 jobs did not finish: run/1 (failed)" in proc.stdout
    states = [json.loads((sweep / "run" / job / "run.json").read_text())["state"] for job in "01"]
    assert states == ["finished", "failed"]
    # a later launch into the same sweep folder: run/1 is the first launch's and does not count
    again = run(["-m", "train.grad_clip=1.0", *args[:-1], "hydra.sweep.subdir=again/${hydra.job.num}"],
                tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stdout
    assert "did not finish" not in again.stdout
    # a job whose folder holds the first launch's run is not run there (never two runs mixed)
    before = (sweep / "run" / "0" / "metrics.jsonl").read_text()
    reused = run(["-m", "train.grad_clip=1.0", *args], tmp_path)
    assert reused.returncode == 1, reused.stdout
    assert (
        "1 of 1 jobs did not finish: run/0 (not run: its folder holds an earlier" in reused.stdout
    )
    assert (sweep / "run" / "0" / "metrics.jsonl").read_text() == before


def test_a_checkpoint_at_an_epoch_end_comes_after_the_evaluation(tmp_path, monkeypatch):
    """A periodic checkpoint at a step that also ends an epoch was saved before the epoch's
    records: a run stopped during that evaluation (SLURM's SIGUSR2, in the SLURM suite) resumed
    from it past the step and never logged its evaluation or sample captions."""
    from types import SimpleNamespace

    from experiments import multimodal

    calls: list[tuple[str, int]] = []

    class Run:  # the steps train() strings together, recording their order
        cfg = SimpleNamespace(train=SimpleNamespace(checkpoint_frequency=2))
        model, device = torch.nn.Linear(1, 1), torch.device("cpu")
        probe = SimpleNamespace(log=lambda *a, **k: None)
        step, stop = 0, 8

        def batch(self):
            return None, None

        def train_step(self, images, tokens):
            self.step += 1

        def log_media(self, logger, images):
            pass

        def epoch_ends(self):
            return self.step % 4 == 0  # 4 steps an epoch, a checkpoint every 2

        def evaluate_epoch(self, logger):
            calls.append(("evaluate, then save last.pt", self.step))

        def save(self, path):
            calls.append((f"save {path.name}", self.step))

    monkeypatch.setattr(multimodal, "job_dir", lambda: tmp_path)
    multimodal.train(Run(), logger=None)
    assert calls == [("save last.pt", 2), ("evaluate, then save last.pt", 4),
                     ("save last.pt", 6), ("evaluate, then save last.pt", 8)]  # fmt: skip
