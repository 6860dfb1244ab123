"""Two real processes (DDP, gloo, CPU): each rank sums half of the training images, and the all-reduced
statistics (mean, std, ZCA whitening) equal those of one process over the whole split."""

from pathlib import Path

import torch

from tests.distributed._launch import run_script
from traincraft.data.digits import DigitsDataModule

SCRIPT = Path(__file__).with_name("_data_stats_script.py")


def test_all_reduced_statistics_equal_the_single_process_ones(tmp_path):
    run_script(SCRIPT.name, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = DigitsDataModule(image_size=8, whitening="zca")
    single.setup("fit")
    assert [r["local_counts"] for r in ranks] == [[629.0], [628.0]]  # 1257 images split between the ranks
    for rank in ranks:
        assert rank["count"].item() == 1257
        torch.testing.assert_close(rank["mean"], single.mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(rank["std"], single.std, rtol=1e-6, atol=0)
        torch.testing.assert_close(rank["whitening_mean"], single.statistics["whitening_mean"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rank["whitening_matrix"], single.statistics["whitening_matrix"], rtol=1e-4, atol=1e-4)
