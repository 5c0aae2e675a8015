"""Triton kernels for the elastic layers, installed as `engine.kernels` (see setup.py).

One file per op family; each holds the @triton.jit kernels, the host launchers registered as
torch.library custom ops (with fake kernels for torch.compile) and their autograd formulas.
The plain-PyTorch reference of each op lives beside the layer in engine/elastic/.
"""
