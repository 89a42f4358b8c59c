"""Train deepseek-mini: `python train.py [overrides]`, `python train.py -m <sweep>`. See README.md."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepseek_mini.training.reliability import cli_entry
from deepseek_mini.training.run import cli_errors, train

CONFIGS = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@cli_errors
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    # the Optuna sweeper (configs/hparams_search/) minimizes what the task returns: `optimized_metric`
    metric = cfg.get("optimized_metric")
    if not metric or not isinstance(results, dict):
        return None
    value = results.get(metric)
    return float("inf") if value is None or value != value else float(value)  # NaN/None would crash Optuna


if __name__ == "__main__":
    cli_entry(main, CONFIGS, "train")()
