"""Accelerated inference on this machine: what the engine opts into; the model never knows.

- `cpu.py`: what this CPU offers (torch's own capability check, and so which build of the kernels; the
  vendor, for MKL against oneDNN)
- `kernels.py` + `kernels.cpp`: chatforge's own decode products, one source built once on the user's
  machine for its instruction set (AVX-512 or AVX2 + FMA) where they can be
- `linear.py`: the fastest product for a few rows here, and `fast_view(model)`, the model with its
  linear layers computed through it (the engine's forwards use the view; training never does)
- `fused_step.py`: `FusedDecodeStep`, a whole one-token forward of the GPT in one call of the kernels
- `int8.py` + `kernels_int8.cpp`: the weight-only int8 product (per-channel scales), chatforge's kernel
  for a few rows where the kernels are built, dequantize-and-F.linear otherwise

A machine without the kernels (ARM, an x86 without AVX2, macOS, Windows, or CHATFORGE_CPU_KERNELS=0)
runs the same model through torch's products and decodes the same tokens (tests/test_accel_linear.py
checks).
"""
