"""apr-ref command line: inspect, convert and export model files (APR v2, GGUF, HF)."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any

import click

from apr.errors import AprError

LIST_ELIDE = 64


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Bad input becomes one `error: ...` line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AprError as e:
            fail(str(e))
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)
        except (OSError, MemoryError) as e:
            where = getattr(e, "filename", None)
            fail(f"{where}: {e.strerror}" if where and getattr(e, "strerror", None) else str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
    return wrapper


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


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
        out(f"  rope: theta {c['rope_theta']:g}, order {c['rope_type']}; rms eps {c['rms_norm_eps']:g}; "
            f"tied embeddings {c['tie_word_embeddings']}; attention bias {c['attention_bias']}; "
            f"max positions {c['max_position_embeddings']}")
    else:
        out(f"  architecture: none ({r['config_note']})")
    t = r["tokenizer"]
    if t["embedded"]:
        out(f"  tokenizer: {t['vocab_size']} tokens, {t['merges']} merges, bos {t['bos_token_id']}, "
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
        click.echo(json.dumps(r, indent=2, ensure_ascii=False, default=str))
    else:
        _print_inspect(r, show_tensors)


# --------------------------------------------------------------------------- convert / export

def _run_convert(src, dst, dtype, force, allow_no_tokenizer, quiet, as_json):
    from apr.convert import convert
    report = convert(src, dst, dtype=dtype, force=force, allow_no_tokenizer=allow_no_tokenizer,
                     progress=show_progress(quiet))
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=2))
        return
    dt = ", ".join(f"{n} {d}" for d, n in sorted(report.dtypes.items()))
    click.echo(f"wrote {report.dst} ({report.dst_format}): {report.tensors} tensors ({dt}), "
               f"{report.bytes_written:,} bytes of tensor data")
    if report.dropped:
        click.echo(f"  dropped {len(report.dropped)} tensors the architecture does not use: "
                   + ", ".join(report.dropped[:5]) + (" ..." if len(report.dropped) > 5 else ""))
    for n in report.notes:
        click.echo(f"  note: {n}")


_dtype_opt = click.option("--dtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
                          help="Store matrices in this dtype (norms and biases stay F32 where "
                               "required). Default: keep the source dtype when the target can hold it.")
_force_opt = click.option("--force", is_flag=True, help="Overwrite an existing output.")
_notok_opt = click.option("--allow-no-tokenizer", is_flag=True,
                          help="Write even though the source has no tokenizer (the output will not "
                               "be self-contained).")
_quiet_opt = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")


@main.command()
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "dst", required=True, type=click.Path(),
              help="Output: NAME.apr, NAME.gguf, or a directory for an HF model.")
@_dtype_opt
@_force_opt
@_notok_opt
@_quiet_opt
@_json_opt
@handle_errors
def convert(src, dst, dtype, force, allow_no_tokenizer, quiet, as_json) -> None:
    """Convert a model between APR, GGUF and HF (format chosen by the output name)."""
    _run_convert(src, dst, dtype, force, allow_no_tokenizer, quiet, as_json)


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "dst", required=True, type=click.Path(), help="Output NAME.gguf.")
@_dtype_opt
@_force_opt
@_notok_opt
@_quiet_opt
@_json_opt
@handle_errors
def export(model, dst, dtype, force, allow_no_tokenizer, quiet, as_json) -> None:
    """Export a model to GGUF for llama.cpp."""
    if not str(dst).endswith(".gguf"):
        raise AprError(f"{dst}: export writes GGUF; name the output NAME.gguf (or use convert)")
    _run_convert(model, dst, dtype, force, allow_no_tokenizer, quiet, as_json)


if __name__ == "__main__":
    main()
