"""Evaluate a checkpoint: `python eval.py ckpt_path=<run>/checkpoints/last.ckpt [data.val_files=...]`."""

import hydra
from omegaconf import DictConfig

from deepseek_mini.training.run import cli_errors, evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@cli_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
