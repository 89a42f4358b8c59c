"""A quiet console: silence the library lines that say nothing about this run, each at its source.

`quiet_console()` is called once at the start of train(). What it hides, and why each is noise here:

* Lightning's "Tip: ... litlogger" advert (an info line on every Trainer construction), its TPU/HPU
  availability lines and its "`Trainer.fit` stopped: `max_steps=N` reached".
* Lightning's "you're resuming from a checkpoint that ended before the epoch ended and your dataloader is not
  resumable": our TextDataModule resumes exactly (its batches are a function of global_step, see
  deepseek_mini/data/datamodule.py), so the warning contradicts what happens.
* on a resume into the same run dir, Lightning's "Checkpoint directory ... exists and is not empty" and the
  CSV logger's "Previous log files in this directory will be deleted": continuing there is the point, and
  ResumableCSVLogger (loggers.py) keeps the earlier rows.
* torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside Lightning's own
  `_pytree` helper (nothing a user can change).
* matplotlib.font_manager's DEBUG lines (146 of them under debug=fdr, whose root log level is DEBUG).
* on a GPU (seen on an H200): Lightning's "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]" (once per fit and per
  validate), its "Precision bf16-mixed is not supported by the model summary" (the summary's size column says
  fp32 itself), its advice to set `torch.set_float32_matmul_precision` (the weight matrices run in bf16 under
  bf16-mixed, so there are no fp32 matmuls for TF32 to speed up), and datasets' "JAX version ... available".

The model summary's "Total FLOPs: 0" is handled by `ModelSummary` below (Lightning only counts FLOPs when a
module sets example_input_array; ours does not, so the 0 is meaningless). wandb's own console lines are
switched off in deepseek_mini/training/loggers.py (`logger.wandb.verbose`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import RichModelSummary


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


# the litlogger advert; the note that our ModelSummary replaces Lightning's default one
# the TPU/HPU availability lines (never present on the machines this targets), and "`Trainer.fit` stopped:
# `max_steps=N` reached" (the run summary says how many steps ran)
_LIGHTNING_NOISE = _DropMessages("litlogger", "already configured with model summary", "TPU available",
                                 "HPU available", "`Trainer.fit` stopped", "CUDA_VISIBLE_DEVICES",
                                 "set_float32_matmul_precision")


def quiet_console() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", message=r".*dataloader is\s+not resumable")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if _LIGHTNING_NOISE not in logger.filters:
            logger.addFilter(_LIGHTNING_NOISE)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if _LIGHTNING_NOISE not in handler.filters:
            handler.addFilter(_LIGHTNING_NOISE)
    logging.getLogger("matplotlib").setLevel(max(logging.INFO, logging.getLogger("matplotlib").level))
    logging.getLogger("PIL").setLevel(max(logging.INFO, logging.getLogger("PIL").level))
    logging.getLogger("datasets").setLevel(max(logging.WARNING, logging.getLogger("datasets").level))


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without the FLOPs column and its "Total FLOPs: 0" line.

    Lightning fills FLOPs only for modules with an `example_input_array`; the training FLOPs per token that
    MFU uses are analytic (deepseek_mini.config.flops_per_token) and logged by ThroughputMonitor instead.
    `enabled` follows trainer.enable_model_summary (configs/callbacks/default.yaml), which Lightning itself
    only applies to its default summary, not to one passed in as a callback.
    """

    @staticmethod
    def check_config_options(options: dict, key: str, model=None) -> None:
        """Value rules, run by the settings check before data preparation (run_config.check_node_options):
        Lightning's own max_depth rule, which it applied only when the summary was drawn, at the start of fit()."""
        from deepseek_mini.training.run_config import as_int

        as_int(f"{key}.max_depth", options.get("max_depth"), low=-1)

    def __init__(self, enabled: bool = True, max_depth: int = 1, **summarize_kwargs: Any):
        super().__init__(max_depth=max_depth if enabled else 0, **summarize_kwargs)  # depth 0 = prints nothing

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name not in ("FLOPs",)]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(f"params: {get_human_readable_count(int(trainable_parameters))} trainable, "
                      f"{get_human_readable_count(int(total_parameters))} total, "
                      f"{get_formatted_model_size(model_size)} MB (fp32)")
