"""The engine's device facts (engine/device.py) without a GPU: the CPU branch, and NVML's
absent, failing and answering branches with a stand-in for the pynvml module."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")

from a1111_proxy.engine.catalog import Catalog  # noqa: E402
from a1111_proxy.engine.config import EngineConfig  # noqa: E402
from a1111_proxy.engine.device import CPU_NOTE, NO_NVML, facts, gpu_load  # noqa: E402
from a1111_proxy.engine.models import Models  # noqa: E402


class FakeNvml(ModuleType):
    """pynvml's few calls used, answering for one device by UUID or index."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__("pynvml")
        self.fail = fail
        self.asked: list[Any] = []

    def nvmlInit(self) -> None:
        if self.fail is not None:
            raise self.fail

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.asked.append(uuid)
        return uuid

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.asked.append(index)
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> SimpleNamespace:
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return 61


def test_on_the_cpu_the_facts_say_so_and_what_it_means(tmp_path: Path) -> None:
    models = Models(EngineConfig(models_dir=tmp_path, device="cpu"), Catalog(tmp_path))
    body = facts(models, nvml=FakeNvml())
    assert body["type"] == "cpu" and body["note"] == CPU_NOTE and "minutes" in CPU_NOTE
    assert body["torch"] == torch.__version__ and body["dtype"] == "float32"
    assert body["loaded_models"] == [] and body["memory"]["total"] > 0
    assert body["utilization_percent"] is None and body["temperature_c"] is None


def test_without_nvml_utilisation_and_temperature_are_none_with_the_reason() -> None:
    assert gpu_load(None, 0, "abc") == {
        "utilization_percent": None,
        "temperature_c": None,
        "nvml": NO_NVML,
    }
    assert "nvidia-ml-py" in NO_NVML


def test_nvml_that_fails_leaves_them_none_with_its_error() -> None:
    body = gpu_load(FakeNvml(fail=RuntimeError("Driver Not Loaded")), 0, None)
    assert body["utilization_percent"] is None
    assert body["nvml"] == "unavailable: RuntimeError: Driver Not Loaded"


def test_nvml_answers_for_torchs_device_by_its_uuid_else_its_index() -> None:
    nvml = FakeNvml()
    assert gpu_load(nvml, 1, "1234-abcd") == {
        "utilization_percent": 37,
        "temperature_c": 61,
        "nvml": "ok",
    }
    gpu_load(nvml, 1, None)
    assert nvml.asked == ["GPU-1234-abcd", 1]
