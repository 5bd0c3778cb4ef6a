"""Autograd functions and public ops over the Triton kernels, each with a pure-PyTorch twin."""
