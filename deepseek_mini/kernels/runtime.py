"""Whether the Triton kernels can run: the one `import triton` guard and the one interpreter switch.

CPU-only installs have no Triton; every kernel's caller then takes its PyTorch path. With
TRITON_INTERPRET=1 (read once, at import, as Triton itself does) the kernels run on CPU tensors through
Triton's interpreter, which is how the tests check them without a GPU. Kernel modules read `INTERPRET`
and `triton` from this module at call time, so a test can switch them in one place.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every caller uses its PyTorch path
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: torch.Tensor) -> bool:
    """Triton is installed and can reach this tensor: on CUDA, or on CPU under the interpreter."""
    return triton is not None and (t.is_cuda or INTERPRET)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous (the kernels take the other strides: a split GEMM output's
    columns, say), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
