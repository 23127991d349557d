"""Triton kernels, imported as ``diffaccel.kernels``.

One op per module: the Triton kernel, a plain-torch reference beside it, and a dispatcher that
takes Triton on CUDA and the reference elsewhere. Populated by the kernels issue.
"""
