"""Where a run's wait for its first optimizer step goes: train.py under a wall-clock sampler.

    python scripts/bench/startup_profile.py [--out DIR] [--interval 0.005] [--top 12] -- <train.py overrides>
    python scripts/bench/startup_profile.py --out /tmp/prof -- experiment=small_gpu trainer.max_steps=5 logger=csv

train.py runs in this process (its Hydra entry point, with these overrides) while a thread reads the main thread's
Python stack every `--interval` seconds; every Triton compile of the process is logged too (when, on which thread,
which kernel, how long). When the run ends, it prints for each stage of the run (results.json's `startup_sec`:
start-up, data, model, validation; then fit() up to the first optimizer step) the functions that held the most
wall time and what the main thread was doing at the bottom of its stack, and writes DIR/samples.json.gz (every
sample: seconds since the launch, seconds it stands for, stack id; the stacks), DIR/triton.txt and
DIR/summary.txt.

A sampler rather than cProfile: cProfile slows Python code about twofold and counts calls, not the wall clock
(imports, waits for a compiler process or for the GPU); the sampler costs ~1% and counts time where it went.
Work on other threads and processes is not sampled, only the main thread's wait for it: Inductor's compile
workers show as `threading.py:wait` under `async_compile`, the compiled backward (on autograd's thread) as
`_engine_run_backward`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import runpy
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Sampler:
    """The main thread's stack every `interval` seconds. Samples keep the raw perf_counter() time; `t0` (the process
    launch on that clock, set once deepseek_mini's job clock is importable) turns them into results.json's time."""

    def __init__(self, interval: float):
        self.t0 = time.perf_counter()  # until set_launch()
        self.interval, self.main = interval, threading.main_thread().ident
        self.ids: dict[str, int] = {}
        self.stacks: list[str] = []
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="startup-sampler", daemon=True)

    @staticmethod
    def _name(code) -> str:
        path = code.co_filename
        for cut in ("site-packages/", f"{REPO}/"):
            if cut in path:
                path = path.split(cut, 1)[1]
                break
        return f"{path}:{code.co_name}"

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            frame, names = sys._current_frames().get(self.main), []
            while frame is not None:
                names.append(self._name(frame.f_code))
                frame = frame.f_back
            key = ";".join(reversed(names))
            if key not in self.ids:
                self.ids[key] = len(self.stacks)
                self.stacks.append(key)
            self.samples.append((now, round(now - last, 4), self.ids[key]))
            last = now

    def start(self) -> None:
        self._thread.start()

    def set_launch(self, age: float | None) -> None:
        """The process is `age` seconds old now (None: unknown, count from the sampler's start)."""
        if age is not None:
            self.t0 = time.perf_counter() - age

    def timed_samples(self) -> list[tuple[float, float, int]]:
        """(seconds since the launch, seconds the sample stands for, stack id) of every sample."""
        return [(round(t - self.t0, 4), dt, i) for t, dt, i in self.samples]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def log_triton_compiles(path: Path, t0: float):
    """Wrap Triton's compiler so each compile in this process is a line of `path`; the file, or None without Triton."""
    try:
        import triton
        import triton.compiler as tc
        import triton.compiler.compiler as tcc
    except ImportError:
        return None
    out, compile_ = open(path, "w", buffering=1), tcc.compile

    def logged(src, *args, **kwargs):
        start = time.perf_counter()
        try:
            return compile_(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", None) or str(getattr(src, "name", src))[:60]
            out.write(f"{start - t0:8.2f} s  {time.perf_counter() - start:6.2f} s  "
                      f"{threading.current_thread().name:28s} {name}\n")

    tc.compile = tcc.compile = triton.compile = logged
    return out


def stage_bounds(result: dict) -> list[tuple[str, float]]:
    """(stage, its end in seconds since the launch) from a results.json: the stages before fit(), then fit() up to
    the first step."""
    bounds, end = [], 0.0
    for stage, secs in (result.get("startup_sec") or {}).items():
        end += secs
        bounds.append((stage, end))
    first = result.get("time_to_first_step_sec")
    if first is not None:
        bounds.append(("fit, to the first step", first))
    return bounds


def _ours(stack: list[str]) -> str:
    """The innermost frame of this repository's code in a stack (the library code it called is below it)."""
    return next((f for f in reversed(stack) if f.startswith(("deepseek_mini/", "train.py", "eval.py"))), "-")


def summarise(sampler: Sampler, bounds: list[tuple[str, float]], top: int, min_run: float = 0.2) -> str:
    """Per stage: where our code was when the time went (its innermost frame), what the main thread was doing at
    the bottom of its stack, and a timeline of the stretches of at least `min_run` seconds in one function of ours
    (with the bottom frame seen most in each)."""
    stacks = [s.split(";") for s in sampler.stacks]
    ours = collections.defaultdict(collections.Counter)
    leaves = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    runs = collections.defaultdict(list)  # stage -> [start, seconds, our frame, Counter of leaves]
    for t, dt, i in sampler.timed_samples():
        stage = next((name for name, end in bounds if t <= end), None)
        if stage is None:
            continue
        frame, leaf = _ours(stacks[i]), stacks[i][-1] if stacks[i] else "-"
        total[stage] += dt
        ours[stage][frame] += dt
        leaves[stage][leaf] += dt
        if runs[stage] and runs[stage][-1][2] == frame:
            runs[stage][-1][1] += dt
        else:
            runs[stage].append([t - dt, dt, frame, collections.Counter()])
        runs[stage][-1][3][leaf] += dt
    lines = []
    for stage, end in bounds:
        lines.append(f"== {stage} (until {end:.1f} s after the launch): {total[stage]:.2f} s sampled")
        lines.append("   in our code (innermost function):")
        lines += [f"   {s:6.2f} s  {f}" for f, s in ours[stage].most_common(top)]
        lines.append("   at the bottom of the stack:")
        lines += [f"   {s:6.2f} s  {f}" for f, s in leaves[stage].most_common(top // 2)]
        long = [r for r in runs[stage] if r[1] >= min_run]
        if long:
            lines.append(f"   timeline (stretches of {min_run} s or more in one function of ours):")
            lines += [f"   {t:6.2f} s +{d:5.2f} s  {f}  [{c.most_common(1)[0][0]}]" for t, d, f, c in long]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="startup_profile", help="folder for samples.json.gz, triton.txt, summary.txt")
    p.add_argument("--interval", type=float, default=0.005, help="seconds between samples")
    p.add_argument("--top", type=int, default=12, help="functions shown per stage")
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sampler = Sampler(args.interval)
    sampler.start()  # before any import: the imports are the start-up being measured
    sys.path.insert(0, str(REPO))
    import deepseek_mini.training.train as training
    from deepseek_mini.training.startup import process_age  # the clock results.json counts on

    sampler.set_launch(process_age())
    triton_log = log_triton_compiles(out / "triton.txt", sampler.t0)

    captured: dict = {}
    report = training.report

    def report_and_keep(parts, res):  # the results.json of the run, as written
        captured.update(res)
        return report(parts, res)

    training.report = report_and_keep
    sys.argv = [str(REPO / "train.py"), *overrides]
    code = 0
    try:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sampler.stop()
        training.report = report
        if triton_log is not None:
            triton_log.close()
    with gzip.open(out / "samples.json.gz", "wt") as f:
        json.dump({"stacks": sampler.stacks, "samples": sampler.timed_samples()}, f)
    if not captured:
        print(f"startup_profile: the run wrote no results (exit status {code}); samples in {out}", file=sys.stderr)
        return code or 1
    text = summarise(sampler, stage_bounds(captured), args.top)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"samples, Triton compiles and this summary: {out}/")
    return code


if __name__ == "__main__":
    sys.exit(main())
