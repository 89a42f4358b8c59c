"""Every config option composes; model=<preset> is exactly the preset; bad model values fail early."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import CONFIGS
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from deepseek_mini.config import PRESETS, ConfigError, ModelConfig
from deepseek_mini.training.run import model_config_from, resolve_precision

# the YAML groups under configs/, and `model`, whose options are the presets (deepseek_mini/training/presets.py)
GROUPS = sorted([p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("hydra", "local")] + ["model"])


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _resolve(cfg) -> dict:
    """Resolve everything but the hydra node (its job fields exist only inside a running job)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def _options(group: str) -> list[str]:
    if group == "model":
        return sorted(PRESETS)
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group_option", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group_option, tmp_path):
    overrides = [group_option, f"paths.output_dir={tmp_path}"]
    if group_option.startswith("hparams_search="):  # optional group: `+hparams_search=...`, needs the [hpo] extra
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='pip install -e ".[hpo]"')
        overrides[0] = "+" + group_option
    if group_option.startswith("data=") and group_option not in ("data=stdlib", "data=gutenberg"):
        overrides.append("data.train_files=x.txt" if group_option == "data=text" else "data.hub_name=some/dataset")
    cfg = _compose("train", overrides)
    resolved = _resolve(cfg)
    assert resolved["model"]["hidden_size"] > 0
    model_config_from(cfg)  # every composed model config is valid


@pytest.mark.parametrize("name", ["train", "eval"])
def test_top_level_configs_compose(name, tmp_path):
    overrides = [f"paths.output_dir={tmp_path}"] + (["ckpt_path=x.ckpt"] if name == "eval" else [])
    cfg = _compose(name, overrides)
    _resolve(cfg)
    assert cfg.hydra.job.chdir is False
    hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert "%f" in hydra_node["run"]["dir"] and "%f" in hydra_node["sweep"]["dir"]  # microsecond timestamps
    assert hydra_node["sweep"]["subdir"] == "${hydra.job.num}"


def test_default_train_config_is_tiny_on_stdlib(tmp_path):
    cfg = _compose("train", [f"paths.output_dir={tmp_path}"])
    assert model_config_from(cfg) == ModelConfig.preset("tiny")
    assert cfg.data.source == "stdlib"
    assert cfg.trainer.use_distributed_sampler is False
    assert set(cfg.logger) == {"wandb", "csv"} and cfg.logger.wandb.offline is True


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_option_composes_to_the_preset(name, tmp_path):
    """`model=<preset>` composes to exactly ModelConfig.preset(<preset>), every field listed flat."""
    cfg = _compose("train", [f"model={name}", f"paths.output_dir={tmp_path}"])
    data = OmegaConf.to_container(cfg.model, resolve=True)
    assert set(data) == {f.name for f in dataclasses.fields(ModelConfig)}, "every field listed, flat"
    assert ModelConfig.from_dict(data) == ModelConfig.preset(name)
    assert ModelConfig.from_dict(data).to_dict() == ModelConfig.preset(name).to_dict()
    assert model_config_from(cfg) == ModelConfig.preset(name)


def test_every_preset_is_a_model_option_and_nothing_else():
    assert {n.removesuffix(".yaml") for n in ConfigStore.instance().list("model")} == set(PRESETS)
    assert not (CONFIGS / "model").exists(), "one source: the presets, not YAML copies"


def test_model_overrides_reach_model_config(tmp_path):
    cfg = _compose("train", [f"paths.output_dir={tmp_path}", "model.kv_lora_rank=64", "model.n_routed_experts=16",
                             "model.num_experts_per_tok=2", "model.attention=mha", "trainer.max_steps=7",
                             "data.seq_len=64", "data.batch_size=3", "seed=5", "ckpt_path=a.ckpt"])
    mc = model_config_from(cfg)
    assert (mc.kv_lora_rank, mc.n_routed_experts, mc.num_experts_per_tok, mc.attention) == (64, 16, 2, "mha")
    assert (cfg.trainer.max_steps, cfg.data.seq_len, cfg.data.batch_size, cfg.seed, cfg.ckpt_path) == (
        7, 64, 3, 5, "a.ckpt")
    assert cfg.data.vocab_size == mc.vocab_size  # the tokenizer is trained to the model's vocab


@pytest.mark.parametrize("override", ["model.kv_lora_rank=0", "model.num_experts_per_tok=9",
                                      "model.attention=flash", "model.qk_rope_head_dim=15"])
def test_bad_model_value_is_config_error(override, tmp_path):
    cfg = _compose("train", [f"paths.output_dir={tmp_path}", override])
    with pytest.raises(ConfigError):
        model_config_from(cfg)


def test_precision_auto():
    assert resolve_precision({"precision": "auto", "accelerator": "cpu"}) == "32-true"
    assert resolve_precision({"precision": "16-mixed"}) == "16-mixed"


def test_cli_bad_model_value_fails_cleanly_before_data(tmp_path, capsys, monkeypatch):
    from conftest import run_script_inprocess

    code, _, err = run_script_inprocess("train.py", ["model.num_experts_per_tok=16", f"hydra.run.dir={tmp_path}/run",
                                                     f"paths.cache_dir={tmp_path}/cache"], capsys, monkeypatch)
    assert code == 2, err[-2000:]
    assert "error: model.num_experts_per_tok=16" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cache").exists(), "validation must happen before any data preparation"


def teardown_module():
    GlobalHydra.instance().clear()


def _readme_layout() -> tuple[dict[str, str], str]:
    """README's "Configuration layout": {group folder: its row's options cell} and the "Top-level keys" paragraph."""
    text = (CONFIGS.parent / "README.md").read_text().split("## Configuration layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            first, options = line.split("|")[1:3]
            for group in first.replace("`", "").replace(" ", "").split(","):
                rows[group.strip("/")] = options
    return rows, text.split("Top-level keys:", 1)[1].split("\n\n", 1)[0]


def test_the_readme_table_names_every_group_option_and_top_level_key():
    """The table is where a user learns what `group=option` exists: every YAML option of every group (nested
    groups such as hydra/launcher included) and every top-level key of train.yaml is in it."""
    rows, keys = _readme_layout()
    missing = []
    for folder in sorted(p for p in CONFIGS.rglob("*") if p.is_dir() and p.name != "local"):
        group = folder.relative_to(CONFIGS).as_posix()
        for option in sorted(p.stem for p in folder.glob("*.yaml")):
            if f"`{option}`" not in rows.get(group, ""):
                missing.append(f"{group}={option}")
    assert not missing, f"not in README's configuration table: {missing}"
    train = OmegaConf.load(CONFIGS / "train.yaml")
    unnamed = [k for k in train if k != "defaults" and f"`{k}`" not in keys]
    assert not unnamed, f"top-level keys of train.yaml not named under 'Top-level keys': {unnamed}"


@pytest.mark.parametrize("name", ["train", "eval"])
def test_a_local_config_is_applied_as_top_level_keys(name, tmp_path):
    """configs/local/default.yaml (git-ignored, machine-specific) holds top-level keys as train.yaml does: a plain
    `seed: 99` there sets the seed (it used to land under a `local:` node and change nothing)."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs, ignore=shutil.ignore_patterns("local"))
    (configs / "local").mkdir()
    (configs / "local" / "default.yaml").write_text("seed: 99\npaths:\n  data_dir: /somewhere/else\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[f"paths.output_dir={tmp_path}"])
    assert cfg.seed == 99 and cfg.paths.data_dir == "/somewhere/else" and "local" not in cfg
