"""Atomic writes leave no partial output, and a write killed mid-way leaves a temporary that
the next write to the same target removes (only those of processes that are gone)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apr.atomic import atomic_dir, atomic_file, remove_stale

KILLED_WRITER = """
import os, sys
sys.path.insert(0, {root!r})
from apr.atomic import atomic_file
with atomic_file({target!r}) as tmp:
    tmp.write_bytes(b"x" * 4096)
    os._exit(9)          # killed mid-write: no cleanup runs
"""


def _stale_temporaries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_next_write_removes_temporaries_of_a_killed_write(tmp_path):
    target = tmp_path / "model.apr"
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(root=root, target=str(target))])
    assert proc.returncode == 9
    left = _stale_temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".model.apr.apr-ref-") and not target.exists()
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"ok")
    assert target.read_bytes() == b"ok" and _stale_temporaries(tmp_path) == []


def test_live_and_foreign_temporaries_are_kept(tmp_path):
    target = tmp_path / "m.gguf"
    mine = tmp_path / f".m.gguf.apr-ref-{os.getpid()}-abc.tmp"
    other_target = tmp_path / ".n.gguf.apr-ref-999999999-abc.tmp"
    foreign = tmp_path / ".m.gguf.someone-else.tmp"
    for p in (mine, other_target, foreign):
        p.write_bytes(b"")
    assert remove_stale(target) == []
    assert mine.exists() and other_target.exists() and foreign.exists()


def test_remove_stale_in_a_checkpoint_folder(tmp_path):
    from apr.atomic import remove_stale_in
    dead = tmp_path / ".step-000100.apr.apr-ref-999999999-x1.tmp"
    live = tmp_path / f".step-000200.apr.apr-ref-{os.getpid()}-x2.tmp"
    keep = tmp_path / "step-000100.apr"
    for p in (dead, live, keep):
        p.write_bytes(b"")
    assert remove_stale_in(tmp_path) == [dead]
    assert live.exists() and keep.exists()


def test_unwritable_directory_names_the_target(tmp_path):
    import pytest
    from apr.errors import AprError
    if os.geteuid() == 0:          # root writes anyway: make the write itself fail instead
        target = tmp_path / "out.bin"
        with pytest.raises(AprError, match=r"out\.bin: cannot write"):
            with atomic_file(target) as tmp:
                raise OSError(28, "No space left on device", str(tmp))
    else:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        with pytest.raises(AprError, match=r"out\.bin: cannot write"):
            with atomic_file(d / "out.bin"):
                pass
    assert _stale_temporaries(tmp_path) == []


def test_a_failing_commit_check_leaves_no_output(tmp_path):
    """checked_before_commit: the check runs after the content is written and before the
    rename; when it raises, neither the file nor the directory appears, and no temporary stays."""
    from apr.atomic import checked_before_commit
    from apr.errors import FormatError
    calls = []

    def bad():
        calls.append("bad")
        raise FormatError("input changed")
    with pytest.raises(FormatError, match="input changed"), checked_before_commit(bad):
        with atomic_file(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x" * 100)
    with pytest.raises(FormatError), checked_before_commit(bad):
        with atomic_dir(tmp_path / "outdir") as tmp:
            (tmp / "a").write_bytes(b"y")
    assert calls == ["bad", "bad"] and sorted(os.listdir(tmp_path)) == []
    with checked_before_commit(lambda: calls.append("ok")):
        with atomic_file(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"z")
    assert calls[-1] == "ok" and (tmp_path / "out.bin").read_bytes() == b"z"
    with atomic_file(tmp_path / "later.bin") as tmp:     # outside the block: no check
        tmp.write_bytes(b"w")
    assert calls.count("ok") == 1
