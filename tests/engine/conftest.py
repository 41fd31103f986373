"""Fixtures of the engine tier: the tiny random-weight models of tests/fakes/tiny_sd.py, each
built once per test session and copied into the MODELS_DIR that a module lays out."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


class TinyModels:
    """tests/fakes/tiny_sd.py's builders with the same arguments, each model built once (per
    kind, seed and options) under `cache` and then copied where it is asked for. The pipelines
    and ControlNets returned are shared by every module: read them, never change them."""

    def __init__(self, tiny_sd: ModuleType, cache: Path) -> None:
        self.tiny_sd = tiny_sd
        self.cache = cache
        self._made: dict[str, Any] = {}
        self._keys: dict[int, str] = {}  # id() of a returned model -> its key

    def sd15(self, folder: Path, *, inpaint: bool = False, seed: int = 0) -> Any:
        def build(into: Path) -> Any:
            return self.tiny_sd.sd15(into, inpaint=inpaint, seed=seed)

        return self._folder(f"sd15-inpaint{int(inpaint)}-seed{seed}", folder, build)

    def sdxl(self, folder: Path, seed: int = 0) -> Any:
        return self._folder(f"sdxl-seed{seed}", folder, lambda into: self.tiny_sd.sdxl(into, seed))

    def controlnet(self, pipe: Any, folder: Path, seed: int = 1) -> Any:
        def build(into: Path) -> Any:
            return self.tiny_sd.controlnet(pipe, into, seed=seed)

        return self._folder(f"{self._keys[id(pipe)]}-controlnet-seed{seed}", folder, build)

    def write_single_file(self, pipe: Any, path: Path) -> None:
        def build(into: Path) -> None:
            self.tiny_sd.write_single_file(pipe, into)

        self._file(f"{self._keys[id(pipe)]}-single-file", path, build)

    def write_single_file_controlnet(self, model: Any, path: Path) -> None:
        def build(into: Path) -> None:
            self.tiny_sd.write_single_file_controlnet(model, into)

        self._file(f"{self._keys[id(model)]}-single-file", path, build)

    def kohya_lora(
        self,
        pipe: Any,
        path: Path,
        *,
        seed: int = 1,
        unet: bool = True,
        text: bool = True,
        rank: int = 4,
    ) -> None:
        def build(into: Path) -> None:
            self.tiny_sd.kohya_lora(pipe, into, seed=seed, unet=unet, text=text, rank=rank)

        key = f"{self._keys[id(pipe)]}-lora-seed{seed}-unet{int(unet)}-text{int(text)}-rank{rank}"
        self._file(key, path, build)

    def _folder(self, key: str, folder: Path, build: Callable[[Path], Any]) -> Any:
        """A model saved as a folder (diffusers' layout); tiny_sd puts the byte-level tokenizer
        the pipelines use beside it, in `_tokenizer`."""
        built = self.cache / key
        if key not in self._made:
            made = build(built / "model")
            self._made[key] = made
            self._keys[id(made)] = key
        shutil.copytree(built / "model", folder, dirs_exist_ok=True)
        if (built / "_tokenizer").exists():
            shutil.copytree(built / "_tokenizer", folder.parent / "_tokenizer", dirs_exist_ok=True)
        return self._made[key]

    def _file(self, key: str, path: Path, build: Callable[[Path], None]) -> None:
        built = self.cache / key / "model.safetensors"
        if not built.exists():
            build(built)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The tiny models, built on first use and kept for the whole session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")
    from tests.fakes import tiny_sd

    return TinyModels(tiny_sd, tmp_path_factory.mktemp("tiny-models"))


def cpu_backend(root: Path, kinds: tuple[str, ...] = ("sd15",), **config: Any) -> Any:
    """The engine on the CPU over `root`'s layout: MODELS_DIR `root/models`, the config
    skeletons of `kinds` under `root/configs` (as the module fixtures lay them out)."""
    from a1111_proxy.backends.diffusers import DiffusersBackend
    from a1111_proxy.engine.config import EngineConfig

    skeletons = {kind: root / "configs" / kind for kind in kinds}
    return DiffusersBackend(
        EngineConfig(models_dir=root / "models", device="cpu", skeletons=skeletons, **config)
    )


def tiny_sd15_root(root: Path, tiny_models: TinyModels) -> Path:
    """`root` laid out for cpu_backend: the tiny SD1.5 as a single checkpoint file."""
    source = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(source, root / "models" / "Stable-diffusion" / "t.safetensors")
    return root


@pytest.fixture(scope="module")
async def sd15_backend(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_models: TinyModels,
) -> AsyncIterator[Any]:
    """One module's engine on the CPU over the tiny SD1.5, without live previews; closed after
    the module. The module sets a module-scoped `anyio_backend` (this fixture outlives a test)."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    made = cpu_backend(tiny_sd15_root(folder, tiny_models), preview_steps=0)
    yield made
    await made.aclose()
