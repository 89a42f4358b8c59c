"""Every Triton kernel of the project, each behind a PyTorch fallback in its caller.

* runtime.py   the one `import triton` guard and the one interpreter switch (TRITON_INTERPRET)
* mla_decode.py   fused absorbed-MLA decode attention and the decode step's cache write (model/attention.py)
* moe_decode.py   the routed experts at decode sizes: the top-k and routing in one kernel, grouped GEMVs that
                  read each busy expert once (model/moe.py)
* routing.py   the router's top-k in training: the first K of a stable sort of each row (model/moe.py)
* swiglu.py    the routed experts' gated SwiGLU backward (model/moe.py)
* adamw.py     the multi-tensor AdamW step and gradient sum of squares (optim/adamw.py)

A leaf: it imports torch and triton only, so the model and the optimizer can both call it.
"""
