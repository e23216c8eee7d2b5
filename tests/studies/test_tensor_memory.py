"""`TensorPeak` counts what tensors hold at once (no timing: memory only)."""

import torch

from dca.studies.tensor_memory import TensorPeak

MB = 2**20


def test_the_peak_of_live_storages_views_once_existing_never():
    weight = torch.nn.Parameter(torch.ones(MB // 4))  # 1 MB, created before the block
    with TensorPeak([weight]) as peak:
        a = torch.ones(MB // 4)  # 1 MB
        b = a * 2  # 2 MB held
        view = b.view(2, -1).t()  # a view: no new storage
        transposed = weight.view(2, -1)  # a view of an existing tensor: not counted
        assert peak.current_bytes == 2 * MB
        del a, b, view
        c = torch.ones(3 * MB // 4)  # 1 + 2 freed, 3 MB held: the peak is now 3 MB
        assert peak.current_bytes == 3 * MB
        del c
    assert peak.peak_bytes == 3 * MB
    assert peak.current_bytes == 0
    assert transposed.shape == (2, MB // 8)


def test_what_autograd_saves_is_counted_until_backward_frees_it():
    x = torch.randn(MB // 4, requires_grad=True)
    with TensorPeak([x]) as peak:
        y = x.exp()  # saved for backward (its own result): 1 MB
        loss = (y * 3).sum()  # y * 3 is freed at once, the product's grad needs no save
        held = peak.current_bytes
        loss.backward()
    assert held >= MB
    assert peak.peak_bytes >= 2 * MB  # y and the temporary y * 3 at once
