"""Import time of what train.py imports before train() (deepseek_mini.training.run + hydra), with EXP_HIDE applied
as in wrap.py; prints seconds and which optional packages ended up imported."""
import os
import sys
import time

t = time.perf_counter()
hide = [x for x in os.environ.get("EXP_HIDE", "").split(",") if x]
if hide:
    import re

    import lightning_utilities.core.imports as li
    _pa, _rb = li.package_available, li.RequirementCache.__bool__
    li.package_available = lambda name: False if name.split(".")[0] in hide else _pa(name)
    def rc_bool(self):
        name = re.split(r"[<>=!~ \[]", (self.requirement or self.module or ""))[0]
        return False if name.split(".")[0] in hide else _rb(self)
    li.RequirementCache.__bool__ = rc_bool
import hydra  # noqa
import deepseek_mini.training.run  # noqa
print(f"import {time.perf_counter() - t:.2f} s; " + " ".join(f"{m}={m in sys.modules}" for m in
      ("transformers", "scipy", "sklearn", "pandas", "torchvision", "matplotlib")), flush=True)
