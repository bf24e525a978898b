"""The artifact contract: fingerprints, safetensors checks, manifests, atomic output."""

import json
import shutil
import struct

import pytest

from calora_cli.artifacts import (
    MANIFEST,
    atomic_output,
    fingerprint,
    open_artifact,
    read_safetensors_header,
    verify,
    write_manifest,
)
from calora_cli.errors import CaloraError


@pytest.fixture
def model_copy(tiny_base, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_base, dst)
    (dst / ".done").unlink(missing_ok=True)
    return dst


def test_plain_transformers_dir_is_a_model(tiny_base):
    art = open_artifact(tiny_base)
    assert art.kind == "model" and art.manifest is None
    assert art.fingerprint.startswith("sha256:") and len(art.fingerprint) == 71


def test_fingerprint_tracks_content_and_ignores_manifest(model_copy):
    fp = fingerprint(model_copy)
    write_manifest(model_copy, kind="model", stage="test", params={}, inputs={}, metrics={})
    assert fingerprint(model_copy) == fp  # the manifest is not part of the content
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(model_copy) != fp


def test_fingerprint_tells_same_shaped_models_apart(tiny_base, other_base):
    """Same architecture, same headers and sizes, other weights: a different fingerprint."""
    assert (tiny_base / "model.safetensors").stat().st_size == (other_base / "model.safetensors").stat().st_size
    assert fingerprint(tiny_base) != fingerprint(other_base)


def test_verify_catches_any_changed_byte(model_copy):
    write_manifest(model_copy, kind="model", stage="test", params={}, inputs={}, metrics={})
    w = model_copy / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2 + 1234] ^= 0xFF  # tensor data, header intact
    w.write_bytes(bytes(raw))
    report = verify(open_artifact(model_copy))
    assert not report["ok"] and report["problems"] == ["content changed: model.safetensors"]


def _header_len(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_truncated_safetensors_is_refused(model_copy):
    w = model_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CaloraError, match="header claims .* bytes of tensor data"):
        open_artifact(model_copy)


def test_garbage_safetensors_header_is_refused(model_copy):
    w = model_copy / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[8:16] = b"\xff" * 8
    w.write_bytes(bytes(raw))
    with pytest.raises(CaloraError, match="header is not valid JSON"):
        read_safetensors_header(w)
    w.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CaloraError, match="header length"):
        read_safetensors_header(w)


def test_pickle_only_weights_are_refused_not_loaded(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CaloraError, match="only pickle weights"):
        open_artifact(d)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.write_text("x"), "is not a directory"),
        (lambda d: d.mkdir(), "is not a model or adapter"),
    ],
)
def test_bad_paths(tmp_path, setup, message):
    d = tmp_path / "x"
    setup(d)
    with pytest.raises(CaloraError, match=message):
        open_artifact(d)


def test_wrong_kind_is_named(tiny_base, tiny_lora):
    with pytest.raises(CaloraError, match="is a model, expected a adapter|is a model, expected an adapter"):
        open_artifact(tiny_base, expect="adapter")
    with pytest.raises(CaloraError, match="is an adapter, expected a model"):
        open_artifact(tiny_lora, expect="model")


def test_unknown_manifest_version_and_escaping_paths(model_copy):
    write_manifest(model_copy, kind="model", stage="test", params={}, inputs={}, metrics={})
    m = json.loads((model_copy / MANIFEST).read_text())
    (model_copy / MANIFEST).write_text(json.dumps({**m, "format": 99}))
    with pytest.raises(CaloraError, match="unsupported manifest format 99"):
        open_artifact(model_copy)
    (model_copy / MANIFEST).write_text(json.dumps({**m, "extra_files": {"../../etc/passwd": "x"}}))
    with pytest.raises(CaloraError, match="points outside the artifact"):
        open_artifact(model_copy)
    (model_copy / MANIFEST).write_text(json.dumps({**m, "kind": "banana"}))
    with pytest.raises(CaloraError, match="kind must be one of"):
        open_artifact(model_copy)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(CaloraError, match="already exists"):
        with atomic_output(out):
            pass
    assert (out / "keep").read_text() == "old"
    with atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new"]
