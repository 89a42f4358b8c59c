"""The optimizer and its precision policy: plain PyTorch (and the Triton kernels), no Lightning.

* adamw.py      TritonAdamW: torch's AdamW with a one-pass Triton step, bf16 moments, fp32 masters
* policy.py     which AdamW `optim.fused` names, how its moments are stored, the weight-decay groups
* precision.py  `optim.bf16_weights`: which weights live in bf16 with fp32 masters in the optimizer
* schedule.py   learning-rate schedules (warmup + cosine, DeepSeek's steps, constant)
* clip.py       gradient norms and clipping folded into the fused step

training/module.py (LitDeepSeek) puts these together; scripts/bench/bench_train.py uses them without Lightning.
"""
