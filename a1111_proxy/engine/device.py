"""What the engine runs on, for the detailed /health (torch; NVML when installed).

The device's name and memory, its utilisation and temperature where NVML answers (the optional
`nvidia-ml-py` package, imported as `pynvml`; never required), the torch version, and each loaded
checkpoint with its dtypes. On the CPU it says so, and what that means, instead of failing.
"""

from __future__ import annotations

import platform
from types import ModuleType
from typing import Any

import torch

from a1111_proxy.engine.models import Models
from a1111_proxy.memory import process_ram

CPU_NOTE = (
    "the engine runs on the CPU: expect minutes per 512x512 image with a real checkpoint; fine "
    "for tests and tiny models. Run the worker on a machine with an NVIDIA GPU and a CUDA build "
    "of torch (A1111_PROXY_ENGINE_DEVICE=auto or cuda) for real use"
)
NO_NVML = "utilisation and temperature need the nvidia-ml-py package (pip install nvidia-ml-py)"


def facts(models: Models, nvml: ModuleType | None = None) -> dict[str, Any]:
    """The device facts; `nvml` is the pynvml module (imported here when None and installed)."""
    device = models.device
    body: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": _name(models.dtype),
        "vae_dtype": "float32" if models.vae_fp32 else _name(models.dtype),
        "loaded_models": models.describe(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        body.update(_cuda(index))
        body.update(gpu_load(nvml if nvml is not None else import_nvml(), index, uuid))
    else:
        body.update(_host(device))
    return body


def _cuda(index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    try:
        free, total = torch.cuda.mem_get_info(index)
    except RuntimeError as exc:
        return {"name": props.name, "memory": {"error": f"{type(exc).__name__}: {exc}"}}
    return {
        "name": props.name,
        "index": index,
        "capability": f"{props.major}.{props.minor}",
        "memory": {"total": total, "used": total - free, "free": free},
        "torch_allocated": torch.cuda.memory_allocated(index),
        "torch_reserved": torch.cuda.memory_reserved(index),
    }


def _host(device: torch.device) -> dict[str, Any]:
    """The CPU (or another torch device without CUDA's counters): the machine's memory as
    the worker process sees it, and what running there means."""
    ram = process_ram()
    return {
        "name": platform.processor() or platform.machine() or device.type,
        "memory": ram if "error" in ram else {k: ram[k] for k in ("total", "used", "free")},
        "utilization_percent": None,
        "temperature_c": None,
        "note": CPU_NOTE if device.type == "cpu" else f"the engine runs on {device.type}",
    }


def import_nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    module: ModuleType = pynvml
    return module


def gpu_load(nvml: ModuleType | None, index: int, uuid: object = None) -> dict[str, Any]:
    """Utilisation (%) and temperature (C) of CUDA device `index` from NVML, or None for each
    and why. NVML finds the device by its UUID where torch gives one (CUDA_VISIBLE_DEVICES
    renumbers devices), else by the index."""
    if nvml is None:
        return {"utilization_percent": None, "temperature_c": None, "nvml": NO_NVML}
    try:
        nvml.nvmlInit()
        if uuid is not None:
            handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        else:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
    except Exception as exc:  # NVMLError and its kin: no driver, no permission, a MIG slice
        return {
            "utilization_percent": None,
            "temperature_c": None,
            "nvml": f"unavailable: {type(exc).__name__}: {exc}",
        }
    return {"utilization_percent": utilization, "temperature_c": temperature, "nvml": "ok"}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
