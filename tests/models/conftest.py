import pytest
import torch

_DEVICES = [pytest.param("cpu")]
if torch.cuda.is_available():
    _DEVICES.append(pytest.param("cuda", marks=pytest.mark.gpu))


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run a test on the CPU, and also on the GPU where one is present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: extra threads gain nothing and stall badly when other jobs share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
