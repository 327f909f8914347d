"""The safetensors reader against files written by the safetensors package and transformers,
and against damaged files built here byte by byte."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import inference_pio as ip
from inference_pio import ops
from inference_pio.io import CheckpointError, CheckpointWeights, SafetensorsFile, load_checkpoint
from helpers import to_torch

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32,
                torch.int64, torch.uint8, torch.bool]
SHAPES = [(3, 5, 7), (13,), (1,), (), (0,), (2, 0, 3), (1, 1, 1, 9)]


def _sample(shape, dtype, gen):
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=gen).to(dtype)
        if x.numel() >= 4:  # bit patterns that value comparisons would blur
            flat = x.view(-1)
            flat[:4] = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf")])
        return x
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2 ** 62)), min(info.max, 2 ** 62), shape,
                         generator=gen, dtype=torch.int64).to(dtype)


def _raw(x):
    """The bytes of a torch tensor, as a uint8 tensor (bit-exact comparison, NaN included)."""
    x = x.contiguous().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    return x.view(torch.uint8)


def _assert_same(ours, ref):
    got = to_torch(ours)
    assert tuple(got.shape) == tuple(ref.shape)
    assert torch.equal(_raw(got), _raw(ref))


def test_every_dtype_and_shape_round_trips_bit_exact(tmp_path, gen):
    tensors = {f"{str(d).split('.')[1]}_{i}": _sample(s, d, gen)
               for d in TORCH_DTYPES for i, s in enumerate(SHAPES)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "hello"})
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert len(f) == len(tensors)
        assert f.metadata == {"format": "pt", "note": "hello"}
        for name, ref in tensors.items():
            t = f.get(name)
            expected = ip.uint8 if ref.dtype == torch.bool else {
                torch.float32: ip.float32, torch.float16: ip.float16, torch.bfloat16: ip.bfloat16,
                torch.int8: ip.int8, torch.int32: ip.int32, torch.int64: ip.int64,
                torch.uint8: ip.uint8}[ref.dtype]
            assert t.dtype == expected and t.shape == tuple(ref.shape)
            _assert_same(t, ref)


def test_no_metadata_gives_empty_dict_and_unknown_name_is_key_error(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with SafetensorsFile(path) as f:
        assert f.metadata == {}
        assert "w" in f and "x" not in f
        with pytest.raises(KeyError, match="'x'"):
            f.get("x")


def test_get_is_a_read_only_zero_copy_view_of_the_mapping(tmp_path, gen):
    a, b = torch.randn(4, 8, generator=gen), torch.randn(16, generator=gen)
    path = tmp_path / "v.safetensors"
    save_file({"a": a, "b": b}, str(path))
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    f = SafetensorsFile(path)
    t1, t2, tb = f.get("a"), f.get("a"), f.get("b")
    assert t1.data_ptr() == t2.data_ptr()
    assert tb.data_ptr() - t1.data_ptr() == \
        header["b"]["data_offsets"][0] - header["a"]["data_offsets"][0]
    assert t1.readonly
    with pytest.raises(ValueError, match="read-only"):
        t1.fill_(0.0)
    with pytest.raises(ValueError, match="read-only"):
        t1.copy_(ip.Tensor.zeros(4, 8))
    with pytest.raises(ValueError, match="read-only"):
        ops.add(t2, t2, out=t1)
    # Computing from the view works and leaves the file untouched.
    _assert_same(ops.add(t1, t1), a + a)
    # Views outlive close(); the file refuses new reads.
    f.close()
    _assert_same(t1, a)
    with pytest.raises(CheckpointError, match="closed"):
        f.get("a")
    f.close()  # idempotent


def _tiny_qwen3(dtype=torch.float32):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    return Qwen3ForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_transformers_checkpoint_matches_state_dict(tmp_path, dtype):
    model = _tiny_qwen3(dtype)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files
    assert sum(n.endswith(".safetensors") for n in files) > 2
    state = model.state_dict()
    with load_checkpoint(tmp_path) as w:
        assert isinstance(w, CheckpointWeights)
        assert set(w.names()) == set(state) and len(w) == len(state)
        assert "model.norm.weight" in w and "nope" not in w
        seen = 0
        for name, t in w:
            _assert_same(t, state[name])
            assert t.readonly
            seen += 1
        assert seen == len(state)
        _assert_same(w["lm_head.weight"], state["lm_head.weight"])


def test_single_file_transformers_checkpoint_loads_into_a_module(tmp_path):
    model = _tiny_qwen3()
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path)
    state = model.state_dict()

    class Norm(ip.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = ip.Tensor.zeros(32)

    with CheckpointWeights(tmp_path) as w:
        assert set(w.names()) == set(state)
        for name, t in w:
            _assert_same(t, state[name])
        norm = Norm()
        norm.load_weights([("weight", w["model.norm.weight"])])
        _assert_same(norm.weight, state["model.norm.weight"])


# ---- damaged files ----

def _write(path, header, data=b"", raw_header=None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _fails(path, fragment):
    with pytest.raises(CheckpointError, match=fragment) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError) and e.value.path == str(path)


def test_missing_file(tmp_path):
    _fails(tmp_path / "absent.safetensors", "no such file")


@pytest.mark.parametrize("n", [0, 3, 7])
def test_file_shorter_than_the_length_prefix(tmp_path, n):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01" * n)
    _fails(p, "too short")


def test_header_length_beyond_the_file(tmp_path):
    p = tmp_path / "long.safetensors"
    save_file({"w": torch.ones(4)}, str(p))
    raw = p.read_bytes()
    p.write_bytes(raw[:8 + struct.unpack("<Q", raw[:8])[0] - 1])  # cut inside the header
    _fails(p, "header length .* larger than")
    p.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    _fails(p, "header length .* larger than")


@pytest.mark.parametrize("body, fragment", [
    (b"{\"w\": ", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"\"text\"", "not a JSON object"),
    (b"{\"__metadata__\": [1]}", "__metadata__ is not a JSON object"),
    (b"{\"w\": 3}", "'w': header entry is not an object"),
])
def test_bad_header_json(tmp_path, body, fragment):
    _fails(_write(tmp_path / "h.safetensors", None, raw_header=body), fragment)


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field(tmp_path, field):
    e = _entry()
    del e[field]
    _fails(_write(tmp_path / "m.safetensors", {"w": e}, bytes(8)), f"'w'.*lacks '{field}'")


def test_unknown_dtype_from_a_real_file(tmp_path):
    p = tmp_path / "f64.safetensors"
    save_file({"d": torch.ones(3, dtype=torch.float64)}, str(p))
    _fails(p, "'d': unsupported dtype 'F64'")


@pytest.mark.parametrize("entry, fragment", [
    (_entry(shape=(2.5,)), "shape .* not a list"),
    (_entry(shape=(-2,)), "shape .* not a list"),
    (_entry(offsets=(0,)), r"not \[begin, end\]"),
    (_entry(offsets=("0", 8)), r"not \[begin, end\]"),
    (_entry(offsets=(8, 0)), "out of order"),
    (_entry(offsets=(-8, 0)), "out of order"),
    (_entry(offsets=(8, 16)), "beyond the data section of 8 bytes"),
    (_entry(shape=(3,)), "span 8 bytes, shape \\[3\\] of F32 needs 12"),
    (_entry(dtype="BF16"), "span 8 bytes, shape \\[2\\] of BF16 needs 4"),
])
def test_bad_data_offsets(tmp_path, entry, fragment):
    _fails(_write(tmp_path / "o.safetensors", {"w": entry}, bytes(8)), fragment)


def test_truncated_data_section(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, str(p))
    p.write_bytes(p.read_bytes()[:-1])
    _fails(p, "beyond the data section")


def test_overlapping_tensors(tmp_path):
    header = {"a": _entry(shape=(2,), offsets=(0, 8)), "b": _entry(shape=(2,), offsets=(4, 12)),
              "empty": _entry(shape=(0,), offsets=(4, 4))}
    _fails(_write(tmp_path / "ov.safetensors", header, bytes(12)), "'a' and 'b' overlap")


def test_empty_tensors_may_share_an_offset(tmp_path):
    header = {"a": _entry(shape=(0,), offsets=(0, 0)), "b": _entry(shape=(2, 0), offsets=(0, 0)),
              "c": _entry(shape=(2,), offsets=(0, 8))}
    p = _write(tmp_path / "e.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    with SafetensorsFile(p) as f:
        assert f.get("a").shape == (0,) and f.get("b").shape == (2, 0)
        assert f.get("c").tolist() == [1.5, -2.0]


# ---- damaged checkpoint folders ----

def _folder_fails(folder, fragment, path=None):
    with pytest.raises(CheckpointError, match=fragment) as e:
        load_checkpoint(folder)
    assert str(path or folder) in str(e.value)


def _sharded(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"a": "s1.safetensors",
                                                                "b": "s2.safetensors"}}))
    return index


def test_hand_made_sharded_folder_opens_shards_lazily(tmp_path):
    _sharded(tmp_path)
    with load_checkpoint(tmp_path) as w:
        assert w.names() == ["a", "b"] and w._files == {}
        assert w["b"].tolist() == [0.0, 0.0, 0.0]
        assert list(w._files) == ["s2.safetensors"]
        assert [(n, t.tolist()) for n, t in w] == [("a", [1.0, 1.0]), ("b", [0.0, 0.0, 0.0])]


def test_missing_folder(tmp_path):
    _folder_fails(tmp_path / "nowhere", "no such checkpoint folder")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _folder_fails(tmp_path, "neither model.safetensors nor model.safetensors.index.json")


def test_missing_shard(tmp_path):
    index = _sharded(tmp_path)
    os.remove(tmp_path / "s2.safetensors")
    _folder_fails(tmp_path, "shard 's2.safetensors' is missing", index)


@pytest.mark.parametrize("text, fragment", [
    ("{\"weight_map\": ", "not valid JSON"),
    ("[]", "no \"weight_map\""),
    ("{\"metadata\": {}}", "no \"weight_map\""),
    ("{\"weight_map\": {\"a\": 1}}", "no \"weight_map\""),
])
def test_malformed_index(tmp_path, text, fragment):
    index = _sharded(tmp_path)
    index.write_text(text)
    _folder_fails(tmp_path, fragment, index)


def test_name_in_index_absent_from_its_shard(tmp_path):
    index = _sharded(tmp_path)
    doc = json.loads(index.read_text())
    doc["weight_map"]["c"] = "s1.safetensors"
    index.write_text(json.dumps(doc))
    with load_checkpoint(tmp_path) as w:
        assert "c" in w
        with pytest.raises(CheckpointError, match="'c' listed in .* not in this shard") as e:
            w["c"]
        assert str(tmp_path / "s1.safetensors") in str(e.value)
        with pytest.raises(CheckpointError, match="'c'"):
            list(w)


def test_damaged_shard_reports_the_shard(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "s1.safetensors").write_bytes(b"\x00\x01")
    with load_checkpoint(tmp_path) as w:
        with pytest.raises(CheckpointError, match="too short") as e:
            w["a"]
        assert str(tmp_path / "s1.safetensors") in str(e.value)
