"""Dense bf16 peak FLOP/s per accelerator, for model FLOPs utilisation (MFU).

Matched against JAX's `device.device_kind` (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200",
"TPU v5 lite"), first match wins, so the specific names come before the generic ones.
Sources, dense (no structured sparsity) bf16 tensor-core rates:
  NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 989 TFLOP/s, H100 NVL 835, H100 PCIe 756
    (the datasheet's 1,979 / 1,671 / 1,513 are "with sparsity", twice the dense rate).
  NVIDIA H200 Tensor Core GPU datasheet: H200 SXM 989 TFLOP/s (the H100's chip, more HBM).
  NVIDIA A100 datasheet: 312 TFLOP/s.
  Cloud TPU system architecture pages: v4 275, v5p 459, v5e ("TPU v5 lite") 197, v6e 918.
A large bf16 matrix product reaches only part of these rates in practice: bench/device_check.py
measures that ceiling on the card it runs on and reports it beside the datasheet figure.
"""
from __future__ import annotations

PEAK_BF16 = (  # (substring of device_kind, lower-case; dense bf16 FLOP/s per device)
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v6", 918e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
  """Dense bf16 FLOP/s of one device of this kind, or None when the table lacks it (CPUs)."""
  kind = device_kind.lower()
  for name, value in PEAK_BF16:
    if name in kind:
      return value
  return None
