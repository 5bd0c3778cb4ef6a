"""Triton kernels, one op per file. Imports nothing from fastdpo (installed as fastdpo.kernels)."""
