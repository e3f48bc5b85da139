"""Test oracles: small random HF models saved by transformers itself, a small byte-level BPE
tokenizer trained here, and llama.cpp run in a subprocess (a GGML assert kills its process)."""
from __future__ import annotations

import json
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def stdlib_files(n: int = 12) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py",
             "heapq.py", "colorsys.py", "copy.py", "keyword.py", "numbers.py", "queue.py",
             "random.py", "statistics.py", "csv.py", "difflib.py"]
    return [root / f for f in names[:n]]


def write_stdlib_corpus(directory: Path, n: int = 16) -> Path:
    """A text corpus directory of ``n`` standard-library modules (`stdlib_files`)."""
    directory.mkdir(parents=True, exist_ok=True)
    for p in stdlib_files(n):
        (directory / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    return directory


def scaled_copy(src: Path, dst: Path, name: str, factor: float) -> Path:
    """A copy of the HF directory ``src`` whose tensor ``name`` is multiplied by ``factor``."""
    from safetensors.numpy import load_file, save_file
    copy_dir(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file({**sd, name: sd[name] * np.float32(factor)}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


SPM_CORPUS_SOURCES = ("json", "textwrap", "difflib", "argparse")
SPM_SPECIALS = {   # Gemma's ids and names of the special tokens, Llama's defaults otherwise
    "llama": {},
    "gemma": dict(pad_id=0, pad_piece="<pad>", eos_id=1, eos_piece="<eos>", bos_id=2,
                  bos_piece="<bos>", unk_id=3, unk_piece="<unk>", control_symbols=["<mask>"])}


def train_spm(directory: Path, style: str, vocab_size: int = 700) -> Path:
    """A SentencePiece BPE model trained on Python standard library source by the sentencepiece
    library: "llama" style has a dummy prefix (Llama 2 / Mistral / Phi-3), "gemma" none and
    Gemma's special-token ids. Returns the .model path."""
    import importlib
    import inspect

    import sentencepiece
    corpus = directory / "spm-corpus.txt"
    corpus.write_text("\n".join(inspect.getsource(importlib.import_module(m))
                                for m in SPM_CORPUS_SOURCES), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / style), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=style != "gemma", split_digits=True, user_defined_symbols=["<|user|>"],
        minloglevel=2, **SPM_SPECIALS[style])
    return directory / f"{style}.model"


@lru_cache(maxsize=4)
def tokenizer_json(vocab_size: int = 400) -> str:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few stdlib files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(p) for p in stdlib_files()], trainer)
    return tok.to_str()


def write_tokenizer(directory: Path, vocab_size: int = 400) -> None:
    (directory / "tokenizer.json").write_text(tokenizer_json(vocab_size), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "model_max_length": 2048}), encoding="utf-8")


def make_hf_model(directory: Path, family: str, *, hidden: int = 64, layers: int = 2,
                  heads: int = 4, kv_heads: int = 2, ffn: int = 96, vocab: int = 448,
                  tied: bool = False, bias: bool | None = None, rope_theta: float = 10000.0,
                  eps: float = 1e-6, seed: int = 0, tokenizer: bool = True, dtype=None,
                  head_dim: int | None = None) -> Path:
    """Save a random-initialized HF model with save_pretrained (and a tokenizer whose real
    size, 400 tokens, is below vocab_size)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                  tie_word_embeddings=tied, rope_theta=rope_theta, rms_norm_eps=eps,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    if head_dim:
        common["head_dim"] = head_dim
    if family == "llama":
        cfg = transformers.LlamaConfig(attention_bias=bool(bias), **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():   # make norms and biases non-trivial so order bugs show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    if dtype is not None:
        model = model.to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer:
        write_tokenizer(directory)
    return directory


def hf_logits(directory: Path, ids: list[int], dtype=None) -> np.ndarray:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype or torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    return out.float().numpy()


def llama_cpp_logits(gguf_path: Path, ids: list[int], workdir: Path | None = None) -> np.ndarray:
    """F32 logits from llama.cpp (F32 KV cache) for every position, in a subprocess."""
    from apr.llamacpp import llama_cpp_logits as run
    return run(gguf_path, ids)


def llama_cpp_convert(llama_cpp_src: Path, hf_dir: Path, out: Path, tokenizer=None,
                      outtype: str = "f32") -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py (F32, or ``outtype``) on an HF directory,
    after writing `tokenizer` (a TokenizerData it recognizes) into it; returns the GGUF path."""
    import subprocess
    import sys
    if tokenizer is not None:
        from apr.tokenizer import to_hf_files
        for name, text in to_hf_files(tokenizer).items():
            (hf_dir / name).write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(hf_dir),
                           "--outfile", str(out), "--outtype", outtype],
                          capture_output=True, text=True, cwd=llama_cpp_src, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def randomize_params(model, seed: int = 0) -> None:
    """Every parameter random and non-negligible, in place: norm weights near 1, biases of
    size 0.3, the embedding N(0, 0.5^2), matrices of size O(1/sqrt(fan_in))."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise * (0.5 if name.endswith("embed_tokens.weight") else 1.5 / p.shape[-1] ** 0.5))


def hf_inv_freq64(config, layer_type=None):
    """transformers' inverse RoPE frequencies for ``config`` (default, linear, llama3, yarn),
    the formulas of its modeling_rope_utils written out again here in float64 (transformers
    forms them in float32). tests/test_families.py checks them against transformers' own
    functions, so a transformers release that changes them fails there."""
    import math

    import torch
    rp = dict(config.rope_parameters[layer_type] if layer_type else config.rope_parameters)
    kind = rp.get("rope_type", "default")
    theta = rp["rope_theta"]
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pos_freqs = theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    inv = 1.0 / pos_freqs
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rp["factor"]
    if kind == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        factor = rp["factor"]
        old = rp["original_max_position_embeddings"]
        fast, slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

        def dim_of(rot):
            return (d * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))
        low, high = dim_of(fast), dim_of(slow)
        if rp.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        return (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    raise ValueError(f"no float64 formula for rope_type {kind!r}")


def gguf_library_copy(src: Path, dst: Path, extra: dict | None = None, tensors=None) -> Path:
    """A copy of a GGUF through the gguf library's own reader and writer (not ours): every
    key/value, ``extra`` ones added, and every tensor's stored data, passed through
    ``tensors(name, data)`` when given (to corrupt one)."""
    import gguf
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    for key, value in (extra or {}).items():
        w.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str)
                        else gguf.GGUFValueType.FLOAT32 if isinstance(value, float)
                        else gguf.GGUFValueType.UINT32)
    for t in r.tensors:
        data = np.array(t.data)
        w.add_tensor(t.name, tensors(t.name, data) if tensors else data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def copy_dir(src: Path, dst: Path) -> Path:
    """A plain copy of a model directory's files."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def state_token_ids(directory: Path, bos: int | None, eos: int | None) -> None:
    """Write the tokenizer's bos/eos ids into an HF directory's config.json and
    generation_config.json (where present), as a real checkpoint states them."""
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        if path.exists():
            doc = json.loads(path.read_text())
            path.write_text(json.dumps({**doc, "bos_token_id": bos, "eos_token_id": eos}))
