"""Which weight files lcmkit lets diffusers and transformers open: safetensors only, however a file is reached.

:func:`check_pipeline_weights` runs on every pipeline folder before diffusers touches it (``lcmkit.pipelines.
load_pipeline``, ``lcmkit world train-teacher --init-from``); nothing here ever unpickles.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LcmkitError

#: Weight files that are pickles (``torch.save`` / ``pickle``): never loaded, whatever torch's defaults are.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
#: Suffixes diffusers / transformers may open as weights (pickles, Flax msgpack, Keras h5): only safetensors passes.
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".msgpack", ".h5")
#: Stems of the weight files diffusers / transformers look for; an extension-less shard named like one is a weight.
WEIGHT_STEMS = ("diffusion_pytorch_model", "diffusion_flax_model", "pytorch_model", "model", "tf_model",
                "flax_model")
#: Index files (``*.index.json``) are read for their ``weight_map``; a larger one is refused unread.
MAX_INDEX_BYTES = 64 << 20
CONVERT_HINT = ("convert it to safetensors in a trusted environment (e.g. load it with diffusers there and "
                "save_pretrained(..., safe_serialization=True))")


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` (named .safetensors) is not a safetensors file, from its first bytes; None if it looks right.

    A safetensors file starts with a little-endian u64 header length N and a JSON object (``{``) of N bytes.
    Pickles start with ``0x80`` (protocol >= 2), ``torch.save`` zips with ``PK``; those magics are only looked for
    in a file that is not laid out as safetensors (a header length's low byte may itself be 0x80).
    """
    import struct

    with open(file, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and struct.unpack("<Q", head[:8])[0] + 8 <= file.stat().st_size and head[8:9] == b"{":
        return None
    if head[:1] == b"\x80" or head[:2] == b"PK":
        return "it holds a pickle / torch.save checkpoint despite its name"
    return "it is not a valid safetensors file (truncated or corrupt)"


def _weight_like(name: str) -> bool:
    """Whether diffusers / transformers could open a file of this name as weights (by suffix, or a weight stem
    such as an extension-less ``model-00001-of-00002`` shard)."""
    lower = name.lower()
    if lower.endswith(WEIGHT_SUFFIXES):
        return True
    if lower.endswith((".json", ".txt", ".md", ".py", ".model", ".yaml")):
        return False
    return any(lower == s or lower.startswith((s + ".", s + "-", s + "_")) for s in WEIGHT_STEMS)


def _allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where a weight file of the (resolved) pipeline folder ``root`` may really live: inside it, or, for a folder of
    the Hugging Face cache (``models--X/snapshots/REV``, whose files are links into ``models--X/blobs``), there."""
    if root.parent.name == "snapshots":
        return root, root.parent.parent / "blobs"
    return (root,)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _refuse_weight(name: str, shown: str, reason: str, hint: str = CONVERT_HINT) -> LcmkitError:
    return LcmkitError(f"{name}: {shown} is refused: {reason}; lcmkit loads only safetensors weights because "
                       f"unpickling can run arbitrary code: {hint}")


def _check_weight_file(file: Path, shown: str, name: str, roots: tuple[Path, ...], shard: bool = False) -> None:
    """One file diffusers could open as weights: inside the folder (links too), named and made as safetensors."""
    real = file.resolve()
    if not _inside(real, roots):
        raise LcmkitError(f"{name}: {shown} links to {real}, outside the pipeline folder; lcmkit follows no weight "
                          "link out of the folder: copy the file into it")
    if not real.is_file():
        raise LcmkitError(f"{name}: {shown} is missing (or a dangling link); restore the file or save the pipeline "
                          "again with save_pretrained")
    suffix = file.suffix.lower()
    if not file.name.lower().endswith(".safetensors"):
        kind = f"a pickle checkpoint ({suffix})" if suffix in PICKLE_SUFFIXES else \
            f"not a safetensors file ({suffix or 'no suffix'})"
        spare = "" if shard else "delete it if a .safetensors file beside it holds the same weights, or "
        raise _refuse_weight(name, shown, f"it is {kind}", spare + CONVERT_HINT)
    problem = _safetensors_problem(real)
    if problem:
        raise _refuse_weight(name, shown, problem)


def _index_shards(index: Path, shown: str, name: str) -> list[str]:
    """The shard names a ``*.index.json`` file's ``weight_map`` refers to (refused when it is not one)."""
    import json

    bad = f"{name}: {shown} is not a valid weight index"
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise LcmkitError(f"{bad} (over {MAX_INDEX_BYTES >> 20} MiB)")
    try:
        data = json.loads(index.read_bytes())
    except (ValueError, RecursionError) as e:
        raise LcmkitError(f"{bad} ({type(e).__name__}: {e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LcmkitError(f"{bad} (no weight_map of tensor name -> file name)")
    return sorted(set(weight_map.values()))


def check_pipeline_weights(folder: Path, name: str) -> None:
    """Refuse a pipeline folder holding any weights that are not safetensors, before diffusers touches anything;
    never unpickles.

    In every component folder, each file diffusers or transformers could open as weights is checked: a weight-like
    name (``*.bin``, ``*.pt``, ``*.ckpt``, ``*.pth``, ``*.pkl``, ``*.msgpack``, ``*.h5``, an extension-less
    ``model-00001-of-00002``) must be a ``.safetensors`` file, and its bytes must be safetensors (a pickle renamed
    .safetensors is refused); every shard a ``*.index.json`` names (they follow its ``weight_map`` whatever the
    shard is called) likewise; and no link may lead out of the folder (a component folder, a weight file, a shard).
    The file is named in the error.
    """
    folder = Path(folder)
    roots = _allowed_roots(folder.resolve())
    for sub in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()):
        if not _inside(sub.resolve(), roots):
            raise LcmkitError(f"{name}: component folder {sub.name} links to {sub.resolve()}, outside the pipeline "
                              "folder; lcmkit follows no weight link out of the folder: copy it into the folder")
        for file in sorted(p for p in sub.iterdir() if not p.name.startswith(".")):
            shown = f"{sub.name}/{file.name}"
            if file.name.lower().endswith(".index.json"):
                if not _inside(file.resolve(), roots):
                    raise LcmkitError(f"{name}: {shown} links to {file.resolve()}, outside the pipeline folder; "
                                      "lcmkit follows no weight link out of the folder: copy the file into it")
                for shard in _index_shards(file, shown, name):
                    where = f"{shard!r}, named by {shown},"
                    if Path(shard).name != shard or shard in (".", "..") or "\\" in shard:
                        raise LcmkitError(f"{name}: {shown} names the shard {shard!r}, which is not a file name in "
                                          f"{sub.name}/; lcmkit loads shards only from the component's own folder")
                    _check_weight_file(sub / shard, where, name, roots, shard=True)
            elif _weight_like(file.name) and not file.is_dir():
                _check_weight_file(file, shown, name, roots)
