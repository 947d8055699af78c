"""The device replay's config schema (types, defaults, docs, checks naming the field) and the one device
parser it uses (``kvtriton.devices``)."""

import dataclasses
import typing

import pytest
import torch

from kvtriton.devices import parse_device, resolve_device
from kvtriton.replay.device_config import DeviceReplayConfig, DeviceReplayResult


def test_every_field_has_a_type_a_default_and_a_doc():
    hints = typing.get_type_hints(DeviceReplayConfig)
    for f in dataclasses.fields(DeviceReplayConfig):
        assert f.name in hints
        assert f.default is not dataclasses.MISSING, f.name
        assert isinstance(f.metadata["doc"], str) and f.metadata["doc"] and "\n" not in f.metadata["doc"]
    assert list(DeviceReplayConfig.docs()) == [f.name for f in dataclasses.fields(DeviceReplayConfig)]
    assert DeviceReplayConfig(**DeviceReplayConfig.defaults()) == DeviceReplayConfig()
    DeviceReplayConfig().validate()
    for f in dataclasses.fields(DeviceReplayResult):
        assert f.default_factory is not dataclasses.MISSING
    assert DeviceReplayResult().summary == {}


@pytest.mark.parametrize("name, bad, allowed", [
    ("max_requests", 0, "None or a positive int"),
    ("max_requests", 2.0, "None or a positive int"),
    ("num_layers", True, "None or a positive int"),
    ("chunk_bytes", -1, "None or a positive int"),
    ("max_batch", None, "a positive int"),
    ("record_every", 0, "a positive int"),
    ("compaction_check_every", "16", "a positive int"),
    ("time_compression", 0, "a positive finite number"),
    ("time_compression", float("inf"), "a positive finite number"),
    ("prefill_s_per_token", -1e-4, "a finite number >= 0"),
    ("step_time_s", float("nan"), "None or a finite number >= 0"),
    ("compaction_threshold", 1.0, r"None or a number in \[0, 1\)"),
    ("warmup", "yes", "None, True or False"),
    ("ignore_arrivals", 1, "True or False"),
    ("preallocate", None, "True or False"),
    ("check_invariants", "no", "True or False"),
    ("seed", 1.5, "an int"),
    ("dtype", "int8", r"None, a dtype name \(float32/fp32, float16/fp16/half, bfloat16/bf16\) or a torch dtype"),
])
def test_validate_names_the_field_and_its_allowed_values(name, bad, allowed):
    with pytest.raises(ValueError, match=rf"^config\.{name} must be {allowed}, got "):
        DeviceReplayConfig(**{name: bad}).validate()


def test_validate_accepts_the_edges():
    DeviceReplayConfig(max_requests=1, compaction_threshold=0.0, prefill_s_per_token=0, step_time_s=0.0,
                       time_compression=1e-3, warmup=False, dtype="bf16", seed=-3, device="cpu").validate()
    DeviceReplayConfig(compaction_threshold=None, step_time_s=None, dtype=torch.float16).validate()


def test_validate_reports_the_first_bad_field_in_field_order():
    with pytest.raises(ValueError, match="config.max_requests"):
        DeviceReplayConfig(max_requests=0, max_batch=0).validate()


def test_device_field_is_checked_by_the_shared_parser():
    with pytest.raises(ValueError, match=r"^config\.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        DeviceReplayConfig(device="tpu").validate()


# ------------------------------------------------------------------------------------ kvtriton.devices

def test_parse_device_cpu_forms_and_bad_input():
    assert parse_device("cpu") == torch.device("cpu") == parse_device(torch.device("cpu"))
    for bad in ("tpu", "cuda:x", "", None, 3.5, "meta"):
        with pytest.raises(ValueError, match="must be 'cpu', 'cuda' or 'cuda:N'"):
            parse_device(bad)
    with pytest.raises(ValueError, match=r"^pool\.device must be"):
        parse_device("gpu", name="pool.device")
    with pytest.raises(ValueError, match="'auto'"):
        resolve_device("tpu")
    with pytest.raises(ValueError):
        parse_device("auto")  # "auto" is resolve_device's


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_no_cuda_answers():
    assert resolve_device() == resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto", job_num=3) == torch.device("cpu")
    for spec in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match="no CUDA device is available; valid values: cpu"):
            parse_device(spec)
    with pytest.raises(ValueError, match="no CUDA device is available; valid values: auto, cpu"):
        resolve_device("cuda:0")


def test_several_gpus_spread_auto_jobs_and_check_indices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # the current device is then 0
    assert [resolve_device("auto", n).index for n in range(6)] == [0, 1, 2, 3, 0, 1]
    assert resolve_device("auto") == resolve_device("cuda") == parse_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:3", 1) == torch.device("cuda", 3) and resolve_device("cpu", 2).type == "cpu"
    with pytest.raises(ValueError, match=r"'cuda:4' but 4 CUDA device\(s\) are visible .*valid values: auto, cpu, "
                                         r"cuda:0, cuda:1, cuda:2, cuda:3$"):
        resolve_device("cuda:4")
    with pytest.raises(ValueError, match=r"index must be in \[0, 4\)\); valid values: cpu, cuda:0"):
        parse_device(torch.device("cuda", 7))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert resolve_device("auto") == parse_device("cuda") == torch.device("cuda", 2)  # inside a device block
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
