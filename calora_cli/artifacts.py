"""The artifact contract between stages: manifests, fingerprints, validation, atomic output.

An artifact is a directory in the ecosystem's own layout (a transformers model or a peft adapter)
plus an optional `calora.json` manifest. Nothing here imports torch, so `calora info` and the
checks every stage runs first stay cheap.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from calora_cli import __version__
from calora_cli.errors import CaloraError

MANIFEST = "calora.json"
FORMAT_VERSION = 1
KINDS = ("model", "adapter")
GGUF_MODEL = "model.gguf"  # a GGUF model artifact's weights (llama.cpp's format), beside config.json
GGUF_HEAD_BYTES = 4 << 20  # a GGUF's metadata (vocabulary included) lies at its start: fingerprinted whole
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# A safetensors header above this is not a real header (the format's own reader caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
_CHUNK = 1 << 20
# Header and size alone cannot tell apart two models of the same shapes (a base and its
# fine-tune), so the fingerprint also reads this many evenly spaced samples of the tensor bytes.
SAMPLES, SAMPLE_BYTES = 16, 4096


# --- safetensors headers ---------------------------------------------------------------------


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header without reading the tensors.

    Catches truncated files, garbage headers and headers that claim more bytes than the file
    holds, each as a one-line CaloraError naming the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CaloraError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CaloraError(f"corrupt safetensors file {path}: header length {n} does not fit a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CaloraError(f"corrupt safetensors file {path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CaloraError(f"corrupt safetensors file {path}: header is not a JSON object")
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError):
            raise CaloraError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}") from None
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi) or not isinstance(shape, list):
            raise CaloraError(f"corrupt safetensors file {path}: bad offsets for tensor {name!r}")
        if not isinstance(dtype, str):
            raise CaloraError(f"corrupt safetensors file {path}: bad dtype for tensor {name!r}")
        end = max(end, hi)
    if end > data_len:
        raise CaloraError(
            f"corrupt safetensors file {path}: header claims {end} bytes of tensor data, file holds {data_len}"
        )
    return header


def check_gguf_header(path: Path) -> None:
    """The cheap part of a GGUF's validity (magic, version, counts that fit the file); the tensors
    are checked when the file is read (calora_cli.gguf.reader)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CaloraError(f"corrupt GGUF file {path}: it does not start with GGUF's magic and header")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3) or n_tensors > size or n_kv > size:
        raise CaloraError(f"corrupt GGUF file {path}: header (version {version}, {n_tensors} tensors, {n_kv} keys) "
                          f"does not fit a {size}-byte file")


def safetensors_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors") if p.is_file())


def companion_files(root: Path, with_index: bool = False) -> list[Path]:
    """A model directory's files other than its weights and manifest (config, tokenizer, generation
    config; the shard index if asked): what a stage that rewrites the weights copies over
    unchanged. Hidden files are not the artifact's (as for fingerprints)."""
    skip = {MANIFEST} | (set() if with_index else {"model.safetensors.index.json"})
    return sorted(f for f in root.iterdir()
                  if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith(".") and f.name not in skip)


# --- fingerprints ----------------------------------------------------------------------------


def _artifact_files(root: Path) -> list[Path]:
    """Every regular file of an artifact, in a stable order, the manifest excluded."""
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.as_posix() != MANIFEST and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    return files


def fingerprint(root: Path) -> str:
    """A cheap identity of an artifact's contents.

    Small files are hashed whole; a safetensors file contributes its header, its size and 16
    samples of 4 KiB spread over its tensor data, so a 100 GB model fingerprints in milliseconds.
    `full_hashes` is the expensive, exact check.
    """
    h = hashlib.sha256()
    for p in _artifact_files(root):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        if p.suffix == ".gguf":
            size = p.stat().st_size
            with open(p, "rb") as f:
                h.update(f.read(GGUF_HEAD_BYTES))
                h.update(str(size).encode())
                for k in range(SAMPLES):
                    f.seek(max(0, size - SAMPLE_BYTES) * k // (SAMPLES - 1))
                    h.update(f.read(SAMPLE_BYTES))
        elif p.suffix == ".safetensors":
            size = p.stat().st_size
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(n))
                h.update(str(size).encode())
                start, span = 8 + n, max(0, size - 8 - n - SAMPLE_BYTES)
                for k in range(SAMPLES):
                    f.seek(start + span * k // (SAMPLES - 1))
                    h.update(f.read(SAMPLE_BYTES))
        else:
            h.update(p.read_bytes())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def full_hashes(root: Path, known: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file, streamed (never holds a file in memory). `known`: hashes
    computed while the files were written (relative path -> "sha256:..."), not read again."""
    known = known or {}
    return {
        rel: {"size": p.stat().st_size, "sha256": known.get(rel) or file_sha256(p)}
        for p in _artifact_files(root)
        for rel in [p.relative_to(root).as_posix()]
    }


def data_input(path: Path) -> dict[str, str]:
    """How a data file is recorded among a stage's inputs."""
    return {"path": str(path), "fingerprint": file_sha256(path)}


# --- reading artifacts -----------------------------------------------------------------------


@dataclass
class Artifact:
    path: Path
    kind: str
    manifest: dict[str, Any] | None
    fingerprint: str
    weights: list[Path] = field(default_factory=list)
    source: Path | None = None  # what the user named, when `path` is a view of it (a bare .gguf file)

    @property
    def gguf(self) -> bool:
        """A GGUF model: its one weights file is llama.cpp's (read through calora_cli.gguf)."""
        return len(self.weights) == 1 and self.weights[0].suffix == ".gguf"

    @property
    def lineage(self) -> list[str]:
        """Fingerprints of this model and of every model it was made from."""
        older = (self.manifest or {}).get("lineage", [])
        return [self.fingerprint, *older]

    @property
    def base_fingerprint(self) -> str | None:
        """For an adapter: the fingerprint of the model it was trained on, when known."""
        return (self.manifest or {}).get("base_fingerprint")

    def input_record(self) -> dict[str, str]:
        return {"path": str(self.source or self.path), "fingerprint": self.fingerprint}


def _validate_manifest(path: Path, m: Any) -> dict[str, Any]:
    where = path / MANIFEST
    if not isinstance(m, dict):
        raise CaloraError(f"invalid manifest {where}: not a JSON object")
    fmt = m.get("format")
    if fmt != FORMAT_VERSION:
        raise CaloraError(f"unsupported manifest format {fmt!r} in {where} (this calora reads format {FORMAT_VERSION})")
    if m.get("kind") not in KINDS:
        raise CaloraError(f"invalid manifest {where}: kind must be one of {', '.join(KINDS)}, got {m.get('kind')!r}")
    expect = {"stage": str, "params": dict, "inputs": dict, "metrics": dict, "fingerprint": str, "files": dict}
    for key, typ in expect.items():
        if not isinstance(m.get(key), typ):
            raise CaloraError(f"invalid manifest {where}: field {key!r} missing or not a {typ.__name__}")
    if not isinstance(m.get("lineage", []), list):
        raise CaloraError(f"invalid manifest {where}: field 'lineage' is not a list")
    for name in m["files"]:
        _check_inside(path, name, where)
    for name in m.get("extra_files", {}):
        _check_inside(path, name, where)
    return m


def _check_inside(root: Path, rel: str, where: Path) -> None:
    """Refuse manifest paths that point outside the artifact (absolute, `..`, symlinks out)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise CaloraError(f"invalid manifest {where}: path {rel!r} points outside the artifact")
    real_root = root.resolve()
    if real_root not in (root / p).resolve().parents:
        raise CaloraError(f"invalid manifest {where}: path {rel!r} points outside the artifact")


def open_artifact(path: Path | str, expect: str | None = None, role: str = "input") -> Artifact:
    """Check an artifact directory and describe it; raises CaloraError on anything wrong.

    Accepts calora artifacts and plain transformers/peft directories (fingerprinted on the fly).
    `expect` ("model" or "adapter") refuses the other kind with a message naming both.
    """
    path = Path(path)
    if not path.exists():
        raise CaloraError(f"{role} {path} does not exist")
    if not path.is_dir():
        raise CaloraError(f"{role} {path} is not a directory (artifacts are directories)")
    manifest = None
    if (path / MANIFEST).exists():
        try:
            raw = json.loads((path / MANIFEST).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CaloraError(f"invalid manifest {path / MANIFEST}: {e}") from None
        manifest = _validate_manifest(path, raw)
        kind = manifest["kind"]
    elif (path / "adapter_config.json").exists():
        kind = "adapter"
    elif (path / "config.json").exists():
        kind = "model"
    else:
        raise CaloraError(f"{role} {path} is not a model or adapter (no config.json or adapter_config.json)")
    config = "adapter_config.json" if kind == "adapter" else "config.json"
    if not (path / config).exists():
        raise CaloraError(f"{role} {path} is {_a(kind)} artifact without {config}")
    if expect and kind != expect:
        raise CaloraError(f"{role} {path} is {_a(kind)}, expected {_a(expect)}")

    weights = safetensors_files(path)
    if not weights and kind == "model" and (path / GGUF_MODEL).is_file():
        check_gguf_header(path / GGUF_MODEL)
        weights = [path / GGUF_MODEL]
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CaloraError(
                f"{role} {path} has only pickle weights ({', '.join(pickles)}); calora loads safetensors only "
                "(convert with transformers' save_pretrained(..., safe_serialization=True))"
            )
        raise CaloraError(f"{role} {path} has no .safetensors weights")
    for w in weights:
        if w.suffix == ".safetensors":
            read_safetensors_header(w)
    return Artifact(path=path, kind=kind, manifest=manifest, fingerprint=fingerprint(path), weights=weights)


def check_adapter_base(adapter: Artifact, model: Artifact, allow_mismatch: bool = False) -> str | None:
    """Refuse an adapter trained on a model that `model` does not descend from.

    Returns a warning string when the check could not be made (no recorded base), else None.
    """
    base = adapter.base_fingerprint
    if base is None:
        return f"adapter {adapter.path} records no base fingerprint; assuming it fits {model.path}"
    if base in model.lineage or allow_mismatch:
        return None
    raise CaloraError(
        f"adapter {adapter.path} was trained on another base ({base[:19]}…), and {model.path} "
        f"({model.fingerprint[:19]}…) does not descend from it; pass --allow-base-mismatch to use it anyway"
    )


# --- writing artifacts -----------------------------------------------------------------------


def check_output(out: Path, force: bool) -> None:
    """Fail before any work if OUT exists and --force was not given."""
    if out.exists() and not force:
        raise CaloraError(f"output {out} already exists (pass --force to replace it)")


def _remove_stale(out: Path) -> None:
    """Remove temp dirs beside OUT left by a killed run (named with the pid of a dead process)."""
    for d in out.parent.glob(f"{glob.escape(out.name)}.[to][ml][pd]-*"):
        try:
            pid = int(d.name[len(out.name) + 5 :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


@contextlib.contextmanager
def atomic_output(out: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside OUT; on success rename it to OUT, on any failure remove it.

    An interrupted stage therefore never leaves a partial OUT behind. With --force, an existing OUT
    is replaced only once the new one is complete.
    """
    from calora_cli.ranks import is_writer

    out = Path(out)
    if not is_writer():  # rank 0 of a distributed run writes OUT (and may have already): use a throwaway dir
        with tempfile.TemporaryDirectory(prefix="calora-rank-") as scratch:
            yield Path(scratch)
        return
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(
    root: Path,
    *,
    kind: str,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, Any],
    metrics: dict[str, Any],
    base_fingerprint: str | None = None,
    lineage: list[str] | None = None,
    extra_files: dict[str, str] | None = None,
    known_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write calora.json last, once every other file of the artifact is in place (`known_hashes`:
    see `full_hashes`).

    No timestamps or host names: equal inputs and seed must give byte-identical artifacts.
    """
    assert kind in KINDS
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "stage": stage,
        "params": params,
        "calora_version": __version__,
        "inputs": inputs,
        "metrics": metrics,
        "fingerprint": fingerprint(root),
        "files": full_hashes(root, known_hashes),
    }
    if base_fingerprint is not None:
        manifest["base_fingerprint"] = base_fingerprint
    if lineage is not None:
        manifest["lineage"] = lineage
    if extra_files:
        manifest["extra_files"] = extra_files
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n")
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write a JSON file via a temp file in the same directory and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def verify(art: Artifact) -> dict[str, Any]:
    """Recompute every hash; report mismatches against the manifest (if there is one)."""
    hashes = full_hashes(art.path)
    problems: list[str] = []
    if art.manifest is not None:
        recorded = art.manifest["files"]
        for name in sorted(set(recorded) | set(hashes)):
            if name not in hashes:
                problems.append(f"missing file {name}")
            elif name not in recorded:
                problems.append(f"file not in manifest: {name}")
            elif recorded[name] != hashes[name]:
                problems.append(f"content changed: {name}")
        if art.manifest["fingerprint"] != art.fingerprint:
            problems.append("fingerprint differs from the manifest's")
    return {"ok": not problems, "problems": problems, "files": hashes}
