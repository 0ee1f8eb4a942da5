"""Every primary config composes, presets and launchers compose, typos are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from experiments.schemas import register_configs

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture
def compose_cfg():
    register_configs()

    def _compose(name: str, overrides: list[str] | None = None, hydra: bool = False):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(name, overrides=overrides or [], return_hydra_config=hydra)

    yield _compose
    GlobalHydra.instance().clear()


def test_rank_sweep_defaults(compose_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg("rank_sweep")
    assert cfg.rank == 8 and cfg.seed == 0 and cfg.weight.seed == 0
    assert cfg.model.structure == "butterfly"
    assert cfg.train.lr == pytest.approx(1e-2) and cfg.train.batch_size == 32
    assert cfg.logger.mode == "offline" and cfg.logger.project == "ks-rank-sweep"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_wandb_mode_from_environment(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_cfg("rank_sweep").logger.mode == "disabled"
    assert compose_cfg("rank_sweep", ["logger=online"]).logger.mode == "online"


@pytest.mark.parametrize(
    "override",
    ["trian.lr=1", "train.learning_rate=1", "logger.modee=online", "weight.outfeatures=3"],
)
def test_mistyped_key_is_an_error(compose_cfg, override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("rank_sweep", [override])


def test_wrong_type_is_an_error(compose_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg("rank_sweep", ["rank=eight"])


def test_presets(compose_cfg):
    demo = compose_cfg("rank_sweep", ["experiment=demo"], hydra=True)
    assert demo.weight.out_features == 256 and demo.weight.in_features == 512
    assert demo.hydra.sweeper.params.rank == "8,32,128"
    old = compose_cfg("rank_sweep", ["experiment=old_default"], hydra=True)
    assert old.hydra.sweeper.params.rank == "2,4,8,16,32,64,128,256,512"


@pytest.mark.parametrize("launcher", ["joblib", "local", "slurm", "submitit_local"])
def test_launchers_compose(compose_cfg, launcher):
    cfg = compose_cfg("rank_sweep", [f"hydra/launcher={launcher}"], hydra=True)
    assert "_target_" in cfg.hydra.launcher
    if launcher == "slurm":
        assert cfg.hydra.launcher.array_parallelism == 64
        assert cfg.hydra.launcher.gpus_per_node is None  # a GPU only where asked (slurm_gpu)


def test_output_folders_are_unique_per_launch(compose_cfg):
    cfg = compose_cfg("rank_sweep", hydra=True)
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    # microseconds in the folder name: two launches in the same second do not collide
    assert raw["run"]["dir"].endswith("%f}") and raw["sweep"]["dir"].endswith("%f}")


def test_laplace_scaling_defaults_and_grid(compose_cfg):
    cfg = compose_cfg("laplace_scaling")
    assert cfg.runner == "cell" and cfg.logger.project == "laplace-scaling-phase2"
    assert list(cfg.grid.batch_sizes) == [8, 16, 32, 64, 128, 256, 512]
    assert len(cfg.grid.lrs) == 7 and min(cfg.grid.lrs) == 3e-5 and max(cfg.grid.lrs) == 1e-2
    assert cfg.optim.weight_decay == 0 and cfg.train.protocol == "fixed_epochs"
    grid = compose_cfg("laplace_scaling", ["experiment=scaling_grid"], hydra=True)
    assert grid.hydra.sweeper.params.seed == "0,1,2"
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("laplace_scaling", ["optim.nmae=sgd"])
