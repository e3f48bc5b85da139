"""Structure-aware mutators for model files: each takes a seed file (or HF directory) and a
random generator and writes one mutant. Field-level mutations go through the formats' own
structure (APR metadata rewritten with valid CRCs, GGUF key/values rewritten by the gguf
library, JSON values of config.json / tokenizer.json / a safetensors header replaced), so the
mutant reaches the code past the checksums; byte-level ones (truncation at region boundaries,
bit flips) cover the rest. RoPE scaling has mutators of its own (config.json rope_parameters,
APR rope_scaling, GGUF rope_freqs.weight): a random pick among ~25 keys would seldom reach it."""
from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

# values of the wrong type or out of range: what a hostile file puts where a value belongs
HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, -(2 ** 63), 2 ** 64, 10 ** 30,
    0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), "", "x", "\ud800", "64",
    [], [1, 2], [[[]]], {}, {"a": 1}, ["a"] * 3,
)


def hostile(rng: random.Random) -> Any:
    return rng.choice(HOSTILE)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


def mutate_json_value(doc: Any, rng: random.Random, depth: int = 0) -> Any:
    """One value somewhere in a JSON document replaced by a hostile one (or a key dropped)."""
    if isinstance(doc, dict) and doc and depth < 4:
        key = rng.choice(list(doc))
        roll = rng.random()
        out = dict(doc)
        if roll < 0.1:
            del out[key]
        elif roll < 0.55 or not isinstance(doc[key], (dict, list)):
            out[key] = hostile(rng)
        else:
            out[key] = mutate_json_value(doc[key], rng, depth + 1)
        return out
    if isinstance(doc, list) and doc and depth < 4:
        i = rng.randrange(len(doc))
        out = list(doc)
        out[i] = hostile(rng) if rng.random() < 0.6 else mutate_json_value(doc[i], rng, depth + 1)
        return out
    return hostile(rng)


# RoPE scaling (config.json rope_parameters / rope_scaling, APR's rope_scaling): the keys the
# rope types read, set to edge values of the right type (zero, negative, equal low and high
# frequency factors, an original context beyond the model's) or to hostile ones
ROPE_KEYS = ("rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "partial_rotary_factor", "truncate", "freq_factors")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "LLAMA3", "")
ROPE_VALUES = (0, 0.0, -1.0, -8.0, 1e-300, 0.5, 1.0, 4.0, 8.0, 64, 256, 257, 65536, 2 ** 31,
               2 ** 63, 1e308, float("inf"), float("nan"), [1.0] * 8, [0.0] * 8)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0}


def mutate_rope(params: Any, rng: random.Random) -> Any:
    """A RoPE-scaling object with one entry changed: a key set to an edge or hostile value,
    the type switched, a key dropped; rarely the whole object replaced. A seed without
    scaling starts from a valid llama3 object."""
    if rng.random() < 0.05:
        return hostile(rng)
    out = dict(params) if isinstance(params, dict) and params.get("rope_type", "default") != "default" \
        else {**(params if isinstance(params, dict) else {}), **LLAMA3_ROPE}
    roll = rng.random()
    if roll < 0.15:
        del out[rng.choice(list(out))]
    elif roll < 0.3:
        out["rope_type"] = rng.choice(ROPE_TYPES)
    else:
        key = rng.choice(ROPE_KEYS)
        out[key] = rng.choice(ROPE_VALUES) if rng.random() < 0.7 else hostile(rng)
        if rng.random() < 0.3:          # two at once: e.g. low_freq_factor = high_freq_factor
            out[rng.choice(ROPE_KEYS)] = rng.choice(ROPE_VALUES)
    return out


# --------------------------------------------------------------------------- JSON text
# What a JSON parser sees before any reader does: integers past Python's limits (int() refuses
# more than 4,300 digits; float() overflows past 309), nesting past the recursion limit, a key
# twice in one object, a byte-order mark. Written as text, since json.dumps makes none of them.

_SENTINEL = "\u0000apr-ref-splice\u0000"


def _place(doc: Any, rng: random.Random, value: Any, depth: int = 0) -> Any:
    """``doc`` with ``value`` put somewhere (a value replaced or a key added)."""
    if isinstance(doc, dict) and doc and depth < 4:
        out = dict(doc)
        key = rng.choice(list(doc))
        if isinstance(doc[key], (dict, list)) and doc[key] and rng.random() < 0.6:
            out[key] = _place(doc[key], rng, value, depth + 1)
        else:
            out[key if rng.random() < 0.8 else "apr_ref_added"] = value
        return out
    if isinstance(doc, list) and doc and depth < 4:
        out = list(doc)
        i = rng.randrange(len(doc))
        out[i] = _place(doc[i], rng, value, depth + 1) if rng.random() < 0.5 else value
        return out
    return value


def _splice(doc: Any, rng: random.Random, raw: str) -> str:
    """JSON text of ``doc`` with the raw text ``raw`` somewhere a value belongs."""
    return _json_text(_place(doc, rng, _SENTINEL)).replace(_json_text(_SENTINEL), raw, 1)


def huge_integer(rng: random.Random) -> str:
    return rng.choice(("", "-")) + "9" * rng.choice((21, 101, 310, 4301, 5000))


def deep_nesting(rng: random.Random) -> str:
    n = rng.choice((101, 990, 2000, 100_000))
    return ("[" * n + "1" + "]" * n) if rng.random() < 0.5 else ('{"a":' * n + "1" + "}" * n)


def duplicate_key(doc: Any, rng: random.Random) -> str:
    """An object of ``doc`` with one of its keys written twice (the second a hostile value)."""
    objects = []
    stack = [doc]
    while stack and len(objects) < 64:
        x = stack.pop()
        if isinstance(x, dict) and x:
            objects.append(x)
            stack.extend(v for v in x.values() if isinstance(v, (dict, list)))
        elif isinstance(x, list):
            stack.extend(v for v in x[:16] if isinstance(v, (dict, list)))
    if not objects:
        return _json_text(doc)
    target = rng.choice(objects)
    key = rng.choice(list(target))
    target["apr_ref_dup"] = _SENTINEL          # the document's own object, changed in place
    text = _json_text(doc)
    del target["apr_ref_dup"]
    return text.replace(f"{_json_text('apr_ref_dup')}: {_json_text(_SENTINEL)}",
                        f"{_json_text(key)}: {_json_text(hostile(rng))}", 1)


def mutate_json_text(doc: Any, rng: random.Random) -> str:
    """JSON text of ``doc`` with one of: a huge integer, deep nesting, a key twice, a BOM."""
    roll = rng.random()
    if roll < 0.3:
        return _splice(doc, rng, huge_integer(rng))
    if roll < 0.6:
        return _splice(doc, rng, deep_nesting(rng))
    if roll < 0.9:
        return duplicate_key(doc, rng)
    return "\ufeff" + _json_text(doc)


# --------------------------------------------------------------------------- byte level

def truncate(src: Path, dst: Path, rng: random.Random, boundaries: list[int]) -> None:
    data = src.read_bytes()
    cut = rng.choice(boundaries + [rng.randrange(len(data))]) if boundaries else rng.randrange(len(data))
    cut = max(0, min(len(data) - 1, cut + rng.choice((-1, 0, 0, 1))))
    dst.write_bytes(data[:cut])


def bit_flip(src: Path, dst: Path, rng: random.Random, region: tuple[int, int] | None = None) -> None:
    data = bytearray(src.read_bytes())
    lo, hi = region or (0, len(data))
    for _ in range(rng.choice((1, 1, 2, 8))):
        i = rng.randrange(lo, max(lo + 1, min(hi, len(data))))
        data[i] ^= 1 << rng.randrange(8)
    dst.write_bytes(bytes(data))


def named(name: str, fn: Callable) -> Callable:
    """``fn`` under a name a failure report can print."""
    fn.__name__ = name
    return fn


# --------------------------------------------------------------------------- APR

def _apr_layout(data: bytes) -> tuple[int, int, int]:
    meta_size = struct.unpack_from("<I", data, 20)[0]
    index_off, data_off = struct.unpack_from("<QQ", data, 24)
    return 64 + meta_size, index_off, data_off


def _fix_header_crc(data: bytearray) -> None:
    crc = zlib.crc32(bytes(data[0:40]) + bytes(data[44:64])) & 0xFFFFFFFF
    struct.pack_into("<I", data, 40, crc)


def _fix_footer_crc(data: bytearray) -> None:
    struct.pack_into("<I", data, len(data) - 4, zlib.crc32(bytes(data[:-4])) & 0xFFFFFFFF)


def apr_tensors(src: Path) -> list:
    """The tensors of an APR file as writer sources (stored bytes, as they are)."""
    import numpy as np
    from apr.container import AprFile, TensorSource
    with AprFile.open(src) as f:
        raw = {n: (e.dtype, e.shape, np.array(f.raw(n)).tobytes()) for n, e in f.tensors.items()}
    return [TensorSource(n, dt, shape, (lambda b=b: np.frombuffer(b, np.uint8)))
            for n, (dt, shape, b) in raw.items()]


def write_apr_as_stranger(dst: Path, meta: dict, sources: list, text: str | None = None) -> None:
    """Our container writer (valid CRCs), but with metadata JSON as another writer may produce
    it: NaN, Infinity and lone surrogates as escapes (which our writer refuses), or ``text``
    as it is (a huge integer, deep nesting, a key twice, a BOM)."""
    from unittest import mock

    from apr.container import write_apr

    def raw_json(m):
        if text is not None:
            return text.encode("utf-8", "surrogatepass")
        return json.dumps(m, ensure_ascii=True, allow_nan=True).encode()
    with mock.patch("apr.container.metadata_json", raw_json):
        write_apr(dst, meta, sources)


def apr_json_text(src: Path, dst: Path, rng: random.Random) -> None:
    """The metadata section as JSON text no writer of ours makes (`mutate_json_text`), with
    valid CRCs."""
    from apr.container import AprFile
    with AprFile.open(src) as f:
        meta = dict(f.metadata)
    write_apr_as_stranger(dst, meta, apr_tensors(src), mutate_json_text(meta, rng))


PAD_NAMES = ("<|pad_0|>", "<|pad_1|>", "<unk>", "<s>", "</s>", "", " ", "\n", "a\u2028b")


def apr_tokenizer(src: Path, dst: Path, rng: random.Random) -> None:
    """The embedded tokenizer's tables changed where a random pick among ~25 keys seldom
    lands: a token renamed (to a row-pad name at another id, to a special token's name, to
    another token's string), a score beyond float32 (-1e308), a token type out of range."""
    from apr.container import AprFile, write_apr
    with AprFile.open(src) as f:
        meta = dict(f.metadata)
    vocab = list(meta.get("tokenizer.vocabulary") or [])
    roll = rng.random()
    if vocab and roll < 0.5:
        i = rng.randrange(len(vocab))
        vocab[i] = rng.choice(PAD_NAMES + (vocab[rng.randrange(len(vocab))],))
        meta["tokenizer.vocabulary"] = vocab
    elif roll < 0.8:
        n = len(vocab) or 8
        scores = list(meta.get("tokenizer.scores") or [0.0] * n)
        scores[rng.randrange(len(scores))] = rng.choice((-1e308, 1e308, -3.5e38, 1e39, -0.0))
        meta["tokenizer.scores"] = scores
    else:
        types = list(meta.get("tokenizer.token_type") or [1] * (len(vocab) or 8))
        types[rng.randrange(len(types))] = rng.choice((0, 7, 255, -1, 2 ** 31))
        meta["tokenizer.token_type"] = types
    write_apr(dst, meta, apr_tensors(src))


BARE_SHAPES = ((2 ** 31 - 1, 2 ** 31 - 1, 0), (0,), (0, 2 ** 31 - 1), (1, 0, 5), (2 ** 31 - 1, 0),
               (3, 2 ** 31 - 1, 0, 1), (2 ** 30, 2 ** 30, 2 ** 30, 0))


def apr_bare(src: Path, dst: Path, rng: random.Random) -> None:
    """An APR of bare tensors (no architecture), as the format's own example is, with empty
    tensors of extreme shapes beside a plain one: every product stays zero, every dimension
    within the bounds, so only the readers' arithmetic can go wrong."""
    import numpy as np

    from apr.container import TensorSource, write_apr
    from apr.dtypes import DTYPES
    sources = [TensorSource("plain", DTYPES["F32"], (2, 3),
                            lambda: np.arange(6, dtype=np.float32))]
    for k in range(rng.choice((1, 2))):
        shape = rng.choice(BARE_SHAPES)
        sources.append(TensorSource(f"empty.{k}", DTYPES[rng.choice(("F32", "F16", "BF16"))], shape,
                                    lambda: np.zeros(0, np.uint8)))
    write_apr(dst, {"name": "bare"}, sources)


def apr_metadata(src: Path, dst: Path, rng: random.Random, rope: bool = False) -> None:
    """A metadata value replaced (with ``rope``: the rope_scaling object mutated, or added);
    the file rewritten by our writer (valid CRCs)."""
    from apr.container import AprFile, write_apr
    with AprFile.open(src) as f:
        meta = dict(f.metadata)
    if rope:
        meta["rope_scaling"] = mutate_rope(meta.get("rope_scaling"), rng)
    else:
        meta = mutate_json_value(meta, rng)
    sources = apr_tensors(src)
    if not isinstance(meta, dict):
        meta = {"value": meta}
    try:
        write_apr(dst, meta, sources)
    except Exception:        # our writer refuses it (NaN, a lone surrogate)
        write_apr_as_stranger(dst, meta, sources)


APR_FIELDS = ((6, "<H"), (8, "<I"), (12, "<Q"), (20, "<I"), (24, "<Q"), (32, "<Q"))


def patch_apr_field(src: Path, dst: Path, rng: random.Random) -> None:
    """A header field or an index entry's field overwritten, with both CRCs made valid again."""
    data = bytearray(src.read_bytes())
    meta_end, index_off, data_off = _apr_layout(data)
    if rng.random() < 0.5:
        off, fmt = rng.choice(APR_FIELDS)
    else:          # somewhere in the tensor index: dims, offsets, sizes, name lengths
        off = rng.randrange(index_off, max(index_off + 1, min(data_off, len(data)) - 8))
        fmt = rng.choice(("<Q", "<H", "<B", "<I"))
    width = struct.calcsize(fmt)
    value = rng.choice((0, 1, 2 ** (8 * width) - 1, 2 ** (8 * width - 1), rng.randrange(2 ** (8 * width))))
    if off + width <= len(data):
        struct.pack_into(fmt, data, off, value)
    _fix_header_crc(data)
    _fix_footer_crc(data)
    dst.write_bytes(bytes(data))


def apr_mutators(seed: Path) -> list[Callable[[Path, Path, random.Random], None]]:
    data = seed.read_bytes()
    meta_end, index_off, data_off = _apr_layout(data)
    bounds = [4, 40, 64, meta_end, index_off, data_off, len(data) - 4]
    return [apr_metadata, apr_metadata, apr_rope, patch_apr_field, patch_apr_field,
            named("truncate", lambda s, d, r: truncate(s, d, r, bounds)), bit_flip,
            apr_json_text, apr_tokenizer, apr_bare, filesystem]


def apr_rope(src: Path, dst: Path, rng: random.Random) -> None:
    apr_metadata(src, dst, rng, rope=True)


# --------------------------------------------------------------------------- GGUF

def _hostile_kv(w, name: str, rng: random.Random) -> None:
    """A hostile value of some GGUF type under ``name``."""
    import gguf
    VT = gguf.GGUFValueType
    value = hostile(rng)
    if isinstance(value, bool):
        w.add_key_value(name, value, VT.BOOL)
    elif isinstance(value, int):
        w.add_key_value(name, value % 2 ** 64 if value >= 0 else value % 2 ** 63 - 2 ** 63,
                        VT.UINT64 if value >= 0 else VT.INT64)
    elif isinstance(value, float):
        w.add_key_value(name, value, VT.FLOAT64)
    elif isinstance(value, str):
        w.add_key_value(name, value.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), VT.STRING)
    elif isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        w.add_key_value(name, value, VT.ARRAY, sub_type=VT.INT32)
    else:
        w.add_key_value(name, "not-a-" + type(value).__name__, VT.STRING)


def _rewrite_gguf(src: Path, dst: Path, rng: random.Random, victim: str | None = None,
                  tensors: Callable[[list], list] | None = None) -> None:
    """The GGUF rewritten by the gguf library's writer: key ``victim`` replaced by a hostile
    value or dropped; the tensor list (name, array, raw dtype) passed through ``tensors``."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    w = gguf.GGUFWriter(dst, arch if victim != "general.architecture" else str(hostile(rng))[:20] or "x")
    VT = gguf.GGUFValueType
    for name in keys:
        f = r.fields[name]
        if name == "general.architecture":
            continue
        if name == victim:
            if rng.random() >= 0.2:
                _hostile_kv(w, name, rng)
            continue
        vt = f.types[0]
        if vt == VT.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    entries = [(t.name, np.asarray(t.data), t.tensor_type) for t in r.tensors]
    for name, data, raw in (tensors(entries) if tensors else entries):
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_kv(src: Path, dst: Path, rng: random.Random) -> None:
    """A key/value replaced by a hostile value of some GGUF type, or dropped."""
    import gguf
    keys = [k for k in gguf.GGUFReader(src).fields if not k.startswith("GGUF.")]
    _rewrite_gguf(src, dst, rng, victim=rng.choice(keys))


ROPE_FREQS = "rope_freqs.weight"


def gguf_rope_freqs(src: Path, dst: Path, rng: random.Random) -> None:
    """llama.cpp's rope_freqs.weight (per-pair RoPE divisors) with hostile values (zero,
    negative, NaN, infinity, huge), the wrong length or rank or type, dropped, or added to a
    model without RoPE scaling."""
    import gguf
    import numpy as np

    def change(entries: list) -> list:
        old = next((e for e in entries if e[0] == ROPE_FREQS), None)
        rest = [e for e in entries if e[0] != ROPE_FREQS]
        if old is not None and rng.random() < 0.15:
            return rest
        n = len(old[1]) if old is not None else 8
        values = np.asarray(old[1] if old is not None else np.ones(n), np.float32).copy()
        roll = rng.random()
        if roll < 0.5:
            values[rng.randrange(n) if rng.random() < 0.7 else slice(None)] = rng.choice(
                (0.0, -1.0, 1e-30, 1e30, np.inf, -np.inf, np.nan, 3.4e38))
        elif roll < 0.75:
            values = np.ones(rng.choice((0, 1, n - 1, n + 1, 2 * n)), np.float32)
        elif roll < 0.9:
            values = np.ones((2, n), np.float32)
        else:
            return rest + [(ROPE_FREQS, values.astype(np.float16), gguf.GGMLQuantizationType.F16)]
        return rest + [(ROPE_FREQS, values, gguf.GGMLQuantizationType.F32)]
    _rewrite_gguf(src, dst, rng, tensors=change)


GGUF_COUNT_VALUES = (0, 1, 2, 3, 46, 62, 4096, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1)


def gguf_counts(src: Path, dst: Path, rng: random.Random) -> None:
    """One or two of the architecture's integer keys (block_count, head_count, head_count_kv,
    embedding_length, context_length, key_length, ...) set to an edge value of their own type:
    zero heads, llama.cpp's 27B Gemma layer counts (46, 62), 2^31 - 1."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    ints = [k for k, f in r.fields.items() if k.startswith(arch + ".") and len(f.types) == 1
            and f.types[0] in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
                               gguf.GGUFValueType.UINT64)]
    picks = {k: rng.choice(GGUF_COUNT_VALUES) for k in rng.sample(ints, min(len(ints), rng.choice((1, 2))))}
    gguf_set(src, dst, picks)


def gguf_set(src: Path, dst: Path, picks: dict[str, int | None]) -> None:
    """The GGUF rewritten by the gguf library's writer with the integer keys ``picks`` set
    (each keeps its own value type; None drops the key)."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if name in picks and picks[name] is None:
            continue
        if name in picks:
            w.add_key_value(name, picks[name] % 2 ** 32 if vt != gguf.GGUFValueType.UINT64 else picks[name], vt)
        elif vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_mutators(seed: Path) -> list[Callable[[Path, Path, random.Random], None]]:
    size = seed.stat().st_size
    bounds = [4, 8, 16, 24, size // 4, size // 2, size - 32]
    return [gguf_kv, gguf_kv, gguf_kv, gguf_rope_freqs,
            named("truncate", lambda s, d, r: truncate(s, d, r, bounds)),
            named("bit_flip:header", lambda s, d, r: bit_flip(s, d, r, (0, min(size, 4096)))), bit_flip,
            gguf_counts, gguf_counts, filesystem]


# --------------------------------------------------------------------------- HF directory

def _hf_json(name: str) -> Callable[[Path, Path, random.Random], None]:
    def mutate(src: Path, dst: Path, rng: random.Random) -> None:
        shutil.copytree(src, dst)
        doc = json.loads((src / name).read_text(encoding="utf-8"))
        (dst / name).write_text(_json_text(mutate_json_value(doc, rng)), encoding="utf-8")
    mutate.__name__ = f"json:{name}"
    return mutate


def hf_rope(src: Path, dst: Path, rng: random.Random) -> None:
    """config.json's rope_parameters (sometimes the legacy rope_scaling spelling beside or
    instead of it) with one entry changed, see `mutate_rope`."""
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    key = "rope_scaling" if rng.random() < 0.2 else "rope_parameters"
    cfg[key] = mutate_rope(cfg.get("rope_parameters"), rng)
    (dst / "config.json").write_text(_json_text(cfg), encoding="utf-8")


def hf_safetensors_header(src: Path, dst: Path, rng: random.Random) -> None:
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data, 0)[0]
    header = mutate_json_value(json.loads(data[8:8 + n]), rng)
    text = _json_text(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def hf_index(src: Path, dst: Path, rng: random.Random) -> None:
    """The single file described by a sharded index (model.safetensors.index.json), then one
    of the index's values made hostile."""
    shutil.copytree(src, dst)
    data = (src / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", data, 0)[0]
    names = [k for k in json.loads(data[8:8 + n]) if k != "__metadata__"]
    index = {"metadata": {"total_size": len(data) - 8 - n},
             "weight_map": {k: "model.safetensors" for k in names}}
    (dst / "model.safetensors.index.json").write_text(_json_text(mutate_json_value(index, rng)))


def hf_bytes(src: Path, dst: Path, rng: random.Random) -> None:
    shutil.copytree(src, dst)
    name = rng.choice(["config.json", "tokenizer.json", "model.safetensors"])
    target = dst / name
    if rng.random() < 0.5:
        truncate(src / name, target, rng, [8, 16])
    else:
        bit_flip(src / name, target, rng)


def _hf_json_text(name: str) -> Callable[[Path, Path, random.Random], None]:
    def mutate(src: Path, dst: Path, rng: random.Random) -> None:
        shutil.copytree(src, dst)
        doc = json.loads((src / name).read_text(encoding="utf-8"))
        (dst / name).write_text(mutate_json_text(doc, rng), encoding="utf-8")
    mutate.__name__ = f"json-text:{name}"
    return mutate


def hf_header_text(src: Path, dst: Path, rng: random.Random) -> None:
    """The safetensors header as JSON text no writer makes (`mutate_json_text`), its length
    prefix right; or its ``dequantized_from`` metadata string (JSON inside JSON) so."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8:8 + n])
    if rng.random() < 0.3:
        names = [k for k in header if k != "__metadata__"]
        inner = {rng.choice(names): "F16"}
        header["__metadata__"] = {**header.get("__metadata__", {}),
                                  "dequantized_from": mutate_json_text(inner, rng)}
        text = _json_text(header).encode()
    else:
        text = mutate_json_text(header, rng).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


BPE_OPTIONS = ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "unk_token",
               "fuse_unk", "byte_fallback", "ignore_merges")


def hf_tokenizer_model(src: Path, dst: Path, rng: random.Random) -> None:
    """tokenizer.json's BPE options (``continuing_subword_prefix``, ``end_of_word_suffix``,
    ...) given values of their own type or hostile ones: the tokenizers library itself must
    build the result, and panics on some."""
    shutil.copytree(src, dst)
    doc = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    key = rng.choice(BPE_OPTIONS)
    doc["model"][key] = rng.choice(("##", "</w>", "", "\u2581", 0.5, True)) if rng.random() < 0.7 \
        else hostile(rng)
    (dst / "tokenizer.json").write_text(_json_text(doc), encoding="utf-8")


def hf_chat_template(src: Path, dst: Path, rng: random.Random) -> None:
    """tokenizer_config.json's chat_template as a string, a list of named templates (names
    and templates of any type), or a hostile value."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    roll = rng.random()
    if roll < 0.6:
        cfg["chat_template"] = [{"name": rng.choice(("default", "tool_use", hostile(rng))),
                                 "template": rng.choice(("{{ messages }}", hostile(rng)))}
                                for _ in range(rng.choice((0, 1, 2)))]
    elif roll < 0.8:
        cfg["chat_template"] = rng.choice(("{% for m in messages %}{{ m.content }}{% endfor %}",
                                           "{{ raise_exception('no') }}", "{% if %}"))
    else:
        cfg["chat_template"] = hostile(rng)
    path.write_text(_json_text(cfg), encoding="utf-8")


# --------------------------------------------------------------------------- the file system

def filesystem(src: Path, dst: Path, rng: random.Random) -> None:
    """Not a model file at all where one belongs: a FIFO, a symbolic link loop, a link to
    nothing, a directory, an empty file; for an HF directory, one of its files so."""
    import os
    if src.is_dir():
        shutil.copytree(src, dst)
        victim = dst / rng.choice(["config.json", "tokenizer.json", "tokenizer_config.json",
                                   "model.safetensors"])
    else:
        victim = dst
    if victim.exists():
        victim.unlink()
    kind = rng.choice(("fifo", "loop", "dangling", "dir", "empty"))
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "loop":
        os.symlink(victim.name, victim)
    elif kind == "dangling":
        os.symlink(victim.name + ".nowhere", victim)
    elif kind == "dir":
        victim.mkdir()
    else:
        victim.write_bytes(b"")


def hf_mutators(seed: Path) -> list[Callable[[Path, Path, random.Random], None]]:
    return [_hf_json("config.json"), _hf_json("config.json"), hf_rope, _hf_json("tokenizer.json"),
            hf_safetensors_header, hf_index, hf_bytes,
            _hf_json_text("config.json"),
            _hf_json_text("tokenizer.json"), _hf_json_text("tokenizer_config.json"), hf_header_text,
            hf_tokenizer_model, hf_chat_template, filesystem]
