"""Every primary config composes, presets and launchers compose, typos are errors."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from experiments.runtime import check_override_keys
from experiments.schemas import (
    LaplaceScalingConfig,
    LoggerConfig,
    MultimodalConfig,
    RankSweepConfig,
    register_configs,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SCHEMAS = {
    "rank_sweep": RankSweepConfig,
    "laplace_scaling": LaplaceScalingConfig,
    "multimodal": MultimodalConfig,
}
# the entry point each preset in conf/experiment/ is written for
PRESETS = {
    "demo": "rank_sweep",
    "old_default": "rank_sweep",
    "scaling_grid": "laplace_scaling",
    "multimodal_large": "multimodal",
}


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


# -- one home per default ---------------------------------------------------------------------


def leaves(tree: dict, prefix: str = "") -> dict:
    """``{dotted.key: value}`` for every leaf of a nested dict (a list is one leaf)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def own_leaves(path: Path) -> dict:
    """The values a YAML file sets itself: not its defaults list, not Hydra's own section."""
    raw = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in leaves(raw).items() if not k.startswith(("defaults", "hydra"))}


def repeated(own: dict, reference) -> list[str]:
    """The keys of ``own`` whose value ``reference`` (a config) already holds."""
    ref = leaves(OmegaConf.to_container(reference, resolve=False, enum_to_str=True))
    return [k for k, v in own.items() if k in ref and ref[k] == v and type(ref[k]) is type(v)]


def test_the_repeat_check_finds_a_repeated_default():
    schema = OmegaConf.structured(RankSweepConfig)
    own = {"rank": 8, "model.structure": "butterfly", "train.lr": 0.01, "weight.seed": "${seed}"}
    assert repeated(own, schema) == ["rank", "model.structure", "train.lr"]
    assert repeated({"rank": 16, "train.num_epochs": 50.0}, schema) == []  # 50.0 is no int


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_no_primary_yaml_leaf_repeats_its_schema_default(name):
    own = own_leaves(Path(CONF) / f"{name}.yaml")
    assert repeated(own, OmegaConf.structured(SCHEMAS[name])) == []


def test_presets_set_only_what_differs(compose_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    presets = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
    assert presets == sorted(PRESETS), "map each preset to its entry point in PRESETS"
    for preset, entry in PRESETS.items():
        own = own_leaves(Path(CONF) / "experiment" / f"{preset}.yaml")
        assert repeated(own, compose_cfg(entry)) == [], preset
    for path in (Path(CONF) / "logger").glob("*.yaml"):
        assert repeated(own_leaves(path), OmegaConf.structured(LoggerConfig)) == [], path.name


# -- choices are Enums --------------------------------------------------------------------------


def enum_fields(node, prefix: str = "") -> list[tuple[str, type[Enum]]]:
    """``(key, Enum)`` for every field of a schema that holds a choice (or a list of them)."""
    found = []
    for key in node:
        child, name = node._get_node(key), f"{prefix}{key}"
        if isinstance(child, DictConfig):
            found += enum_fields(child, f"{name}.")
            continue
        kind = (
            child._metadata.element_type
            if isinstance(child, ListConfig)
            else child._metadata.ref_type
        )
        if isinstance(kind, type) and issubclass(kind, Enum):
            found.append((name, kind))
    return found


CHOICES = [
    (entry, key, kind)
    for entry, schema in SCHEMAS.items()
    for key, kind in enum_fields(OmegaConf.structured(schema))
]


def test_the_choices_found_are_the_schemas_enums():
    keys = {(entry, key) for entry, key, _ in CHOICES}
    assert {("rank_sweep", "model.structure"), ("laplace_scaling", "grid.noises"),
            ("multimodal", "loss.alignment"), ("rank_sweep", "logger.mode")} <= keys  # fmt: skip
    for _, _, kind in CHOICES:  # OmegaConf reads a member by its name: names are the values
        assert all(m.name == m.value and isinstance(m, str) for m in kind)


@pytest.mark.parametrize(("entry", "key", "kind"), CHOICES, ids=[f"{e}:{k}" for e, k, _ in CHOICES])
def test_a_bad_choice_is_an_error_naming_the_key_and_the_allowed_values(
    compose_cfg, capsys, entry, key, kind
):
    is_list = isinstance(OmegaConf.select(OmegaConf.structured(SCHEMAS[entry]), key), ListConfig)
    override = f"{key}=[nope]" if is_list else f"{key}=nope"
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(entry, [override])
    with pytest.raises(SystemExit) as exit_info:
        check_override_keys(SCHEMAS[entry], [override], f"conf/{entry}.yaml")
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    allowed = ", ".join(m.value for m in kind)
    assert line.startswith(f"error: {key} must be one of {allowed}, got "), line
    # a good member composes, and reads back as the plain string
    good = next(iter(kind)).value
    cfg = compose_cfg(entry, [f"{key}=[{good}]" if is_list else f"{key}={good}"])
    plain = OmegaConf.select(OmegaConf.create(OmegaConf.to_container(cfg, enum_to_str=True)), key)
    assert plain == ([good] if is_list else good)


def test_a_bad_choice_in_a_sweep_is_one_line_before_any_job(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_override_keys(RankSweepConfig, ["-m", "model.structure=butterfly,tree"], "here")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.structure must be one of butterfly, monarch, lowrank, got 'tree'"
    )


def test_records_get_the_choices_as_plain_strings(compose_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg("laplace_scaling", ["model.kind=mlp"])
    assert cfg.model.kind == "mlp" and isinstance(cfg.model.kind, Enum)  # code compares strings
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert type(plain["model"]["kind"]) is str and type(plain["grid"]["noises"][0]) is str
    assert type(plain["logger"]["mode"]) is str  # the interpolation from $WANDB_MODE too
    assert yaml.safe_load(yaml.safe_dump(plain))["model"]["kind"] == "mlp"  # config.yaml
