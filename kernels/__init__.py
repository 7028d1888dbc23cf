"""Triton kernels of ldm_engine (installed as ``ldm_engine.kernels``).

Importing this package does not import triton; each kernel module does, when it is used.
"""
