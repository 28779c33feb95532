"""The GPU peak each script divides by for its MFU line: the right dense bf16 figure per GPU model (a PCIe H100
is not an SXM one), none for a GPU it does not know or the CPU (the line then says n/a, not a wrong number)."""

import pytest
import torch

import oocl
import train_gpt
import train_icot

CUDA = torch.device("cuda", 0)


def peak_of_each_script(monkeypatch, name, device):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    monkeypatch.setattr(train_icot, "DEVICE", device)  # train_icot.py's process-wide device
    return {train_gpt.peak_flops(device), train_icot.peak_flops(), oocl.peak_flops(device)}


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", 835.5e12),
    ("NVIDIA H200", 989.5e12),
    ("NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_each_script_divides_by_the_peak_of_its_gpu(monkeypatch, name, peak):
    assert peak_of_each_script(monkeypatch, name, CUDA) == {peak}


def test_no_peak_on_the_cpu(monkeypatch):
    assert peak_of_each_script(monkeypatch, "NVIDIA H100 80GB HBM3", torch.device("cpu")) == {None}
