"""psmamba.runtime: the settings object, and keeping freed memory for reuse (fresh processes)."""

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


def test_settings_from_the_environment_and_recorded_as_a_dict():
    from psmamba.runtime import Runtime

    default = Runtime.from_env({})
    assert default == Runtime()
    assert default.fast_cpu and default.keep_freed_memory and default.threads is None
    off = Runtime.from_env({"PSMAMBA_FAST_CPU": "0", "PSMAMBA_KEEP_MEMORY": "0"})
    assert not off.fast_cpu and not off.keep_freed_memory
    record = off.as_dict()
    assert record == {
        "fast_cpu": False,
        "keep_freed_memory": False,
        "threads": None,
        "mamba_inference_chunk": 2**16,
        "mamba_train_chunk": 2**18,
    }
    assert Runtime(**record) == off  # the record rebuilds the settings


def test_use_changes_the_current_settings_inside_the_block_only():
    from psmamba import runtime

    before = runtime.current()
    with runtime.use(fast_cpu=not before.fast_cpu, mamba_inference_chunk=7) as inside:
        assert runtime.current() is inside
        assert inside.fast_cpu is not before.fast_cpu and inside.mamba_inference_chunk == 7
        assert inside.mamba_train_chunk == before.mamba_train_chunk
    assert runtime.current() is before
    with pytest.raises(RuntimeError):
        with runtime.use(mamba_train_chunk=5):
            raise RuntimeError("boom")
    assert runtime.current() is before


def test_bad_settings_fail_with_one_line_naming_the_field():
    from psmamba import runtime
    from psmamba.errors import PsmambaError
    from psmamba.runtime import Runtime

    with pytest.raises(PsmambaError, match="mamba_inference_chunk"):
        Runtime(mamba_inference_chunk=-1)
    with pytest.raises(PsmambaError, match="threads"):
        Runtime(threads=0)
    with pytest.raises(PsmambaError, match="fast_cpu"):
        Runtime(fast_cpu="no")
    with pytest.raises(PsmambaError, match="nonsense"):
        with runtime.use(nonsense=1):
            pass


def test_apply_sets_torch_threads():
    import torch

    from psmamba.runtime import Runtime

    old = torch.get_num_threads()
    try:
        Runtime(threads=1, keep_freed_memory=False).apply()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
