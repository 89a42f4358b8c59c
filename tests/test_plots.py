"""Plots that compare: fixed heatmap scale, loss curves on one x range with step 0 and seed bands, the
KV-cache chart with checkpoint losses, sweep_report on a bad directory. Checked on the figure objects."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deepseek_mini.analysis.sweep_plots import plot_curves  # noqa: E402
from deepseek_mini.analysis.sweep_report import Job, _split_overrides, main  # noqa: E402
from deepseek_mini.training.callbacks import HEATMAP_RANGE, expert_heatmap_figure  # noqa: E402


def test_heatmap_colour_scale_is_fixed():
    """Two validations with different spreads map the same load ratio to the same colour."""
    mild = torch.tensor([[10.0, 12.0, 8.0, 10.0]])
    wild = torch.tensor([[0.0, 40.0, 0.0, 0.0]])
    for load in (mild, wild):
        fig = expert_heatmap_figure(load, [1], "t")
        im = fig.axes[0].images[0]
        assert (im.norm.vmin, im.norm.vmax) == HEATMAP_RANGE
        w, h = fig.get_size_inches()
        assert w >= 7 and h >= 3  # readable, not 400x225 pixels
        plt.close(fig)
    big = expert_heatmap_figure(torch.rand(2, 160), [1, 2], "t")
    assert big.get_size_inches()[0] <= 14
    plt.close(big)


def _job(name, seed, rank, train, val):
    j = Job(name=name, path=Path("."))
    j.overrides = [f"seed={seed}", f"model.kv_lora_rank={rank}"]
    j.swept = _split_overrides(j.overrides)
    j.results = {"val_loss": val[-1][1], "config": {"kv_lora_rank": rank}}
    j.train_curve, j.val_curve = train, val
    return j


def test_loss_curves_share_x_range_show_step0_and_seed_band(tmp_path, captured):
    jobs = [_job(str(i), seed, 16, [(4096.0, 7.0 + 0.1 * seed)], [(0.0, 8.3 + 0.01 * seed), (4096.0, 6.9 + 0.1 * seed)])
            for i, seed in enumerate((1, 2, 3))]
    assert plot_curves(jobs, ["seed", "kv_lora_rank"], tmp_path / "c.png")
    fig = captured[0]
    train_ax, val_ax = fig.axes[:2]
    assert train_ax.get_xlim() == val_ax.get_xlim() and train_ax.get_xlim()[0] == 0
    lo, hi = val_ax.get_ylim()
    assert lo <= 6.9 + 0.1 and hi >= 8.33, "the step-0 validation point is inside the axis"
    # one training point (few steps) still draws a visible marker
    (train_line,) = train_ax.get_lines()
    assert train_line.get_marker() == "o" and len(train_line.get_xdata()) == 1
    # three seeds of one config: one mean line and a min-max band
    assert len(val_ax.get_lines()) == 1 and val_ax.collections, "seed band"
    assert "3 seeds" in val_ax.get_lines()[0].get_label()


def test_kv_cache_plot_shows_checkpoint_losses(tmp_path, captured):
    from deepseek_mini.analysis.kv_cache import kv_cache_table, plot_kv_cache, with_attention
    from deepseek_mini.config import ModelConfig

    rows = kv_cache_table({f"tiny/{a}": with_attention(ModelConfig.preset("tiny"), a, 2) for a in ("mha", "mla")})
    plot_kv_cache(rows, tmp_path / "a.png")
    assert len(captured[-1].axes) == 1
    ck = [{**rows[0], "label": "runA", "val_loss": 4.61}, {**rows[1], "label": "runB", "val_loss": 4.62}]
    plot_kv_cache(rows, tmp_path / "b.png", checkpoints=ck)
    ax_ck = captured[-1].axes[1]
    points = sorted(tuple(p) for c in ax_ck.collections for p in c.get_offsets())
    assert points == sorted((float(r["bytes_per_token_bf16"]), r["val_loss"]) for r in ck)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_sweep_report_on_a_bad_directory_is_one_line(make, tmp_path, capsys):
    d = tmp_path / "sweep"
    if make == "empty":
        d.mkdir()
    assert main([str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: sweep_dir={d}: ")


def test_heatmap_of_the_validation_before_training_waits_for_the_first_step(tmp_path):
    """The validation before fit is drawn after the first optimizer step (its ~0.5 s of matplotlib is not part of the
    wait for it), then every validation at once, in step order; a fit that ends (or fails) first still draws it."""
    from types import SimpleNamespace

    from deepseek_mini.training.callbacks import ExpertLoadHeatmap

    module = SimpleNamespace(config=SimpleNamespace(moe_layer_indices=[1, 2]), val_expert_load=torch.rand(2, 8) + 0.5)
    trainer = SimpleNamespace(global_step=0, training=False, sanity_checking=False, default_root_dir=str(tmp_path),
                              loggers=[])
    cb = ExpertLoadHeatmap()
    cb.on_validation_end(trainer, module)
    assert not (tmp_path / "expert_load.png").exists() and cb.history == []
    trainer.training = True
    cb.on_train_batch_start(trainer, module, None, 0)  # the first step starts: still waiting
    assert cb.history == []
    trainer.global_step = 1
    cb.on_train_batch_start(trainer, module, None, 1)  # the first step is done
    assert (tmp_path / "expert_load.png").is_file() and [row[0] for row in cb.history] == [0]
    trainer.global_step, trainer.training = 50, False
    cb.on_validation_end(trainer, module)
    assert [row[0] for row in cb.history] == [0, 50]

    for end in ("on_fit_end", "on_exception"):  # no second step: the end of the fit draws it
        cb = ExpertLoadHeatmap()
        trainer.global_step = 0
        cb.on_validation_end(trainer, module)
        getattr(cb, end)(trainer, module, *([RuntimeError()] if end == "on_exception" else []))
        assert [row[0] for row in cb.history] == [0]
