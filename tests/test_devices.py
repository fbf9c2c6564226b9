"""Under pytest-xdist with --probe-device=cuda each worker takes its own GPU (checked with a faked GPU list)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelprobe.errors import ModelLoadError
from modelprobe.subject.devices import worker_device


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_each_worker_takes_a_gpu_in_turn(two_gpus):
    assert [worker_device("cuda", f"gw{i}") for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


@pytest.mark.parametrize("device,worker", [("cuda", None), ("cuda", "master"), ("cuda:1", "gw0"), ("cpu", "gw3"),
                                           ("auto", "gw1"), ("mps", "gw1")])
def test_other_devices_and_plain_runs_are_left_as_asked(two_gpus, device, worker):
    assert worker_device(device, worker) == device


def test_no_gpu_visible_leaves_cuda_to_fail_with_its_own_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device("cuda", "gw1") == "cuda"


def test_the_session_loads_the_model_on_the_workers_gpu(two_gpus, monkeypatch, tmp_path):
    # Patched where it lives: patching the lazy face would leave, after undo, a concrete `load_subject` on the
    # package that later tests' patches of its module could not reach.
    import modelprobe.subject.subject as subject_mod
    from modelprobe.session import Options, ProbeSession

    asked: list[str] = []

    def load(model, device, *args, **kwargs):
        asked.append(device)
        raise ModelLoadError("not loaded in this test")

    monkeypatch.setattr(subject_mod, "load_subject", load)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    opts = Options(model="m", device="cuda", dtype="float32", report_dir=tmp_path, data_root=None,
                   trust_remote_code=False, allow_inconclusive=False, batch_size=1, threads=1, save=None,
                   compare=None, tolerance=None, strict=False, allow_model_change=False)
    with pytest.raises(ModelLoadError):
        ProbeSession(opts, Path(tmp_path), progress=False, worker=True).subject()
    assert asked == ["cuda:1"]
