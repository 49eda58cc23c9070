"""Native fused attention (``kernels.attention``, backend "cpu") vs the model's plain path, at the
paper's model size (8 heads of 32, width 256). Run with
``python -m pytest bench/test_bench_attention.py --benchmark-only -s``.

* training, one layer: batch 8 x 75 tokens, attention dropout 0.1, forward + backward. Plain:
  explicit ``q @ k^T``, in-place mask fill, softmax, ``kernels.dropout`` on the probabilities,
  ``@ v``, transpose back (what ``SelfAttention`` does without the native library);
* evaluation, one layer: 100 rows x 59 own tokens after a 15-token cached prompt prefix. Plain:
  concatenate the prefix, ``scaled_dot_product_attention`` with the bool mask, transpose back.

Variants run interleaved round by round; ``extra_info`` holds both medians and the speed-up.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref

H, D = 8, 32


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def _interleaved(variants: dict, rounds: int = 7, reps: int = 10) -> dict:
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_time(fn, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def _record(benchmark, name: str, ms: dict) -> None:
    benchmark.extra_info.update({f"{k}_ms": round(v, 3) for k, v in ms.items()})
    benchmark.extra_info["speedup_native_over_plain"] = round(ms["plain"] / ms["native"], 2)
    print(f"\n{name}: native {ms['native']:.2f} ms, plain {ms['plain']:.2f} ms ({ms['plain'] / ms['native']:.2f}x)")


def test_attention_training_layer(benchmark):
    b, t = 8, 75
    qkv = torch.randn(b, t, 3, H, D, requires_grad=True)
    valid, qpos = torch.ones(b, t, dtype=torch.bool), torch.arange(t)
    mask = ref.attention_mask(valid, qpos)
    grad = torch.randn(b, t, H * D)

    def native():
        kernels.attention(qkv, valid, qpos, None, 0.1, 5, backend="cpu").backward(grad)

    def plain():
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))).masked_fill_(~mask, float("-inf")).softmax(-1)
        (kernels.dropout(att, 0.1, 5) @ v).transpose(1, 2).reshape(b, t, H * D).backward(grad)

    _record(benchmark, "attention, training layer (fwd+bwd)", _interleaved({"native": native, "plain": plain}))
    benchmark.pedantic(native, rounds=10, warmup_rounds=1)


def test_attention_eval_layer(benchmark):
    b, t, tp = 100, 59, 15
    qkv = torch.randn(b, t, 3, H, D)
    prefix = (torch.randn(b, H, tp, D), torch.randn(b, H, tp, D))
    valid, qpos = torch.ones(b, tp + t, dtype=torch.bool), torch.arange(tp, tp + t)
    mask = ref.attention_mask(valid, qpos)

    def native():
        with torch.inference_mode():
            return kernels.attention(qkv, valid, qpos, prefix, backend="cpu")

    def plain():
        with torch.inference_mode():
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, H * D)

    torch.testing.assert_close(native(), plain(), rtol=1e-5, atol=1e-5)
    _record(benchmark, "attention, evaluation layer (fwd, cached prompt prefix)", _interleaved({"native": native, "plain": plain}, reps=3))
    benchmark.pedantic(native, rounds=5, warmup_rounds=1)
