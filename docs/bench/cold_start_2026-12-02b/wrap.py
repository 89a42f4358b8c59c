"""Diagnostic wrapper (device calls only, not part of the project): runs train.py; at the first optimizer step
writes the cold-start figures and torch's per-phase compile times to $DIAG_OUT and exits (os._exit).
EXP_HIDE=a,b,...: those packages reported as not installed by the availability checks torchmetrics asks
(lightning_utilities' package_available / RequirementCache), as in an environment without them. Calls 2-3 ran it
from the repository root as .gpu/wrap.py."""
import json
import os
import runpy
import sys

hide = [x for x in os.environ.get("EXP_HIDE", "").split(",") if x]
if hide:  # simulate an environment without these optional packages: torchmetrics' availability checks say no
    import re

    import lightning_utilities.core.imports as li
    _pa, _rb = li.package_available, li.RequirementCache.__bool__

    def package_available(name):
        return False if name.split(".")[0] in hide else _pa(name)

    def rc_bool(self):
        name = re.split(r"[<>=!~ \[]", (self.requirement or self.module or ""))[0]
        return False if name.split(".")[0] in hide else _rb(self)
    li.package_available, li.RequirementCache.__bool__ = package_available, rc_bool
from deepseek_mini.training import callbacks as cb  # noqa: E402
from deepseek_mini.training import startup  # noqa: E402

_orig_end = cb.ThroughputMonitor.on_train_batch_end
_marks = {}


def on_end(self, trainer, pl_module, outputs, batch, batch_idx):
    first = self.time_to_first_step is None
    _orig_end(self, trainer, pl_module, outputs, batch, batch_idx)
    if first and self.time_to_first_step is not None:
        import torch._dynamo.utils as du
        out = {"time_to_first_step": self.time_to_first_step, "fit_to_first_step": self.fit_to_first_step,
               "compile": self.compile_time, "graphs": self.graphs, "stages": startup.stage_seconds(),
               "spent": du.calculate_time_spent(),
               "metrics": {k: [round(float(x), 4) for x in v] for k, v in du.compilation_time_metrics.items()},
               "counters": {k: dict(v) for k, v in du.counters.items()}, "marks": _marks}
        print(f"DIAG first step {self.time_to_first_step:.2f} s stages {out['stages']} fit {self.fit_to_first_step:.2f}"
              f" compile {self.compile_time:.2f} graphs {self.graphs}", flush=True)
        if os.environ.get("DIAG_OUT"):
            json.dump(out, open(os.environ["DIAG_OUT"], "w"), indent=1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


cb.ThroughputMonitor.on_train_batch_end = on_end
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
