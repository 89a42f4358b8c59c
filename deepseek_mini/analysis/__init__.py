"""Reports computed from configs, checkpoints and finished runs (no training here).

* kv_cache.py       KV-cache bytes per token for MHA / GQA / MQA / MLA: the table, the plot, the measurement
* sweep_report.py   multirun directories -> report.md and its plots (sweep_plots.py), every job listed
"""
