"""Train deepseek-mini: `python train.py [overrides]`, `python train.py -m <sweep>`. See README.md."""

import hydra
from omegaconf import DictConfig

from deepseek_mini.training.run import cli_errors, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@cli_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
