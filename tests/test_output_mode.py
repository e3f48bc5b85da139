"""Outputs get the mode a plain write gives a new file (0666 & ~umask; directories 0777 &
~umask), as cp, transformers and llama.cpp give theirs: not the 0600 of the temporary file
they are written under, which would keep a converted model from every other user."""
from __future__ import annotations

import os
import stat

import pytest

from apr.atomic import atomic_dir, atomic_file, current_umask


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_write_mode(tmp_path, name="plain") -> int:
    """What open(..., "w") gives a new file under the current umask (the oracle)."""
    with open(tmp_path / name, "w") as f:
        f.write("x")
    return mode(tmp_path / name)


def test_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask


def test_atomic_file_gets_a_plain_write_mode(tmp_path, umask):
    with atomic_file(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    assert mode(tmp_path / "out.bin") == plain_write_mode(tmp_path) == 0o666 & ~umask


def test_atomic_dir_gets_a_plain_mkdir_mode(tmp_path, umask):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.json").write_text("{}")
    os.mkdir(tmp_path / "plain_dir")
    assert mode(tmp_path / "out") == mode(tmp_path / "plain_dir") == 0o777 & ~umask
    assert mode(tmp_path / "out" / "a.json") == plain_write_mode(tmp_path)


def test_converted_models_get_a_plain_write_mode(tmp_path, umask):
    """APR, GGUF and an HF directory written by convert, from a model saved by transformers."""
    from apr.convert import convert
    from tests.oracles import make_hf_model
    hf = make_hf_model(tmp_path / "hf", "llama", hidden=16, layers=1, heads=2, kv_heads=1, ffn=24,
                       vocab=400)
    want = plain_write_mode(tmp_path)
    convert(hf, tmp_path / "m.apr")
    convert(tmp_path / "m.apr", tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "back")
    assert mode(tmp_path / "m.apr") == want
    assert mode(tmp_path / "m.gguf") == want
    assert mode(tmp_path / "back") == 0o777 & ~umask
    for f in (tmp_path / "back").iterdir():
        assert mode(f) == want, f.name
