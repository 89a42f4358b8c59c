"""Train deepseek-mini: `python train.py [overrides]`, `python train.py -m <sweep>`. See README.md."""

import signal
import sys


def interrupted_while_starting(signum, frame):
    """SIGTERM during the imports and checks below (seconds, before anything is written): one line and rc 143, as
    later, instead of a silent kill. cli_entry hands SIGTERM back to the default before Hydra runs."""
    print("interrupted (SIGTERM) before training started: nothing was trained or saved", file=sys.stderr)
    raise SystemExit(143)


if __name__ == "__main__" and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # a caller's handler or SIG_IGN is kept
    signal.signal(signal.SIGTERM, interrupted_while_starting)

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
    cli_entry(main, CONFIGS, "train", starting=interrupted_while_starting)()
