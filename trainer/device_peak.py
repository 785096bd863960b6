"""The MFU denominator: a GPU's dense bf16 tensor-core peak from its datasheet, or a measured matmul rate.

The datasheet figures are per GPU, dense (NVIDIA quotes "with sparsity" figures at twice these). SKUs of one name
differ a lot (H100 SXM 989, NVL 835, PCIe 756 TFLOP/s), so names are matched exactly, most specific pattern first;
a GPU not in the table is measured instead of guessed.
"""

import re
import time

import torch

# (pattern on torch.cuda.get_device_name, dense bf16 FLOP/s, SKU): NVIDIA datasheets (H100/H200, A100, L4, L40,
# L40S, A10, B200 product pages). "NVIDIA H100 80GB HBM3" is the SXM5 part; the PCIe part says "PCIe".
GPU_PEAK_BF16 = [
    (r"\bGH200\b", 989e12, "GH200"),
    (r"\bH200 NVL\b", 835e12, "H200 NVL"),
    (r"\bH200\b", 989e12, "H200 SXM"),
    (r"\bH100 NVL\b", 835e12, "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", 756e12, "H100 PCIe"),
    (r"\bH100\b", 989e12, "H100 SXM"),
    (r"\bH800\b.*\bPCIe\b", 756e12, "H800 PCIe"),
    (r"\bH800\b", 989e12, "H800 SXM"),
    (r"\bB200\b", 2250e12, "B200"),
    (r"\bA100\b", 312e12, "A100"),  # 40 GB and 80 GB, SXM and PCIe alike
    (r"\bA800\b", 312e12, "A800"),
    (r"\bL40S\b", 362e12, "L40S"),
    (r"\bL40\b", 181e12, "L40"),
    (r"\bL4\b", 121e12, "L4"),
    (r"\bA10\b", 125e12, "A10"),
]


def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, SKU) for a CUDA device name, or None if it is not in the table."""
    for pattern, peak, sku in GPU_PEAK_BF16:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak, sku
    return None


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a large dense matmul on this device and dtype: the practical peak (used on CPUs)."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (masks, resume) alone
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s in `dtype`, where the figure comes from). The datasheet table holds bf16's tensor-core peaks: a
    run in another dtype (fp32 runs at a small fraction of it: H100 SXM 67 TFLOP/s) is measured instead."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = datasheet_peak(name)
        if known and dtype in (torch.bfloat16, torch.float16):
            return known[0], f"{name}: {known[1]} datasheet, dense bf16"
        why = "the datasheet table holds bf16's peak" if known else "not in the datasheet table"
        return measured_matmul_peak(device, dtype), f"{name}: measured {dtype} matmul ({why})"
    return measured_matmul_peak(device, dtype), f"CPU: measured {dtype} matmul"
