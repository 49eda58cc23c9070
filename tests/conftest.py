"""Test-session set-up shared by all test files."""

import os

# The Triton kernels run on CPU tensors through Triton's interpreter (no GPU here). It must be
# chosen before any @triton.jit function is created; a GPU user can run with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
