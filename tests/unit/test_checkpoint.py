"""Reading safetensors without mmap: the same tensors as the safetensors library, clear errors on bad files."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from ferry.errors import ModelLoadError
from ferry.models.checkpoint import Reader


def test_reads_what_safetensors_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, 2, generator=g).half(), "i64": torch.arange(4), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(1.5)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    ref = load_file(tmp_path / "a.safetensors")
    reader = Reader([tmp_path / "a.safetensors"])
    for name, want in ref.items():
        got = reader.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
        assert reader.shape(name) == list(want.shape)
    assert not reader.has("missing")
    with pytest.raises(ModelLoadError, match="'missing' is missing"):
        reader.get("missing")


def test_truncated_file_is_a_clear_error(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file({"w": torch.randn(64, 64)}, f)
    data = f.read_bytes()
    f.write_bytes(data[:-100])  # data cut short: the header points past the end
    with pytest.raises(ModelLoadError, match="not valid safetensors"):
        Reader([f])
    f.write_bytes(b"\xff" * 8 + data[8:])  # absurd header length
    with pytest.raises(ModelLoadError, match="not valid safetensors"):
        Reader([f])
