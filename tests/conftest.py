import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # BD3_TEST_DEVICE=cuda runs the core's tests with CUDA as torch's default device (bench/gpu_check.sh):
    # tensors the tests build land there, while the per-row random generators stay on the CPU.
    device = os.environ.get("BD3_TEST_DEVICE")
    if device and device != "cpu":
        import torch

        torch.set_default_device(device)


def pytest_report_header(config):
    return f"bd3 test device: {os.environ.get('BD3_TEST_DEVICE') or 'cpu'}"
