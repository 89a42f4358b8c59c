"""Run train.py as `python train.py <args>` would, and write torch.compile's per-phase times at exit
(TIMES_OUT=<file>); with PROF_VAL=<file>, the validation before fit runs under cProfile (top 60 by cumulative).
SAMPLE_OUT=<file.json.gz>: a wall-clock sampler of the main thread's Python stack every 5 ms, from here to exit
(each sample: seconds since the process launch, seconds it stands for, stack id)."""
import atexit
import cProfile
import io
import os
import pstats
import runpy
import sys
import threading
import time

if os.environ.get("SAMPLE_OUT"):
    import gzip
    import json

    def _age():
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return up - int(fields[19]) / os.sysconf("SC_CLK_TCK")

    _t0 = time.perf_counter() - _age()
    _main = threading.main_thread().ident
    _ids, _stacks, _samples, _stop = {}, [], [], threading.Event()

    def _name(co):
        fn = co.co_filename
        for cut in ("site-packages/", "/work/", "/main/"):
            if cut in fn:
                fn = fn.split(cut, 1)[1]
                break
        return f"{fn}:{co.co_name}"

    def _sample():
        last = time.perf_counter()
        while not _stop.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            f = sys._current_frames().get(_main)
            st = []
            while f is not None:
                st.append(_name(f.f_code))
                f = f.f_back
            key = ";".join(reversed(st))
            i = _ids.get(key)
            if i is None:
                i = _ids[key] = len(_stacks)
                _stacks.append(key)
            _samples.append((round(now - _t0, 4), round(now - last, 4), i))
            last = now

    threading.Thread(target=_sample, daemon=True).start()

    def _dump_samples():
        _stop.set()
        with gzip.open(os.environ["SAMPLE_OUT"], "wt") as f:
            json.dump({"stacks": _stacks, "samples": _samples}, f)

    atexit.register(_dump_samples)

if os.environ.get("COMPILE_LOG"):  # every Triton compile in this process: when, which thread, which kernel, how long
    import triton
    import triton.compiler as tc
    import triton.compiler.compiler as tcc

    _orig_compile = tcc.compile
    _log = open(os.environ["COMPILE_LOG"], "w", buffering=1)
    with open("/proc/self/stat") as _f, open("/proc/uptime") as _u:
        _t0c = time.perf_counter() - (float(_u.read().split()[0])
                                      - int(_f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK"))

    def _logged_compile(src, *a, **k):
        t = time.perf_counter()
        try:
            return _orig_compile(src, *a, **k)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", None) or str(getattr(src, "name", src))[:60]
            _log.write(f"{t - _t0c:8.2f} {time.perf_counter() - t:6.2f} {threading.current_thread().name} {name}\n")

    tc.compile = tcc.compile = triton.compile = _logged_compile

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
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
