"""Real-size offsets: files whose tensors lie past 2 GiB and past 4 GiB, in every format.

The files are sparse: a header written here by hand (or by the format's own library), the
file extended with `truncate` to the size its tensors need, and a few marker bytes written
with `os.pwrite` at the first and last bytes of every tensor. A 5 GB file costs a few KB of
disk, and the readers must find each marker where the header says the tensor lies."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30

# a Llama-7B-like shape with few layers, float32: one layer is about 709 MB
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 4096, 11008, 32, 8, 32000
HEAD_DIM = HIDDEN // HEADS


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of a tied Llama, in the order transformers lists its parameters."""
    kv = KV_HEADS * HEAD_DIM
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)),
                (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
                (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, FFN))]
    return out


def nbytes_f32(shape) -> int:
    n = 4
    for d in shape:
        n *= d
    return n


def markers(k: int) -> tuple[bytes, bytes]:
    """The float32 bytes written at the first and last element of tensor number k."""
    return np.float32(1.5 + k).tobytes(), np.float32(-0.25 - k).tobytes()


def sparse_file(path: Path, head: bytes, size: int, spans: list[tuple[int, int]]) -> None:
    """``head`` at byte 0, the file extended (a hole) to ``size`` bytes, and the markers of
    tensor k at the first and last 4 bytes of spans[k] = (absolute offset, byte count)."""
    with open(path, "wb") as f:
        f.write(head)
    os.truncate(path, size)
    fd = os.open(path, os.O_WRONLY)
    try:
        for k, (offset, n) in enumerate(spans):
            first, last = markers(k)
            os.pwrite(fd, first, offset)
            os.pwrite(fd, last, offset + n - 4)
    finally:
        os.close(fd)
    assert os.path.getsize(path) == size


def check_markers(arrays: dict, names_in_order: list[str]) -> None:
    """Every tensor's first and last float32 are its markers (a wrong offset reads zeros or
    another tensor's marker)."""
    for k, name in enumerate(names_in_order):
        flat = np.asarray(arrays[name]).reshape(-1)
        first, last = markers(k)
        assert flat[:1].tobytes() == first and flat[-1:].tobytes() == last, name


def disk_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --------------------------------------------------------------------------- builders

def safetensors_head(tensors: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """A safetensors header (tensors contiguous in the given order) and each tensor's
    offset in the data section."""
    header, offsets, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in tensors:
        n = nbytes_f32(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + n]}
        offsets.append(at)
        at += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


def write_sparse_safetensors(path: Path, tensors) -> list[tuple[int, int]]:
    """A sparse safetensors file; returns each tensor's (absolute offset, byte count)."""
    head, offsets = safetensors_head(tensors)
    spans = [(len(head) + o, nbytes_f32(s)) for o, (_, s) in zip(offsets, tensors)]
    sparse_file(path, head, spans[-1][0] + spans[-1][1], spans)
    return spans


def write_config(directory: Path, layers: int) -> None:
    """config.json as transformers writes it for this shape."""
    import transformers
    transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             vocab_size=VOCAB, tie_word_embeddings=True,
                             max_position_embeddings=4096).save_pretrained(directory)


def far_spans(spans) -> tuple[int, int]:
    """How many tensors begin past 2 GiB and past 4 GiB."""
    return sum(o >= 2 * GiB for o, _ in spans), sum(o >= 4 * GiB for o, _ in spans)


# --------------------------------------------------------------------------- safetensors

@pytest.fixture(scope="module")
def st_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    tensors = llama_tensors(6) + [("model.norm.weight", (HIDDEN,))]
    spans = write_sparse_safetensors(path, tensors)
    return path, tensors, spans


def test_safetensors_file_past_4gib(st_file):
    from apr.model import open_model, stored_spans
    from apr.safetensors_io import SafetensorsFile
    path, tensors, spans = st_file
    names = [n for n, _ in tensors]
    past2, past4 = far_spans(spans)
    assert os.path.getsize(path) > 4 * GiB and past2 > 10 and past4 >= 2
    assert disk_bytes(path) < 1 << 20                       # sparse: markers only

    st = SafetensorsFile(path)
    assert [(e.begin, e.end - e.begin) for e in st.entries.values()] == spans
    check_markers({n: st.raw(n) for n in names}, names)

    view = open_model(path)
    assert view.info["size_bytes"] == os.path.getsize(path)
    check_markers({n: t.raw() for n, t in view.tensors.items()}, names)
    # read() seeks to the far offset and copies; numpy() decodes it
    norm = view.tensors["model.norm.weight"]
    assert norm.file_span[1] > 4 * GiB
    values = norm.numpy()
    first, last = markers(len(names) - 1)
    assert values[0] == np.frombuffer(first, np.float32)[0] and values[-1] == np.frombuffer(last, np.float32)[0]
    assert not values[1:-1].any()
    assert np.array_equal(norm.read(), st.raw("model.norm.weight"))
    view.close()

    spans_by_name = stored_spans(path)
    assert [(spans_by_name[n].offset, spans_by_name[n].nbytes) for n in names] == spans


def test_safetensors_library_reads_the_same_bytes(st_file):
    """The header written here by hand is valid: the safetensors library reads the far
    tensors where our reader does."""
    from safetensors import safe_open
    from apr.safetensors_io import SafetensorsFile
    path, tensors, spans = st_file
    ours = SafetensorsFile(path)
    with safe_open(str(path), framework="numpy") as f:
        assert list(f.keys()) == sorted(n for n, _ in tensors)
        for name in ("model.layers.3.input_layernorm.weight", "model.layers.5.post_attention_layernorm.weight",
                     "model.norm.weight"):
            assert np.array_equal(f.get_tensor(name), ours.raw(name)), name
        down = "model.layers.5.mlp.down_proj.weight"        # 180 MB: its first and last rows
        sl = f.get_slice(down)
        assert np.array_equal(sl[0:1], ours.raw(down)[0:1])
        assert np.array_equal(sl[HIDDEN - 1:HIDDEN], ours.raw(down)[HIDDEN - 1:HIDDEN])
        assert ours.entries[down].begin > 4 * GiB


def test_safetensors_writer_header_past_4gib(tmp_path):
    """The writer's header for tensors past 4 GiB, read by the safetensors library."""
    from safetensors import safe_open
    from apr.dtypes import dtype_by_name
    from apr.safetensors_io import SafetensorsFile, StTensor, safetensors_header
    tensors = llama_tensors(6) + [("model.norm.weight", (HIDDEN,))]
    f32 = dtype_by_name("F32")
    head = safetensors_header([StTensor(n, f32, s, lambda: None) for n, s in tensors])
    hand, offsets = safetensors_head(tensors)
    spans = [(len(head) + o, nbytes_f32(s)) for o, (_, s) in zip(offsets, tensors)]
    path = tmp_path / "w.safetensors"
    sparse_file(path, head, spans[-1][0] + spans[-1][1], spans)
    st = SafetensorsFile(path)
    assert [(e.begin, e.end - e.begin) for e in st.entries.values()] == spans
    with safe_open(str(path), framework="numpy") as f:
        assert np.array_equal(f.get_tensor("model.norm.weight"), st.raw("model.norm.weight"))
    first, last = markers(len(tensors) - 1)
    assert st.raw("model.norm.weight")[-1:].tobytes() == last and spans[-1][0] > 4 * GiB


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """An HF directory of 10 layers in two shards (4.8 GB and 2.8 GB), with the index
    transformers writes (weight_map and metadata.total_size)."""
    d = tmp_path_factory.mktemp("hf")
    tensors = llama_tensors(10) + [("model.norm.weight", (HIDDEN,))]
    cut = 1 + 6 * 9                                         # embeddings and layers 0-5
    shards = {"model-00001-of-00002.safetensors": tensors[:cut],
              "model-00002-of-00002.safetensors": tensors[cut:]}
    spans = {}
    for fname, part in shards.items():
        spans[fname] = write_sparse_safetensors(d / fname, part)
    total = sum(nbytes_f32(s) for _, s in tensors)
    index = {"metadata": {"total_size": total},
             "weight_map": {n: f for f, part in shards.items() for n, _ in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_config(d, 10)
    return d, shards, spans


def test_hf_sharded_directory_past_4gib(hf_sharded):
    from apr.model import open_model
    d, shards, spans = hf_sharded
    first_shard = d / "model-00001-of-00002.safetensors"
    assert os.path.getsize(first_shard) > 4 * GiB and far_spans(spans[first_shard.name])[1] >= 2
    assert os.path.getsize(d / "model-00002-of-00002.safetensors") > 2 * GiB
    assert far_spans(spans["model-00002-of-00002.safetensors"])[0] > 5
    with open_model(d) as view:
        assert view.format == "hf" and view.config.num_layers == 10
        assert view.config.hidden_size == HIDDEN and view.config.tie_word_embeddings
        assert view.info["size_bytes"] == sum(os.path.getsize(d / f) for f in shards)
        for fname, part in shards.items():
            names = [n for n, _ in part]
            check_markers({n: view.tensors[n].raw() for n in names}, names)
            assert [view.tensors[n].file_span for n in names] == [(d / fname, o) for o, _ in spans[fname]]


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_inspect_cli_on_sharded_directory_past_4gib(hf_sharded):
    d, shards, _ = hf_sharded
    r = cli("inspect", d, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "hf" and doc["tensor_count"] == 1 + 10 * 9 + 1
    assert doc["size_bytes"] == sum(os.path.getsize(d / f) for f in shards) > 7 * GiB
    assert doc["config"]["num_layers"] == 10


def test_diff_spans_past_4gib(st_file, tmp_path):
    """diff's read-ahead plan carries offsets past 2^32 through its JSON, and compares bytes
    there."""
    from diff.ahead import DIFFERENT, EQUAL, _pair, equal_spans, plan
    path, tensors, spans = st_file
    other = tmp_path / "model.safetensors"
    assert write_sparse_safetensors(other, tensors) == spans
    pairs = plan(path, other)
    assert len(pairs) == len(tensors)
    wire = [_pair(p) for p in json.loads(json.dumps(pairs))]
    far = [p for p in wire if p[1] > 4 * GiB]
    assert far and all(p[1] == p[3] for p in far)
    bufs = (bytearray(1 << 16), bytearray(1 << 16))
    _, oa, _, ob, n = far[-1]
    with open(path, "rb", buffering=0) as fa, open(other, "rb", buffering=0) as fb:
        assert equal_spans(fa, fb, oa, ob, n, bufs) == EQUAL
        fd = os.open(other, os.O_WRONLY)
        os.pwrite(fd, b"\x01", ob + n - 1)
        os.close(fd)
        assert equal_spans(fa, fb, oa, ob, n, bufs) == DIFFERENT


# --------------------------------------------------------------------------- GGUF

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def gguf_writer_for(path: Path, tensors, layers: int):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    return w


def sparse_gguf_from_header(path: Path, tensors) -> list[tuple[int, int]]:
    """Extend a GGUF file that holds header, key/values and tensor infos to its full size
    (offsets as gguf's GGUFReader reads them) and write the markers."""
    import gguf
    align = 32
    head = path.read_bytes()
    data_start = -(-len(head) // align) * align
    at, spans = 0, []
    for _, shape in tensors:
        spans.append((data_start + at, nbytes_f32(shape)))
        at += -(-nbytes_f32(shape) // align) * align
    sparse_file(path, head, spans[-1][0] + spans[-1][1], spans)
    r = gguf.GGUFReader(str(path))
    assert [(t.name, int(t.data_offset), int(t.n_bytes)) for t in r.tensors] == \
        [(gguf_name(n), o, b) for (n, _), (o, b) in zip(tensors, spans)]
    return spans


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF of a 6-layer Llama written by gguf's GGUFWriter (header, key/values, tensor
    infos), then made sparse."""
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    tensors = llama_tensors(6) + [("model.norm.weight", (HIDDEN,))]
    w = gguf_writer_for(path, tensors, 6)
    for name, shape in tensors:
        w.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), nbytes_f32(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path, tensors, sparse_gguf_from_header(path, tensors)


def test_gguf_past_4gib(gguf_file):
    from apr.gguf_io import GgufFile
    from apr.model import open_model
    path, tensors, spans = gguf_file
    assert os.path.getsize(path) > 4 * GiB and far_spans(spans)[1] >= 2
    assert disk_bytes(path) < 1 << 20
    g = GgufFile(path)
    gnames = [gguf_name(n) for n, _ in tensors]
    assert [(g.entries[n].offset, g.entries[n].nbytes) for n in gnames] == spans
    check_markers({n: g.raw(n) for n in gnames}, gnames)
    with open_model(path) as view:
        assert view.config.num_layers == 6 and view.config.hidden_size == HIDDEN
        names = [n for n, _ in tensors]
        check_markers({n: view.tensors[n].raw() for n in names}, names)
        norm = view.tensors["model.norm.weight"]
        assert norm.file_span == (path, spans[-1][0]) and spans[-1][0] > 4 * GiB
        assert norm.read()[-1:].tobytes() == markers(len(names) - 1)[1]


def test_gguf_writer_offsets_past_4gib(tmp_path):
    """write_gguf's tensor infos for tensors past 4 GiB, read by gguf's GGUFReader: the
    writer is stopped after its header (the data would be 4.8 GB) and the file extended."""
    from apr.dtypes import dtype_by_name
    from apr.gguf_io import GgufTensor, write_gguf

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    path = tmp_path / "w.gguf"
    tensors = llama_tensors(6) + [("model.norm.weight", (HIDDEN,))]
    ref = gguf_writer_for(tmp_path / "ref.gguf", tensors, 6)
    kv = [(k, v.value, v.type) for k, v in ref.kv_data[0].items()]
    f32 = dtype_by_name("F32")
    with pytest.raises(Stop):
        write_gguf(path, "llama", kv, [GgufTensor(gguf_name(n), f32, s, stop, nbytes_f32(s))
                                        for n, s in tensors])
    spans = sparse_gguf_from_header(path, tensors)
    assert spans[-1][0] > 4 * GiB


# --------------------------------------------------------------------------- APR

def apr_bytes(tensors, meta: dict) -> tuple[bytes, list[tuple[int, int]], int]:
    """Header, metadata and index of an APR v2 file, written from the format's description:
    returns them, each tensor's (absolute offset, byte count) in index order, and the file
    size (data, then the 4-byte footer)."""
    pad = lambda n: -(-n // 64) * 64                         # noqa: E731
    meta_blob = json.dumps(meta, separators=(",", ":")).encode()
    order = sorted(tensors, key=lambda t: t[0].encode())
    index, at, rel = b"", 0, []
    for name, shape in order:
        raw = name.encode()
        index += struct.pack("<H", len(raw)) + raw + struct.pack(f"<BB{len(shape)}QQQ", 0, len(shape),
                                                                  *shape, at, nbytes_f32(shape))
        rel.append((at, nbytes_f32(shape)))
        at += pad(nbytes_f32(shape))
    index_off = 64 + pad(len(meta_blob))
    data_off = index_off + pad(len(index))
    fields = [b"APR\x00", 2, 0, 0x0400, len(order), 64, len(meta_blob), index_off, data_off]
    fmt = struct.Struct("<4sBBHIQIQQI20s")
    blank = fmt.pack(*fields, 0, bytes(20))
    header = fmt.pack(*fields, zlib.crc32(blank[:40] + blank[44:]), bytes(20))
    head = header + meta_blob.ljust(index_off - 64, b"\0") + index.ljust(data_off - index_off, b"\0")
    spans = [(data_off + o, n) for o, n in rel]
    size = spans[-1][0] + pad(spans[-1][1]) + 4
    return head, spans, size


APR_META = {"architecture": "llama", "hidden_size": HIDDEN, "num_layers": 6, "num_heads": HEADS,
            "num_kv_heads": KV_HEADS, "vocab_size": VOCAB, "intermediate_size": FFN,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def apr_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("apr") / "model.apr"
    tensors = llama_tensors(6) + [("model.norm.weight", (HIDDEN,))]
    head, spans, size = apr_bytes(tensors, APR_META)
    sparse_file(path, head, size, spans)
    return path, sorted(tensors, key=lambda t: t[0].encode()), spans


def test_apr_past_4gib(apr_file):
    from apr.container import AprFile
    from apr.model import open_model
    path, tensors, spans = apr_file
    names = [n for n, _ in tensors]
    assert os.path.getsize(path) > 4 * GiB and far_spans(spans)[1] >= 2
    assert disk_bytes(path) < 1 << 20
    with AprFile.open(path) as f:
        assert [(f.data_offset + e.offset, e.size) for e in f.tensors.values()] == spans
        check_markers({n: f.raw(n) for n in names}, names)
    # open_model reads without the footer check (verify=False): the footer here is not the
    # CRC of 4.8 GB, which `inspect` and verify=True would compute
    with open_model(path) as view:
        assert view.config.num_layers == 6 and view.config.intermediate_size == FFN
        check_markers({n: view.tensors[n].raw() for n in names}, names)
        norm = view.tensors["model.norm.weight"]
        k = names.index("model.norm.weight")
        assert norm.file_span == (path, spans[k][0]) and spans[k][0] > 4 * GiB
        assert norm.read()[:1].tobytes() == markers(k)[0]


def test_apr_writer_index_past_4gib(apr_file):
    """The writer's plan, index and header for these tensors are the bytes written by hand
    from the format's description (offsets past 4 GiB as u64)."""
    from apr.container import _plan, encode_entry, pack_header, pad64, TensorSource
    from apr.dtypes import dtype_by_name
    path, tensors, spans = apr_file
    f32 = dtype_by_name("F32")
    entries = _plan([TensorSource(n, f32, s, lambda: None) for n, s in tensors])
    index = b"".join(encode_entry(e) for e in entries)
    meta = json.dumps(APR_META, separators=(",", ":")).encode()
    index_off = 64 + pad64(len(meta))
    data_off = index_off + pad64(len(index))
    header = pack_header(0x0400, len(entries), len(meta), index_off, data_off)
    with open(path, "rb") as f:
        on_disk = f.read(data_off)
    assert on_disk[:64] == header and on_disk[index_off:index_off + len(index)] == index
    assert [(data_off + e.offset, e.size) for e in entries] == spans


# --------------------------------------------------------------------------- refusals

def refused(path: Path, *words: str) -> str:
    """`inspect` refuses the file with one `error:` line naming ``words``; exit code 2."""
    r = cli("inspect", path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_offsets_past_the_end_are_refused(tmp_path):
    """A tensor that reaches past the end of a 4.3 GB file, in each format: one error line."""
    tensors = [("a", (1024,)), ("big", (GiB + 16,))]       # 'big' ends 64 bytes past 4 GiB

    st = tmp_path / "cut.safetensors"
    spans = write_sparse_safetensors(st, tensors)
    os.truncate(st, spans[-1][0] + spans[-1][1] - 8)
    refused(st, "truncated", "'big'", str(spans[-1][0] + spans[-1][1]))

    head, spans, size = apr_bytes(tensors, {})
    apr = tmp_path / "cut.apr"
    sparse_file(apr, head, size, spans)
    os.truncate(apr, spans[-1][0] + spans[-1][1])           # no room for the footer
    refused(apr, "truncated", "'big'")

    import gguf
    gg = tmp_path / "cut.gguf"
    w = gguf.GGUFWriter(str(gg), "llama")
    for name, shape in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes_f32(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    head = gg.read_bytes()
    sparse_file(gg, head, 4 * GiB + 1024, [])
    refused(gg, "truncated", "'big'")


def test_the_issue_offset_opens(tmp_path):
    """The file of the report: a bf16 tensor whose data_offsets[1] is 2216751104, once
    refused as 'out of range (|value| <= 2147483647)'."""
    from apr.safetensors_io import SafetensorsFile
    n0 = 2216751104 - 2048 * 8192 * 2
    header = {"model.layers.0.pad": {"dtype": "BF16", "shape": [n0 // 2], "data_offsets": [0, n0]},
              "model.layers.2.mlp.gate_proj.weight": {"dtype": "BF16", "shape": [8192, 2048],
                                                      "data_offsets": [n0, 2216751104]}}
    blob = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    sparse_file(path, struct.pack("<Q", len(blob)) + blob, 8 + len(blob) + 2216751104, [])
    st = SafetensorsFile(path)
    assert st.entries["model.layers.2.mlp.gate_proj.weight"].end == 8 + len(blob) + 2216751104
    r = cli("inspect", path, "--json")
    assert r.returncode == 0 and "out of range" not in r.stderr, r.stderr


def write_header_only(path: Path, header: dict, size: int) -> None:
    blob = json.dumps(header).encode()
    sparse_file(path, struct.pack("<Q", len(blob)) + blob, 8 + len(blob) + size, [])


@pytest.mark.parametrize("offsets, shape, words", [
    ([[0, 4 * GiB], [4 * GiB - 64, 8 * GiB - 64]], [GiB], ["overlap", "'a'", "'b'"]),
    ([[0, 4 * GiB], [4 * GiB, 8 * GiB + 4]], [GiB], ["'b'", "expected 4294967296"]),
    ([[0, 4 * GiB], [4 * GiB, 2 ** 64]], [GiB], ["'b'", "data_offsets[1]", str(2 ** 64)]),
    ([[0, 4 * GiB], [-4, 4 * GiB - 4]], [GiB], ["'b'", "data_offsets[0]", "-4"]),
    ([[0, 4 * GiB], [4 * GiB, 8.0 * GiB]], [GiB], ["'b'", "data_offsets[1]", "byte offset"]),
    ([[0, 4 * GiB], [4 * GiB, True]], [GiB], ["'b'", "data_offsets[1]"]),
])
def test_inconsistent_safetensors_offsets_are_refused(tmp_path, offsets, shape, words):
    from apr.errors import FormatError
    from apr.model import open_model
    header = {"a": {"dtype": "F32", "shape": [GiB], "data_offsets": offsets[0]},
              "b": {"dtype": "F32", "shape": shape, "data_offsets": offsets[1]}}
    path = tmp_path / "bad.safetensors"
    write_header_only(path, header, 8 * GiB)
    with pytest.raises(FormatError) as err:
        open_model(path)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def not_opened(path: Path, *words: str) -> None:
    from apr.errors import FormatError
    from apr.model import open_model
    with pytest.raises(FormatError) as err:
        open_model(path)
    assert all(w in str(err.value) for w in words), err.value


def test_overlapping_gguf_and_apr_tensors_are_refused(tmp_path):
    import gguf
    # GGUF: tensor infos written here with 'b' starting inside 'a' (past 4 GiB)
    gg = tmp_path / "overlap.gguf"
    w = gguf.GGUFWriter(str(gg), "llama")
    w.add_tensor_info("a", (GiB + 64,), np.dtype(np.float32), nbytes_f32((GiB + 64,)))
    w.add_tensor_info("b", (64,), np.dtype(np.float32), 256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    head = bytearray(gg.read_bytes())
    b_offset = head.rindex(struct.pack("<Q", nbytes_f32((GiB + 64,))))   # 'b''s offset field
    head[b_offset:b_offset + 8] = struct.pack("<Q", 4 * GiB + 128)
    sparse_file(gg, bytes(head), 5 * GiB, [])
    not_opened(gg, "overlap", "'a'", "'b'")
    head[b_offset:b_offset + 8] = struct.pack("<Q", 4 * GiB + 256 + 4)      # misaligned
    sparse_file(gg, bytes(head), 5 * GiB, [])
    not_opened(gg, "'b'", "alignment")

    # APR: 'b' placed inside 'a' by its index entry
    head, spans, size = apr_bytes([("a", (GiB + 64,)), ("b", (64,))], {})
    head = bytearray(head)
    at = head.rindex(struct.pack("<QQ", spans[1][0] - spans[0][0], 256))
    head[at:at + 8] = struct.pack("<Q", 4 * GiB)
    apr = tmp_path / "overlap.apr"
    sparse_file(apr, bytes(head), size, [])
    not_opened(apr, "overlap", "'a'", "'b'")


def test_apr_index_longer_than_its_entries_is_refused(tmp_path):
    """A data offset 4 GiB past a one-entry index is refused from the header, before the
    index (all 4 GiB of it) would be read."""
    head, spans, size = apr_bytes([("a", (16,))], {})
    fmt = struct.Struct("<4sBBHIQIQQI20s")
    fields = list(fmt.unpack(head[:64]))
    fields[8] += 4 * GiB                                     # data offset
    fields[9] = 0
    blank = fmt.pack(*fields)
    fields[9] = zlib.crc32(blank[:40] + blank[44:])
    apr = tmp_path / "far.apr"
    sparse_file(apr, fmt.pack(*fields) + head[64:], size + 4 * GiB, [])
    not_opened(apr, "entries can be", str(fields[8]))
