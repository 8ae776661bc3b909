"""psmamba.runtime: keeping freed memory for reuse (checked in fresh processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = (
    "from psmamba.runtime import keep_freed_memory, freed_memory_kept\n"
    "print(freed_memory_kept(), keep_freed_memory(), keep_freed_memory(), freed_memory_kept())\n"
)


def _run(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_once_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run({"PSMAMBA_KEEP_MEMORY": "1"}) == "False True True True"


def test_keep_freed_memory_can_be_turned_off():
    assert _run({"PSMAMBA_KEEP_MEMORY": "0"}) == "False False False False"


def test_cli_keeps_freed_memory_before_a_command(monkeypatch, tmp_path, capsys):
    from psmamba import cli, runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main([]) == 0  # no sub-command: help only, nothing run
    assert calls == []
    missing = tmp_path / "missing.nii.gz"
    assert cli.main(["register", "--fixed", str(missing), "--moving", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert calls == [1]
    assert "psmamba: error:" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(missing)]) == 2  # training keeps glibc's defaults
    assert calls == [1]
