"""Test-session set-up shared by all test files."""

import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. It must be
# chosen before any @triton.jit function is created. With CUDA present it is never forced on: the
# kernels then compile for the GPU (tests/gpu/); TRITON_INTERPRET=1 set by hand still selects it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
