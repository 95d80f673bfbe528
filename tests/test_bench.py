"""Smoke tests of the benchmark harness, its API and `normlab bench --json`: tiny shapes, one repetition,
no timing assertions (timings on a shared machine are not testable), only structure and the measured
memory kept for backward."""

import json

import pytest
import torch

from normlab import bench
from normlab.cli import main

PASSES = ("fwd", "bwd", "fwd+bwd")


def test_run_reports_every_case_and_pass():
    report = bench.run(methods=["bn", "gn", "in", "ln", "sn"], shapes=[(2, 4, 3, 3)], dtypes=["float32"],
                       reps=1, warmup=0)
    rows = report["results"]
    assert {(r["method"], r["provider"]) for r in rows} == {
        ("bn", "normlab"), ("bn", "torch"), ("gn", "normlab"), ("gn", "torch"), ("in", "normlab"), ("in", "torch"),
        ("ln", "normlab"), ("ln", "torch"), ("sn", "normlab"), ("sn", "authors"),
    }
    for r in rows:
        for which in PASSES:
            entry = r[which]
            assert entry["ms"] > 0 and entry["clone_ms"] > 0 and entry["gbps"] > 0
            assert entry["x_baseline"] == pytest.approx(entry["ms"] / next(
                b[which]["ms"] for b in rows if b["method"] == r["method"] and b["provider"] == r["baseline"]))
    assert report["settings"]["reps"] == 1 and report["machine"]["torch"] == torch.__version__
    assert "speedup" in bench.table(report)
    json.loads(bench.to_json(report))


def test_saved_for_backward_is_measured():
    """normlab keeps the input plus O(N·C) values; the authors' SN composite keeps several input-sized
    tensors — the measurement (saved_tensors_hooks) sees the difference."""
    report = bench.run(methods=["bn", "sn"], shapes=[(4, 8, 16, 16)], dtypes=["float32"], reps=1, warmup=0,
                       passes=("fwd",))
    saved = {(r["method"], r["provider"]): r["saved_bytes"] / r["tensor_bytes"] for r in report["results"]}
    assert 1.0 <= saved[("bn", "normlab")] < 1.1
    assert 1.0 <= saved[("sn", "normlab")] < 1.1
    assert saved[("sn", "authors")] > 2.0


def test_shapes_that_do_not_apply_are_skipped():
    report = bench.run(methods=["bn", "ln"], shapes=[(6, 8)], dtypes=["float32"], reps=1, warmup=0,
                       passes=("fwd",))
    assert {r["method"] for r in report["results"]} == {"ln"}  # rows are LN's (and WN's) shape
    report = bench.run(methods=["sn"], shapes=[(6, 8)], dtypes=["float32"], reps=1, warmup=0, passes=("fwd",))
    assert report["results"] == []  # the authors' composite is 2d only


def test_weight_norm_case_when_available():
    case = bench.setup("wn", "torch", (2, 4, 3, 3), torch.float32)
    row, = bench.measure([case], reps=1, warmup=0)
    assert row["tensor_bytes"] == 4 * 4 * 3 * 3 * 4  # the Conv2d(4, 4, 3) weight
    assert bench.setup("wn", "normlab", (2, 4, 3, 3), torch.float32) is None or row["fwd"]["ms"] > 0


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="unknown methods"):
        bench.run(methods=["xx"], shapes=[(2, 4, 3, 3)])
    with pytest.raises(ValueError, match="unknown dtype"):
        bench.run(methods=["gn"], shapes=[(2, 4, 3, 3)], dtypes=["float33"])
    with pytest.raises(ValueError, match="joined by 'x'"):
        bench.parse_shape("32-64")


def test_cli_json(capsys):
    assert main(["bench", "--methods", "gn,ln", "--shapes", "2x32x4x4", "--dtypes", "float32,bfloat16",
                 "--reps", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(r["method"], r["dtype"]) for r in report["results"]} == {
        ("gn", "float32"), ("ln", "float32"), ("gn", "bfloat16"), ("ln", "bfloat16")}


def test_cli_table_and_errors(capsys):
    assert main(["bench", "--methods", "in", "--shapes", "2x4x3x3", "--dtypes", "float32", "--reps", "1",
                 "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "×clone" in out and "in     2x4x3x3" in out
    assert main(["bench", "--methods", "gn", "--shapes", "2x4x3x3", "--dtypes", "float32", "--reps", "1",
                 "--warmup", "0", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| method | shape |")
    assert main(["bench", "--methods", "nope", "--reps", "1"]) == 2
    assert "unknown methods" in capsys.readouterr().err


def test_backend_choice_reaches_normlab_layers(capsys):
    """--backend picks normlab's kernel (the GPU benchmark times backend="triton" this way); the baseline keeps
    torch's own layer. On the CPU, "torch" is the portable backend."""
    assert main(["bench", "--methods", "gn", "--shapes", "2x8x4x4", "--dtypes", "float32", "--reps", "1",
                 "--warmup", "0", "--backend", "torch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["backend"] == "torch" and report["machine"]["device"] == "cpu"
    assert bench.setup("gn", "normlab", (2, 8, 4, 4), torch.float32, backend="torch").layer.backend == "torch"
    assert not hasattr(bench.setup("gn", "torch", (2, 8, 4, 4), torch.float32, backend="torch").layer, "backend")


def test_channels_last_layout_reaches_every_provider(capsys):
    """--channels-last stores the 4-d input (WN: the conv's weight) channels_last for normlab and the baseline
    alike, the gradient fed to backward too; rows and shapes that have no such layout stay as they are."""
    assert main(["bench", "--methods", "gn,wn", "--shapes", "2x8x4x4,6x8", "--dtypes", "float32", "--reps", "1",
                 "--warmup", "0", "--channels-last", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["layout"] == "channels_last" and len(report["results"]) == 6
    for provider in ("normlab", "torch"):
        case = bench.setup("gn", provider, (2, 8, 4, 4), torch.float32, layout="channels_last")
        assert case.tensor.is_contiguous(memory_format=torch.channels_last) and not case.tensor.is_contiguous()
        layer = bench.setup("wn", provider, (2, 8, 4, 4), torch.float32, layout="channels_last").layer
        v = layer.parametrizations.weight.original1  # (torch's names, which normlab's weight_norm keeps)
        assert v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
        assert bench.setup("ln", provider, (6, 8), torch.float32, layout="channels_last").tensor.is_contiguous()
    with pytest.raises(ValueError, match="unknown layout"):
        bench.run(methods=["gn"], shapes=[(2, 4, 3, 3)], layout="nhwc")


def test_cli_progress_and_save(capsys, tmp_path):
    """Progress on stderr (stdout keeps only the JSON); --save holds the report, rewritten after each case."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--methods", "gn,in", "--shapes", "2x8x4x4", "--dtypes", "float32", "--reps", "1",
                 "--warmup", "0", "--json", "--save", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"] == json.loads(path.read_text())["results"]
    assert "[1/2] gn 2x8x4x4 float32 normlab" in captured.err and "[2/2] in 2x8x4x4" in captured.err
    assert not (tmp_path / "bench.json.tmp").exists()


def test_interrupted_run_keeps_completed_cases(capsys, tmp_path, monkeypatch):
    """Ctrl-C during the second case: the first case's rows are printed and saved, exit status 130."""
    from normlab.bench import runner

    real_measure, calls = runner.measure, []

    def measure(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", measure)
    path = tmp_path / "bench.json"
    assert main(["bench", "--methods", "gn,in", "--shapes", "2x8x4x4", "--dtypes", "float32", "--reps", "1",
                 "--warmup", "0", "--markdown", "--save", str(path)]) == 130
    captured = capsys.readouterr()
    assert "| gn | 2×8×4×4" in captured.out and "| in |" not in captured.out
    assert "interrupted after 1 of 2 cases" in captured.err
    saved = json.loads(path.read_text())
    assert {r["method"] for r in saved["results"]} == {"gn"} and saved["interrupted"]
