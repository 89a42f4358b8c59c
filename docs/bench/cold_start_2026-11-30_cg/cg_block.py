"""Experiment only (session 2026-11-30f): train.py with per-block CUDA graphs allowed on one GPU, which the run
config refuses (run_config.check_cuda_graphs_placement) because under DDP they trained nothing. Not a product path."""
import runpy
import sys

import deepseek_mini.training.run_config as rc

rc.check_cuda_graphs_placement = lambda *args, **kwargs: None
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
