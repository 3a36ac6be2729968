"""Triton kernels. Importing this package imports triton (set ``TRITON_INTERPRET=1`` before, to run
the kernels on CPU tensors)."""
