"""examples/gpu_check.py, the part that runs without a GPU: its exactness check passes the tiny Qwen2.5-VL with images
and video in float32 and bfloat16 on the CPU, and fails what is not exact."""

import re

import pytest
import torch

import gpu_check


def test_judge_fails_what_is_not_exact():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(6, 40, generator=generator).log_softmax(-1)
    noise = torch.randn(6, 40, generator=generator)
    assert gpu_check.judge(truth.clone(), truth, torch.float32, None)[0]
    assert not gpu_check.judge((truth + 0.01 * noise).log_softmax(-1), truth, torch.float32, None)[0]
    # bfloat16: the memory may be as far from the float32 truth as the full context in bfloat16 is, not much farther
    full_bf16 = (truth + 0.05 * noise).log_softmax(-1)
    as_far = (truth - 0.05 * noise).log_softmax(-1)
    assert gpu_check.judge(as_far, full_bf16, torch.bfloat16, truth)[0]
    farther = (truth + 0.5 * noise.roll(1, dims=-1)).log_softmax(-1)
    assert not gpu_check.judge(farther, full_bf16, torch.bfloat16, truth)[0]


def test_exactness_check_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    case = gpu_check.tiny_case("qwen2.5-vl", tmp_path)
    assert any("video" in demo for demo in case["demos"]) and "video" in case["query"]
    report = gpu_check.Report()
    gpu_check.check_exactness(report, case, "cpu", ["sdpa"])
    printed = capsys.readouterr().out
    assert not report.failed, printed
    assert re.search(r"PASS .* exact tiny qwen2\.5-vl float32 sdpa", printed)
    assert re.search(r"PASS .* exact tiny qwen2\.5-vl bfloat16 sdpa", printed) and case["truth"].shape[0] > 0

    # a memory that answers otherwise than the full context fails the check, and so the run
    def off_by_one_token(*args, **kwargs):
        full = case["truth"]
        return full.roll(1, dims=-1), full

    monkeypatch.setattr(gpu_check, "full_memory_and_full_context", off_by_one_token)
    failing = gpu_check.Report()
    gpu_check.check_exactness(failing, case, "cpu", ["sdpa"])
    printed = capsys.readouterr().out
    assert failing.failed and re.search(r"FAIL .* exact tiny qwen2\.5-vl float32 sdpa", printed)
    assert re.search(r"FAIL .* exact tiny qwen2\.5-vl bfloat16 sdpa", printed)


def test_asking_for_cuda_without_it_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--device", "cuda"])
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err
