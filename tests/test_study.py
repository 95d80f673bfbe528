"""`normlab study`: end to end (--quick), resume after interruptions, data loaders, errors, --help.

The data-loader tests write tiny files in the real formats (CIFAR-10 python pickle batches, MNIST IDX,
gzipped or not) into tmp_path, so no download is ever needed.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.cli import main
from normlab.study.data import DataError, load_dataset
from normlab.study.model import StudyNet, sn_importance
from normlab.study.results import append_record, read_records, repair
from normlab.study.runner import default_methods, run_study, study_config
from normlab.study.train import RunSpec, train_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(out: Path, **overrides):
    """A grid that runs in a few seconds in-process: 2 methods x 2 batch sizes, 1 epoch on 256 digits."""
    options = dict(
        methods=["bn", "gn"], batch_sizes=[16, 32], seeds=1, epochs=1, train_size=256, out=str(out), workers=1
    )
    options.update(overrides)
    return study_config(**options)


# --- end to end -----------------------------------------------------------------------------------------


def test_quick_end_to_end(tmp_path, capsys):
    # The whole command as a user runs it, worker processes included.
    rc = main(["study", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    records, skipped = read_records(tmp_path / "results.jsonl")
    assert skipped == 0
    assert len(records) == 3 * 3  # bn, gn, sn x batch 2, 8, 32 x one seed
    assert {(r["method"], r["batch_size"]) for r in records} == {(m, b) for m in ("bn", "gn", "sn") for b in (2, 8, 32)}
    for r in records:
        assert 0.0 <= r["test_error"] <= 1.0 and 0.0 <= r["train_error"] <= 1.0
        assert r["wall_s"] > 0 and r["lr"] == pytest.approx(0.1 * r["batch_size"] / 32)
        if r["method"] == "sn":
            for part in ("mean", "var"):
                shares = r["sn_importance"][part]
                assert set(shares) == {"in", "ln", "bn"} and all(0 < p < 1 for p in shares.values())
        else:
            assert r["sn_importance"] is None
    report = (tmp_path / "report.md").read_text()
    assert "| images per batch | 32 | 8 | 2 |" in report  # laid out like SPEC §3: largest batch first
    for row in ("| BN |", "| GN |", "| SN |", "BN share of the mean"):
        assert row in report
    for png in ("error_vs_batch.png", "sn_importance.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert "| BN |" in capsys.readouterr().out  # the table is printed too


def test_rerun_skips_finished_runs(tmp_path):
    first = run_study(tiny_config(tmp_path))
    assert first.complete and len(first.records) == 4
    before = (tmp_path / "results.jsonl").read_bytes()
    again = run_study(tiny_config(tmp_path))
    assert again.skipped == 4 and len(again.records) == 4
    assert (tmp_path / "results.jsonl").read_bytes() == before  # nothing rerun, nothing rewritten


def test_kernels_are_built_before_the_first_run_starts(tmp_path, monkeypatch):
    # A fresh environment's one-time native build must not count in the runs' wall time.
    from normlab.kernels import native_backend
    from normlab.study import train

    events = []
    real_library, real_train = native_backend.library, train.train_run
    monkeypatch.setattr(native_backend, "library", lambda: events.append("library") or real_library())
    monkeypatch.setattr(train, "train_run", lambda *a: events.append("run") or real_train(*a))
    monkeypatch.setattr(native_backend, "needs_build", lambda: True)
    log = LogCapture()
    assert run_study(tiny_config(tmp_path, methods=["gn"], batch_sizes=[32]), log=log).complete
    assert events[:2] == ["library", "run"] and "building normlab's native CPU kernels" in log.text
    events.clear()
    monkeypatch.setattr(native_backend, "needs_build", lambda: False)
    run_study(tiny_config(tmp_path / "again", methods=["gn"], batch_sizes=[32]))
    assert events[0] == "run"


def test_resume_after_truncated_last_line(tmp_path):
    run_study(tiny_config(tmp_path))
    path = tmp_path / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    # Simulate a kill in the middle of the third run's write: two complete lines, then half a line.
    path.write_bytes(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    records, skipped = read_records(path)
    assert len(records) == 2 and skipped == 1  # the partial line is ignored, never half-parsed

    log = LogCapture()
    outcome = run_study(tiny_config(tmp_path), log=log)
    assert outcome.complete and outcome.skipped == 2 and len(outcome.records) == 4
    assert "partial last line" in log.text and "2 to go" in log.text
    data = path.read_bytes()
    assert data.startswith(lines[0] + lines[1])  # the finished runs are kept as they were
    assert data.endswith(b"\n")
    assert all(json.loads(line) for line in data.splitlines())  # every line is whole JSON
    assert len(data.splitlines()) == 4


def test_interrupt_and_resume_with_workers(tmp_path):
    # A real Ctrl-C: SIGINT to the whole process group (parent and its worker processes) once the first
    # runs are on disk, then the same command again.
    cmd = [
        sys.executable,
        "-m",
        "normlab.cli",
        "study",
        "--methods",
        "bn,gn,ln",
        "--batch-sizes",
        "8,16,32",
        "--epochs",
        "1",
        "--train-size",
        "512",
        "--seeds",
        "2",
        "--out",
        str(tmp_path),
        "--workers",
        "2",
    ]
    path = tmp_path / "results.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept, skipped = read_records(path)
    assert skipped == 0 and len(kept) >= 2
    if proc.returncode != 0:  # it may have finished all 18 runs before the signal landed
        assert proc.returncode == 130, err.decode()
        assert b"rerun the same command" in err
    done = subprocess.run(cmd, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    records, skipped = read_records(path)
    assert skipped == 0 and len(records) == 18
    assert {(r["method"], r["batch_size"], r["seed"]) for r in records} == {
        (m, b, s) for m in ("bn", "gn", "ln") for b in (8, 16, 32) for s in (0, 1)
    }
    assert records[: len(kept)] == kept  # what was finished before the interruption is untouched


def test_other_settings_do_not_mix(tmp_path):
    run_study(tiny_config(tmp_path))
    other = run_study(tiny_config(tmp_path, epochs=2, batch_sizes=[32]))
    assert other.skipped == 0 and len(other.records) == 2  # a different protocol is a different grid
    assert len(read_records(tmp_path / "results.jsonl")[0]) == 6


class LogCapture:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


# --- results file ---------------------------------------------------------------------------------------


def test_results_file_append_read_repair(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"a": 1})
    append_record(path, {"a": 2})
    with open(path, "ab") as f:
        f.write(b'{"a": 3, "b"')  # a write cut short
    assert read_records(path) == ([{"a": 1}, {"a": 2}], 1)
    assert repair(path) == len(b'{"a": 3, "b"')
    append_record(path, {"a": 4})
    assert read_records(path) == ([{"a": 1}, {"a": 2}, {"a": 4}], 0)
    assert repair(path) == 0
    assert read_records(tmp_path / "missing.jsonl") == ([], 0)


# --- model and training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(8, 8), (40,), (28, 28)])
def test_every_method_builds_and_runs(spatial):
    x = torch.randn(4, 1, *spatial)
    for method in default_methods():
        net = StudyNet(method, 1, spatial, 10)
        assert net(x).shape == (4, 10), method
        net.eval()
        assert net(x[:1]).shape == (1, 10), method  # eval mode serves one sample (BN: running stats)


def test_same_initial_weights_for_every_feature_method():
    nets = {m: StudyNet(m, 1, (8, 8), 10, seed=3) for m in ("bn", "gn", "ln", "in", "sn", "none")}
    convs = {
        m: [p for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1] for m, net in nets.items()
    }
    for m, weights in convs.items():
        assert len(weights) == len(convs["none"])
        for w, ref in zip(weights, convs["none"], strict=True):
            assert torch.equal(w, ref), m
    assert not torch.equal(convs["bn"][0], StudyNet("bn", 1, (8, 8), 10, seed=4).trunk[0].weight)


def test_statistics_counts_of_the_default_network():
    # The configuration the study rests on: the head normalizes (N, 64) vectors, so BN's statistic there
    # is computed from B values; the trunk ends at 2x2 maps so that IN and SN's IN source are defined.
    net = StudyNet("bn", 1, (8, 8), 10)
    shapes = []
    net.head.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    net.trunk.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    net(torch.randn(2, 1, 8, 8))
    assert shapes == [(2, 64, 2, 2), (2, 256)]
    assert StudyNet("in", 1, (8, 8), 10).head_norm == "none"  # IN has no statistics for vectors


def test_sn_importance_is_averaged_over_layers():
    imp = sn_importance(StudyNet("sn", 1, (8, 8), 10))
    assert imp["mean"] == pytest.approx({"in": 1 / 3, "ln": (3 * (1 / 3) + 2 * 0.5) / 5, "bn": 0.4})
    assert sn_importance(StudyNet("gn", 1, (8, 8), 10)) is None


def test_train_run_is_deterministic_and_scales_lr():
    data = load_dataset("digits", train_size=128, test_size=64)
    spec = RunSpec("sn", 8, seed=1, epochs=1, base_lr=0.1)
    a, b = train_run(spec, data), train_run(spec, data)
    for key in ("test_error", "train_error", "train_loss", "sn_importance", "steps"):
        assert a[key] == b[key], key
    assert a["lr"] == pytest.approx(0.1 * 8 / 32) and a["steps"] == 128 // 8


# --- data -----------------------------------------------------------------------------------------------


def test_digits_and_mnist1d():
    digits = load_dataset("digits")
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert digits.num_classes == 10 and digits.x_train.dtype == torch.float32
    assert abs(float(digits.x_train.mean())) < 1e-4 and float(digits.x_train.std()) == pytest.approx(1, abs=1e-3)
    state = np.random.get_state()  # noqa: NPY002
    mnist1d = load_dataset("mnist1d", train_size=500)
    assert mnist1d.x_train.shape == (500, 1, 40) and mnist1d.x_test.shape == (1000, 1, 40)
    assert np.array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002 - global RNG left alone


def write_cifar(folder: Path, per_batch: int = 4) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch},
                f,
                protocol=2,
            )
        images.append((data, labels))
    return images


@pytest.mark.parametrize("point_at", ["folder", "parent"])
def test_cifar10_pickle_batches(tmp_path, point_at):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py")
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.y_train.tolist() == sum((labels for _, labels in batches[:5]), [])
    assert data.y_test.tolist() == batches[5][1]
    # Channel order: the first 1024 values are red; standardized per channel, the ordering survives.
    red = batches[0][0][0, :1024].reshape(32, 32).astype(np.float32)
    got = data.x_train[0, 0].numpy()
    assert np.array_equal(np.argsort(red, axis=None, kind="stable"), np.argsort(got, axis=None, kind="stable"))


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        Path(str(path) + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist(folder: Path, gz: bool, n_train: int = 8, n_test: int = 4) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz)
    data = load_dataset("mnist", tmp_path)
    assert data.x_train.shape == (8, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_study_runs_on_local_mnist_files(tmp_path):
    write_mnist(tmp_path / "data", gz=True)
    outcome = run_study(
        study_config(
            dataset="mnist",
            data_dir=str(tmp_path / "data"),
            methods=["bn", "sn"],
            batch_sizes=[2, 4],
            seeds=1,
            epochs=1,
            out=str(tmp_path / "out"),
            workers=1,
        )
    )
    assert outcome.complete and len(outcome.records) == 4
    assert (tmp_path / "out" / "error_vs_batch.png").read_bytes()[:8] == PNG_MAGIC


# --- errors that name what is expected ----------------------------------------------------------------------


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data_batch_1.*test_batch"):
        load_dataset("cifar10", tmp_path / "empty")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path / "empty")


def test_malformed_cifar10(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 batch"):
        load_dataset("cifar10", tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"N x 3072"):
        load_dataset("cifar10", tmp_path)


def test_malformed_mnist(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is not an IDX file"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4), gz=False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])  # cut short
    with pytest.raises(DataError, match=r"promises shape \(8, 28, 28\)"):
        load_dataset("mnist", tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((8, 28, 28)), gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7), gz=False)
    with pytest.raises(DataError, match="do not match"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    write_mnist(tmp_path / "bad", gz=True)
    (tmp_path / "bad" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="could not be read"):
        load_dataset("mnist", tmp_path / "bad")


def test_cli_reports_data_errors(tmp_path, capsys):
    rc = main(["study", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "Traceback" not in err
    assert main(["study", "--methods", "bn,nosuchnorm", "--out", str(tmp_path / "o")]) == 2
    assert "nosuchnorm" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--methods",
        "--batch-sizes",
        "--epochs",
        "--seeds",
        "--lr",
        "--dataset",
        "--data-dir",
        "--train-size",
        "--test-size",
        "--out",
        "--workers",
        "--device",
        "--quick",
    ):
        assert option in text, option
    for dataset in ("digits", "mnist1d", "cifar10", "mnist"):
        assert dataset in text
