"""Sweep report: `python scripts/sweep_report.py <multirun dir> [more dirs]` -> <first dir>/report.md + PNGs.

See deepseek_mini/analysis/sweep_report.py (the library code, importable by tests).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from deepseek_mini.analysis.sweep_report import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
