"""Which compute capabilities the visible CUDA devices have, asked of NVML (the driver's
management library) so that the ``te`` probe never creates a CUDA context: a probe runs in every
process that builds a Runtime, also in ones that will fork workers or pick a device later."""

from __future__ import annotations

import ctypes

#: Transformer Engine's fused kernels need Ampere (sm_80) or newer; FP8 needs more, and is
#: checked when a runtime asks for it (``crosschip_validate_runtime``).
MIN_CAPABILITY = (8, 0)


def visible_capabilities() -> list[tuple[int, int]] | None:
    """``(major, minor)`` per visible device in CUDA ordinal order, or None when it cannot be
    known without initialising CUDA (no NVML, or NVML failed)."""
    import torch

    if torch.cuda.is_initialized():  # asking costs nothing more now
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        caps = []
        for ordinal in range(torch.cuda.device_count()):
            # CUDA_VISIBLE_DEVICES (indices or UUIDs) maps CUDA ordinals to NVML indices.
            index = torch.cuda._get_nvml_device_index(ordinal)
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            caps.append((major.value, minor.value))
        return caps
    except (RuntimeError, AttributeError, ValueError):  # torch's NVML helpers are private
        return None
    finally:
        nvml.nvmlShutdown()


def unsupported_reason(capabilities: list[tuple[int, int]]) -> str | None:
    """None when every visible device can run Transformer Engine, else the reason naming each
    device that cannot."""
    low = [f"cuda:{i} has compute capability {major}.{minor}"
           for i, (major, minor) in enumerate(capabilities) if (major, minor) < MIN_CAPABILITY]
    if not low:
        return None
    need = ".".join(map(str, MIN_CAPABILITY))
    return (f"{'; '.join(low)}; Transformer Engine needs {need} (Ampere) or newer "
            "(CUDA_VISIBLE_DEVICES can leave out the older devices)")
