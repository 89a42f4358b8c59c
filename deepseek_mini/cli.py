"""Console entry points `deepseek-train` and `deepseek-eval` (same as `python train.py` / `python eval.py`).

They read the configs from the source checkout's configs/ directory, so use them from an editable install
(`pip install -e .`).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deepseek_mini.training import presets  # noqa: F401  (registers model=<preset> before Hydra composes)
from deepseek_mini.training.reliability import cli_entry
from deepseek_mini.training.run import cli_errors, evaluate, optimized_metric, train

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
@cli_errors
def _train_main(cfg: DictConfig) -> float | None:
    return optimized_metric(cfg, train(cfg))


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
@cli_errors
def _eval_main(cfg: DictConfig) -> None:
    evaluate(cfg)


# one-line errors for bad overrides, and `ckpt_path=last` without hydra.run.dir (see reliability.cli_entry)
train_main = cli_entry(_train_main, CONFIGS, "train")
eval_main = cli_entry(_eval_main, CONFIGS, "eval")
