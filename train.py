"""Train deepseek-mini: `python train.py [overrides]`, `python train.py -m <sweep>`. See README.md."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepseek_mini.training import presets  # noqa: F401  (registers model=<preset> before Hydra composes)
from deepseek_mini.training.reliability import cli_entry
from deepseek_mini.training.run import cli_errors, optimized_metric, train

CONFIGS = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@cli_errors
def main(cfg: DictConfig) -> float | None:
    return optimized_metric(cfg, train(cfg))  # what an Optuna sweep (configs/hparams_search/) minimizes


if __name__ == "__main__":
    cli_entry(main, CONFIGS, "train")()
