"""How catalogue entries find their file's hash, the hash to ask Civitai about, and one entry."""

from __future__ import annotations

from a1111_proxy.model_info import FileIndex, ModelFile, find_entry, lookup_hash, with_civitai

UNHASHED = {
    "title": "SDXL/base.safetensors",
    "model_name": "SDXL_base",
    "hash": None,
    "sha256": None,
    "filename": "/sd/models/Stable-diffusion/SDXL/base.safetensors",
    "config": None,
}


def disk(
    rel: str, sha: str, kind: str = "checkpoint", root: str = "/mnt/models", hashed_at: float = 1.0
) -> ModelFile:
    folder = "Stable-diffusion" if kind == "checkpoint" else "Lora"
    return ModelFile(
        path=f"{root}/{folder}/{rel}",
        size=1,
        mtime_ns=1,
        kind=kind,
        rel=rel,
        sha256=sha,
        autov3=sha[:12],
        hashed_at=hashed_at,
    )


def lora(name: str, path: str, **metadata: str) -> dict[str, object]:
    return {"name": name, "alias": name, "path": path, "metadata": metadata}


def test_a_checkpoint_a1111_has_not_hashed_yet_uses_the_hash_of_its_file_on_disk() -> None:
    index = FileIndex(
        [disk("SDXL/base.safetensors", "ab" * 32), disk("base.safetensors", "cd" * 32)]
    )
    assert lookup_hash("checkpoint", UNHASHED, index) == "ab" * 32
    assert find_entry("checkpoint", [UNHASHED], "abababababab"[:10], index) is UNHASHED
    assert find_entry("checkpoint", [UNHASHED], "AB" * 32, index) is UNHASHED
    assert find_entry("checkpoint", [UNHASHED], "SDXL/base.safetensors", index) is UNHASHED


def test_a1111s_own_sha256_comes_first_for_checkpoints() -> None:
    entry = {**UNHASHED, "hash": "ef" * 5, "sha256": "EF" * 32}
    index = FileIndex([disk("SDXL/base.safetensors", "ab" * 32)])
    assert lookup_hash("checkpoint", entry, index) == "ef" * 32


def test_a_lora_finds_its_file_by_path_in_lora_else_by_a_unique_file_name() -> None:
    index = FileIndex(
        [
            disk("style/ink.safetensors", "11" * 32, "lora"),
            disk("solo.safetensors", "22" * 32, "lora"),
            disk("a/twin.safetensors", "33" * 32, "lora"),
            disk("b/twin.safetensors", "44" * 32, "lora"),
        ]
    )
    assert lookup_hash("lora", lora("ink", "/x/Lora/style/ink.safetensors"), index) == "11" * 32
    assert lookup_hash("lora", lora("solo", "/elsewhere/solo.safetensors"), index) == "22" * 32
    assert lookup_hash("lora", lora("twin", "/elsewhere/twin.safetensors"), index) is None
    windows = lora("twin", "C:\\sd\\Lora\\b\\twin.safetensors")
    assert lookup_hash("lora", windows, index) == "44" * 32


def test_a_folder_name_that_recurs_in_the_path_still_finds_the_file() -> None:
    index = FileIndex([disk("Lora/nested.safetensors", "55" * 32, "lora")])
    entry = lora("nested", "/home/Lora/models/Lora/Lora/nested.safetensors")
    assert lookup_hash("lora", entry, index) == "55" * 32


def test_the_latest_hash_of_a_file_wins() -> None:
    index = FileIndex(
        [
            disk("x.safetensors", "66" * 32, "lora", hashed_at=5),
            disk("x.safetensors", "77" * 32, "lora", root="/other", hashed_at=9),
        ]
    )
    assert lookup_hash("lora", lora("x", "/a/Lora/x.safetensors"), index) == "77" * 32


def test_without_its_file_a_kohya_lora_is_known_by_the_autov3_in_its_metadata() -> None:
    entry = lora("k", "/a/Lora/k.safetensors", sshs_model_hash="ABCDEF012345" + "9" * 52)
    assert lookup_hash("lora", entry, FileIndex([])) == "abcdef012345"
    assert lookup_hash("lora", lora("plain", "/a/Lora/plain.pt"), FileIndex([])) is None


def test_loras_are_found_by_name_or_alias_and_civitai_is_added_last() -> None:
    entry = {**lora("detail", "/a/Lora/detail.safetensors"), "alias": "more_detail"}
    index = FileIndex([disk("detail.safetensors", "88" * 32, "lora")])
    assert find_entry("lora", [entry], "more_detail", index) is entry
    assert find_entry("lora", [entry], "nothing", index) is None
    [enriched] = with_civitai("lora", [entry], index, {"88" * 32: {"model_name": "Detail"}})
    assert list(enriched) == [*entry, "civitai"] and enriched["civitai"]["model_name"] == "Detail"
