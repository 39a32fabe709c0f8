"""Triton kernels (installed as `fastenc.kernels`): @triton.jit functions plus plain launchers over tensors.
No nn.Modules and no transformers imports here. One file per op family."""
