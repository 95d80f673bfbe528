"""Building and loading the native CPU kernels (normlab.kernels.native_backend), each in a fresh process:
the build lands in the cache and is reused, a compiler that fails leaves a warning and the "cpu" backend,
and NORMLAB_NATIVE=0 turns the kernels off."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import warnings
    warnings.simplefilter("always")
    import torch
    import normlab
    from normlab.kernels import native_backend, select_backend, NormSpec
    from normlab._layout import to_view
    x = torch.randn(2, 4, 3, 3)
    xv, view = to_view(x, 2)
    print("library", native_backend.library() is not None)
    print("auto", select_backend("auto", xv, NormSpec(view.group_dims, view.affine_shape(2), view)).name)
    y = normlab.functional.group_norm(x, 2)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 2), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def probe(tmp_path, **env):
    full = {**os.environ, "NORMLAB_CACHE_DIR": str(tmp_path / "cache"), **env}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n"), done.stderr


def built(tmp_path):
    return sorted((tmp_path / "cache").glob("native_cpu-*.so")) if (tmp_path / "cache").exists() else []


def test_builds_once_into_the_cache_and_reuses_it(tmp_path):
    out, _ = probe(tmp_path)
    if "library False" in out:
        pytest.skip("no working C++ compiler here")
    assert "auto native" in out and "ok" in out
    (library,) = built(tmp_path)
    stamp = library.stat().st_mtime_ns
    out, _ = probe(tmp_path)  # the second process loads the same file: no rebuild
    assert "library True" in out and built(tmp_path) == [library] and library.stat().st_mtime_ns == stamp


def test_a_failing_compiler_warns_and_falls_back(tmp_path):
    out, err = probe(tmp_path, CXX="false")
    assert "library False" in out and "auto cpu" in out and "ok" in out
    assert "native CPU kernels unavailable" in err and "false failed" in err
    assert built(tmp_path) == []  # nothing half-written is left behind


def test_switched_off(tmp_path):
    out, err = probe(tmp_path, NORMLAB_NATIVE="0")
    assert "library False" in out and "auto cpu" in out and "ok" in out
    assert "unavailable" not in err and built(tmp_path) == []
