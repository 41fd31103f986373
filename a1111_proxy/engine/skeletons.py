"""Weight-less diffusers config folders for SD1.5 and SDXL single-file checkpoints.

`from_single_file(path, config=<folder>)` needs a diffusers config folder (JSON configs and the
tokenizer) to know the architecture; without one it downloads configs from the hub. The package
ships those JSON files in `configs/` plus OpenAI's CLIP BPE merges (MIT, from the `clip` and
`open_clip` projects); this module writes a complete folder per architecture once per process.
"""

from __future__ import annotations

import atexit
import gzip
import json
import shutil
import tempfile
import threading
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
_lock = threading.Lock()
_made: dict[str, Path] = {}
_root: Path | None = None


def skeleton(architecture: str) -> Path:
    """The config folder for "sd15", "sd15_inpaint", "sdxl" or "sdxl_inpaint"."""
    with _lock:
        if architecture not in _made:
            _made[architecture] = _write(architecture, _workdir())
        return _made[architecture]


def _workdir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="a1111-proxy-configs-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def _write(architecture: str, root: Path) -> Path:
    base, _, variant = architecture.partition("_")
    out = root / architecture
    shutil.copytree(CONFIGS / base, out)
    vocab, merges = clip_vocab()
    for tokenizer in out.glob("tokenizer*"):
        (tokenizer / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
        (tokenizer / "merges.txt").write_text(merges, "utf-8")
    if variant == "inpaint":  # the inpainting UNet also takes the mask and the masked image
        unet = out / "unet" / "config.json"
        config = json.loads(unet.read_text())
        config["in_channels"] = 9
        unet.write_text(json.dumps(config, indent=2))
    return out


def clip_vocab() -> tuple[dict[str, int], str]:
    """CLIP's 49,408-token vocabulary, rebuilt from its BPE merges as OpenAI's tokenizer does."""
    merges = gzip.decompress((CONFIGS / "clip_merges.txt.gz").read_bytes()).decode("utf-8")
    pairs = merges.splitlines()[1:]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(p.split()) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))
