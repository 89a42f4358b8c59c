"""Evaluate a checkpoint: `python eval.py ckpt_path=<run>/checkpoints/last.ckpt [data.val_files=...]`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepseek_mini.training import presets  # noqa: F401  (registers model=<preset> before Hydra composes)
from deepseek_mini.training.reliability import cli_entry
from deepseek_mini.training.run import cli_errors, evaluate

CONFIGS = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@cli_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    cli_entry(main, CONFIGS, "eval")()
