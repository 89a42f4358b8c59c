"""Run train.py as `python train.py <args>` would, and write torch.compile's per-phase times at exit
(TIMES_OUT=<file>); with PROF_VAL=<file>, the validation before fit runs under cProfile (top 60 by cumulative)."""
import atexit
import cProfile
import io
import os
import pstats
import runpy
import sys

if os.environ.get("NO_PW_AUTOTUNE"):  # one Triton config per pointwise kernel (no compile-and-benchmark of 2-3)
    import torch._inductor.config as inductor_config

    inductor_config.triton.autotune_pointwise = False

if os.environ.get("PROF_VAL"):
    import deepseek_mini.training.train as T

    orig = T.validate_before_fit

    def profiled(*a, **k):
        pr = cProfile.Profile()
        pr.enable()
        try:
            return orig(*a, **k)
        finally:
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
            s2 = io.StringIO()
            pstats.Stats(pr, stream=s2).sort_stats("tottime").print_stats(30)
            open(os.environ["PROF_VAL"], "w").write(s.getvalue() + "\n\n" + s2.getvalue())

    T.validate_before_fit = profiled


def dump():
    if os.environ.get("TIMES_OUT"):
        import torch._dynamo.utils as u
        open(os.environ["TIMES_OUT"], "w").write(str(u.compile_times(repr="str", aggregate=True)))


atexit.register(dump)
script = os.environ.get("TRAIN_PY", "train.py")
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
