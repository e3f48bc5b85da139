"""apr-ref command line: inspect, convert and export model files (APR v2, GGUF, HF), and run
the reference transformer on them (logits, run, bench)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from apr.console import (handle_errors, json_text, parse_token_ids, show_progress,
                         show_warnings_as_lines, with_ignore_key)
from apr.errors import AprError
from ref.backend import DEVICES

LIST_ELIDE = 64


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="apr-ref")
def main() -> None:
    """Reference tools for transformer model files: APR v2, HF safetensors and GGUF.

    \b
    Try:
      apr-ref inspect model.gguf
      apr-ref convert hf-model-dir -o model.apr
      apr-ref export model.apr -o model.gguf
    """


# --------------------------------------------------------------------------- inspect

def _elide(value: Any) -> Any:
    if isinstance(value, list) and len(value) > LIST_ELIDE:
        return f"<list of {len(value)} items>"
    return value


def inspect_report(path: str) -> dict[str, Any]:
    from apr.model import open_model
    from apr.errors import ChecksumError
    with open_model(path) as view:
        checksum_valid = None
        if view.format == "apr":
            from apr.container import AprFile
            with AprFile.open(path) as f:
                checksum_valid = f.verify_footer()
            if not checksum_valid:
                raise ChecksumError(f"{path}: footer CRC mismatch: the file was modified or "
                                    "corrupted after it was written (header CRC is valid)")
        tok = view.tokenizer
        meta = {k: _elide(v) for k, v in view.metadata.items()
                if not k.startswith(("tokenizer.vocabulary", "tokenizer.merges", "tokenizer.ggml.tokens",
                                     "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                                     "tokenizer.ggml.scores",
                                     "tokenizer.token_type", "tokenizer.scores"))}
        return {
            "path": str(view.path),
            "format": view.format,
            "version": view.info.get("version"),
            "tensor_count": len(view.tensors) + len(view.training),
            "size_bytes": view.info.get("size_bytes"),
            "checksum_valid": checksum_valid,
            "config": view.config.to_dict() if view.config else None,
            "config_note": view.info.get("config_note"),
            "tokenizer": {
                "embedded": tok is not None,
                "vocab_size": tok.vocab_size if tok else None,
                "model_type": tok.model_type if tok else None,
                "merges": len(tok.merges) if tok else None,
                "bos_token_id": tok.bos_token_id if tok else None,
                "eos_token_id": tok.eos_token_id if tok else None,
                "pre_type": tok.pre_type if tok else None,
            },
            "metadata": meta,
            "tensors": [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape),
                         "layout": t.layout, "source_name": t.source_name}
                        for t in list(view.tensors.values()) + list(view.training.values())],
        }


def _print_inspect(r: dict[str, Any], show_tensors: bool) -> None:
    out = click.echo
    out(f"{r['path']}: {r['format']}" + (f" v{r['version']}" if r["version"] is not None else "")
        + f", {r['tensor_count']} tensors, {r['size_bytes']:,} bytes")
    if r["checksum_valid"] is not None:
        out(f"  checksum: {'valid' if r['checksum_valid'] else 'INVALID'} (header and footer CRC32)")
    c = r["config"]
    if c:
        out(f"  architecture: {c['family']} ({c['hf_architecture']})")
        out(f"  shape: hidden {c['hidden_size']}, layers {c['num_layers']}, heads {c['num_heads']}/"
            f"{c['num_kv_heads']} kv, head_dim {c['head_dim']}, ffn {c['intermediate_size']}, "
            f"vocab {c['vocab_size']}")
        scaling = c.get("rope_scaling")
        scaling = (", scaling " + ", ".join(f"{k} {v}" for k, v in scaling.items()
                                            if k != "freq_factors")) if scaling else ""
        out(f"  rope: theta {c['rope_theta']:g}{scaling}, order {c['rope_type']}; "
            f"rms eps {c['rms_norm_eps']:g}; q/k norm {c.get('qk_norm', False)}; "
            f"tied embeddings {c['tie_word_embeddings']}; attention bias {c['attention_bias']}; "
            f"max positions {c['max_position_embeddings']}")
        sliding = [i for i, t in enumerate(c["layer_types"]) if t == "sliding_attention"]
        out(f"  mlp: {c['hidden_act']}, biases {c['mlp_bias']}; attention: "
            + (f"sliding window {c['sliding_window']} in layers {sliding}" if sliding else "full in every layer"))
    else:
        out(f"  architecture: none ({r['config_note']})")
    t = r["tokenizer"]
    if t["embedded"]:
        kind = (f"SentencePiece-style, {t['merges'] or 'score-ordered'} merges"
                if t["model_type"] == "SPM" else f"{t['merges']} merges")
        out(f"  tokenizer: {t['vocab_size']} tokens, {kind}, bos {t['bos_token_id']}, "
            f"eos {t['eos_token_id']}, pre {t['pre_type']}")
    else:
        out("  tokenizer: none embedded")
    if show_tensors:
        width = max((len(x["name"]) for x in r["tensors"]), default=10)
        for x in r["tensors"]:
            out(f"  {x['name']:<{width}}  {x['dtype']:<6} {str(x['shape']):<16} {x['layout']}")
    else:
        dtypes: dict[str, int] = {}
        for x in r["tensors"]:
            dtypes[x["dtype"]] = dtypes.get(x["dtype"], 0) + 1
        out("  tensors: " + ", ".join(f"{n} {d}" for d, n in sorted(dtypes.items()))
            + " (--tensors to list them)")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@handle_errors
def inspect(path: str, as_json: bool, show_tensors: bool) -> None:
    """Show what a model file holds: format, architecture, tokenizer, tensors."""
    r = inspect_report(path)
    if as_json:
        click.echo(json_text(r, default=str))
    else:
        _print_inspect(r, show_tensors)


# --------------------------------------------------------------------------- convert / export

def _run_convert(src, dst, dtype, force, allow_no_tokenizer, quiet, as_json, allow_changes=False):
    from apr.convert import convert
    report = convert(src, dst, dtype=dtype, force=force, allow_no_tokenizer=allow_no_tokenizer,
                     progress=show_progress(quiet), allow_changes=allow_changes)
    for n in report.changes:
        click.echo(f"changed: {n}", err=True)
    for n in report.notes:
        click.echo(f"note: {n}", err=True)
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=2))
        return
    dt = ", ".join(f"{n} {d}" for d, n in sorted(report.dtypes.items()))
    click.echo(f"wrote {report.dst} ({report.dst_format}): {report.tensors} tensors ({dt}), "
               f"{report.bytes_written:,} bytes of tensor data")


_json_opt = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
_CONVERT_OPTIONS = (
    click.option("--dtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
                 help="Store matrices in this dtype (norms and biases stay F32 where required). "
                      "Default: keep the source dtype when the target can hold it."),
    click.option("--force", is_flag=True, help="Overwrite an existing output."),
    click.option("--allow-no-tokenizer", is_flag=True,
                 help="Write even though the source has no tokenizer (the output will not be "
                      "self-contained)."),
    click.option("--allow-changes", is_flag=True,
                 help="Write even where the output changes the model (tensors the architecture "
                      "does not use dropped, repeated token strings renamed); each change is "
                      "listed on stderr and in the output's metadata. Without it such a "
                      "conversion is refused."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    _json_opt,
)


def _convert_options(command):
    """The options that convert and export share, in this order in --help."""
    for option in reversed(_CONVERT_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "dst", required=True, type=click.Path(),
              help="Output: NAME.apr, NAME.gguf, or a directory for an HF model.")
@_convert_options
@handle_errors
def convert(src, dst, dtype, force, allow_no_tokenizer, allow_changes, quiet, as_json) -> None:
    """Convert a model between APR, GGUF and HF (format chosen by the output name).

    Every change beyond --dtype is said (stderr and the output's metadata); one that
    changes the model is refused unless --allow-changes."""
    _run_convert(src, dst, dtype, force, allow_no_tokenizer, quiet, as_json, allow_changes)


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "dst", required=True, type=click.Path(), help="Output NAME.gguf.")
@_convert_options
@handle_errors
def export(model, dst, dtype, force, allow_no_tokenizer, allow_changes, quiet, as_json) -> None:
    """Export a model to GGUF for llama.cpp."""
    if not str(dst).endswith(".gguf"):
        raise AprError(f"{dst}: export writes GGUF; name the output NAME.gguf (or use convert)")
    _run_convert(model, dst, dtype, force, allow_no_tokenizer, quiet, as_json, allow_changes)


# --------------------------------------------------------------------------- model commands

_device_opt = click.option("--device", type=click.Choice(DEVICES), default="cpu",
                           show_default=True, help="cuda without a usable GPU is an error, never a CPU run.")


def _compute_dtype(name: str):
    from ref.precision import storage_dtype
    return storage_dtype(name)


_cdtype_opt = click.option("--dtype", "compute", type=click.Choice(["f32", "f64"]), default="f32",
                           show_default=True, help="Compute dtype of the reference model.")
_bench_dtype_opt = click.option(
    "--dtype", "compute", type=click.Choice(["f32", "f64", "bf16"]), default="f32",
    show_default=True, help="Compute dtype of the reference model (bf16: float32 weights, "
                            "bfloat16 operands in the linear layers' products).")


_memory_opt = click.option(
    "--max-memory", metavar="SIZE", default=None,
    help="Memory the model's weights may take, e.g. 4G or 512M (default: half the memory "
         "available). A model larger than this runs streamed: its weights stay in the file "
         "and are converted a layer at a time (same logits, slower).")


def _load(model_path: str, device: str, compute: str, quiet: bool = True,
          max_memory: str | None = None):
    from ref.load import load_model
    from ref.precision import matmul_precision
    memory: list[str] = []          # the memory plan's line: on stderr, and in --json output

    def say(line: str) -> None:
        memory.append(line)
        if not quiet:
            click.echo(line, err=True)

    model, view = load_model(model_path, device=device, dtype=_compute_dtype(compute),
                             matmul=matmul_precision(compute), max_memory=max_memory, say=say)
    if device == "auto" and not quiet:
        click.echo(f"device: {model.backend.description}", err=True)
    return model, view, memory[0]


def _tokenizer(view, tokenizer_path: str | None):
    """The tokenizer to use: --tokenizer if given, else the model's embedded one."""
    from apr.tokenizer import build_tokenizer
    from ref.data import load_tokenizer
    if tokenizer_path:
        td = load_tokenizer(tokenizer_path)
    else:
        td = view.tokenizer
        if td is None:
            raise AprError(f"{view.path}: no embedded tokenizer; pass --tokenizer "
                           "TOKENIZER_JSON_OR_DIR, or give token ids with --tokens")
    if td.vocab_size > view.config.vocab_size:
        raise AprError(f"tokenizer has {td.vocab_size} tokens but the model's embedding has "
                       f"{view.config.vocab_size} rows")
    return td, build_tokenizer(td, add_bos=td.add_bos_token)


def _encode_prompt(tok, prompt: str, no_bos: bool) -> list[int]:
    """The prompt's ids as the model's own tokenizer gives them (llama.cpp and transformers put
    BOS in front when the tokenizer says add_bos_token); ``no_bos`` leaves it out. A prompt
    that is not UTF-8 (bytes the shell passed as they were) is an AprError."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:     # the command line's bytes, kept as surrogate escapes
        bad = prompt[e.start]
        what = f"byte 0x{ord(bad) - 0xDC00:02X}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise AprError(f"the prompt is not UTF-8 text ({what} at character {e.start})") from None
    return tok.encode(prompt, add_special_tokens=not no_bos).ids


_no_bos_opt = click.option("--no-bos", is_flag=True,
                           help="Encode the prompt without the BOS token the tokenizer puts in "
                                "front (when its add_bos_token is set, as Llama 3 and Gemma's are).")


def _token_ids(view, tokens: str | None, prompt: str | None, tokenizer_path: str | None,
               no_bos: bool = False) -> list[int]:
    if (tokens is None) == (prompt is None):
        raise AprError("give exactly one of --tokens 1,2,3 or --prompt TEXT")
    if tokens is not None:
        ids = parse_token_ids(tokens)
    else:
        ids = _encode_prompt(_tokenizer(view, tokenizer_path)[1], prompt, no_bos)
    if not ids:
        raise AprError("no tokens to run (empty --tokens or --prompt)")
    bad = [t for t in ids if not 0 <= t < view.config.vocab_size]
    if bad:
        raise AprError(f"token ids {bad[:5]} are outside the vocabulary [0, {view.config.vocab_size})")
    return ids


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--tokens", help="Comma-separated token ids, e.g. 1,2,3.")
@click.option("--prompt", help="Text, tokenized with the embedded tokenizer (or --tokenizer), "
                                "BOS included when the tokenizer adds it.")
@_no_bos_opt
@click.option("--tokenizer", "tokenizer_path", type=click.Path(), help="tokenizer.json or HF directory.")
@click.option("-o", "--output", type=click.Path(), help="Write the logits (T, vocab) to a .npy file.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output.")
@click.option("--top", default=5, show_default=True, help="Show the top N next tokens per position.")
@_device_opt
@_cdtype_opt
@_memory_opt
@_json_opt
@handle_errors
def logits(model_path, tokens, prompt, no_bos, tokenizer_path, output, force, top, device, compute,
           max_memory, as_json):
    """Logits of the reference model for a token sequence."""
    import numpy as np
    from apr.atomic import atomic_file, check_output
    if output:
        check_output(output, force)
    model, view, memory = _load(model_path, device, compute, quiet=as_json, max_memory=max_memory)
    ids = _token_ids(view, tokens, prompt, tokenizer_path, no_bos)
    out = model.backend.to_numpy(model.forward(np.array([ids])))[0]
    if output:
        with atomic_file(output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, out)
    order = np.argsort(-out, axis=-1)[:, :top]
    doc = {"model": str(view.path), "format": view.format, "memory": memory, "tokens": ids,
           "shape": list(out.shape),
           "dtype": str(out.dtype), "finite": bool(np.isfinite(out).all()),
           "positions": [{"token": t, "top": [{"id": int(j), "logit": float(out[i, j])} for j in order[i]]}
                         for i, t in enumerate(ids)],
           "output": output}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{view.path} ({view.format}): logits {out.shape[0]} x {out.shape[1]} ({out.dtype}), "
               f"{'all finite' if doc['finite'] else 'NOT FINITE'}")
    for i, pos in enumerate(doc["positions"]):
        tops = ", ".join(f"{x['id']}:{x['logit']:.4f}" for x in pos["top"])
        click.echo(f"  [{i}] token {pos['token']:>6} -> top {tops}")
    if output:
        click.echo(f"wrote {output}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", default=0, show_default=True, help="Sample among the k most likely (0: all).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Sampling seed (0 or more).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(),
              help="tokenizer.json or HF directory, for a model without an embedded tokenizer.")
@_no_bos_opt
@_device_opt
@_cdtype_opt
@_memory_opt
@_json_opt
@handle_errors
def run(model_path, prompt, max_tokens, temperature, top_k, top_p, seed, tokenizer_path, no_bos,
        device, compute, max_memory, as_json):
    """Generate a continuation of PROMPT with the reference model (KV cache)."""
    from ref.generate import generate
    model, view, memory = _load(model_path, device, compute, quiet=as_json, max_memory=max_memory)
    td, tok = _tokenizer(view, tokenizer_path)
    ids = _encode_prompt(tok, prompt, no_bos)
    if not ids:
        raise AprError("the prompt encodes to no tokens")
    context = view.config.max_position_embeddings
    if len(ids) + max_tokens > context:         # said before any token is generated
        room = f"use --max-tokens {context - len(ids)} or less" if len(ids) < context else \
            "shorten the prompt"
        raise AprError(f"the prompt ({len(ids)} tokens) and --max-tokens {max_tokens} need "
                       f"{len(ids) + max_tokens} positions; the model's context is {context} "
                       f"(max_position_embeddings): {room}")
    eos = [t for t in (td.eos_token_id,) if t is not None]
    res = generate(model, ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_ids=eos)
    text = tok.decode(res.new_ids, skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps({"model": str(view.path), "memory": memory, "prompt": prompt,
                               "completion": text,
                               **res.to_dict()}, indent=2))
        return
    click.echo(prompt + text)
    click.echo(f"[{len(res.new_ids)} tokens, stop: {res.stop_reason}, "
               f"prefill {res.prefill_tokens_per_second:.1f} tok/s, "
               f"decode {res.decode_tokens_per_second:.1f} tok/s]", err=True)


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--prompt-tokens", default=64, show_default=True, help="Prompt length (prefill).")
@click.option("--gen-tokens", default=32, show_default=True, help="Tokens decoded per iteration.")
@click.option("--iterations", default=5, show_default=True, help="Measured iterations.")
@click.option("--warmup", default=1, show_default=True, help="Iterations run first and not measured.")
@_device_opt
@_bench_dtype_opt
@_memory_opt
@_json_opt
@handle_errors
def bench(model_path, prompt_tokens, gen_tokens, iterations, warmup, device, compute, max_memory,
          as_json):
    """Prefill and decode speed of the reference model (greedy, KV cache)."""
    import numpy as np
    from ref.generate import generate
    if iterations < 1 or prompt_tokens < 1 or gen_tokens < 1 or warmup < 0:
        raise AprError("--iterations, --prompt-tokens and --gen-tokens must be >= 1, --warmup >= 0")
    model, view, memory = _load(model_path, device, compute, quiet=as_json, max_memory=max_memory)
    cfg = view.config
    if prompt_tokens + gen_tokens > cfg.max_position_embeddings:
        raise AprError(f"--prompt-tokens + --gen-tokens = {prompt_tokens + gen_tokens} exceeds "
                       f"max_position_embeddings {cfg.max_position_embeddings}")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, prompt_tokens).tolist()
    runs = []
    for i in range(warmup + iterations):
        res = generate(model, prompt, gen_tokens)      # no eos: always gen_tokens tokens
        if i >= warmup:
            runs.append(res)

    def stats(values):
        v = np.asarray(values, dtype=np.float64)
        return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}

    doc = {"model": str(view.path), "device": model.backend.description, "dtype": compute, "memory": memory,
           "params": cfg.param_count(), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
           "iterations": iterations, "warmup": warmup,
           "prefill_tokens_per_second": stats([r.prefill_tokens_per_second for r in runs]),
           "decode_tokens_per_second": stats([r.decode_tokens_per_second for r in runs]),
           "time_to_first_token_ms": stats([1000 * r.prefill_seconds for r in runs])}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{view.path}: {cfg.param_count() / 1e6:.2f}M params on {doc['device']}, {compute}")
    for key, label in (("prefill_tokens_per_second", "prefill tok/s"), ("decode_tokens_per_second", "decode tok/s"),
                       ("time_to_first_token_ms", "TTFT ms")):
        s = doc[key]
        click.echo(f"  {label:<14} {s['mean']:10.1f}  ± {s['std']:.1f}  (min {s['min']:.1f}, max {s['max']:.1f}, "
                   f"{iterations} runs after {warmup} warm-up)")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--max-ppl", type=float, default=None, help="Fail if perplexity on a text sample exceeds this.")
@click.option("--min-tps", type=float, default=None, help="Fail if decode tokens/s is below this.")
@click.option("--no-gguf", is_flag=True, help="Skip the GGUF export gate (llama.cpp).")
@click.option("--allow-untrained", is_flag=True,
              help="Pass a deliberately untrained file: a loss on the sample text not below chance "
                   "and a degenerate greedy decode are reported, not failed.")
@_memory_opt
@_json_opt
@handle_errors
def qa(model_path, max_ppl, min_tps, no_gguf, allow_untrained, max_memory, as_json):
    """Gates a model file must pass: format, metadata, tokenizer, tensors, tied embeddings,
    forward, golden output, throughput, GGUF export. Exit 1 if any gate fails."""
    from pathlib import Path
    from ref.qa import run_qa
    if not Path(model_path).exists():
        raise AprError(f"{model_path}: no such file or directory")
    from apr.model import detect_format
    detect_format(Path(model_path))      # not a model file at all (a pickle, text): bad input, exit 2

    def show(g):
        if not as_json:
            status = "SKIP" if g.skipped else ("PASS" if g.passed else "FAIL")
            click.echo(f"  {status:<4}  {g.name:<16} {g.message}  ({g.duration_ms:.0f} ms)")

    if not as_json:
        click.echo(f"qa {model_path}")
    if max_memory is not None:
        from ref.memory import parse_size
        parse_size(max_memory)           # a bad size is bad input, before any gate runs
    report = run_qa(model_path, max_ppl=max_ppl, min_tps=min_tps, gguf=not no_gguf, progress=show,
                    max_memory=max_memory, allow_untrained=allow_untrained)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        failed = [g.name for g in report.gates if not g.passed]
        click.echo("PASSED" if report.passed else f"FAILED: {', '.join(failed)}")
    sys.exit(0 if report.passed else 1)


def _register_package_commands() -> None:
    """Commands that live beside their code (diff/, ref/) join this one group."""
    from diff.cli import diff_command
    from ref.commands import prepare_data_command, pretrain_command
    from ref.demo import demo_command
    main.add_command(demo_command, "demo")
    main.add_command(diff_command, "diff")
    main.add_command(prepare_data_command, "prepare-data")
    main.add_command(pretrain_command, "pretrain")


_register_package_commands()


for _name, _cmd in main.commands.items():
    if _name != "demo":
        with_ignore_key(_cmd)

show_warnings_as_lines()


if __name__ == "__main__":
    main()
