"""`data.DatasetOnDevice`: the cached stacked batch and its minibatches are exactly what the DataLoader collates."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from kronfluence_bif.data import DatasetOnDevice, make_loader, stack_batches

CPU = torch.device("cpu")


class DictDataset(Dataset):
    """Examples as dicts (a Hugging Face style dataset): collated by torch's default collate, not the fast path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i]}


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous() and torch.equal(a, b)


def test_a_tensor_dataset_is_cached_as_the_loader_collates_it_without_sharing_memory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=g).T  # non-contiguous: [37, 5]
    labels, weights = torch.arange(37), torch.randn(37, generator=g, dtype=torch.float64)
    dataset = TensorDataset(x, labels, weights)
    cached = DatasetOnDevice(dataset, 8, {}, CPU, cache=True)
    collated = stack_batches(list(make_loader(dataset, 8, {})))
    assert type(cached.stacked) is type(collated) is list
    assert all(_same(a, b) for a, b in zip(cached.stacked, collated))
    assert all(a.data_ptr() != t.data_ptr() for a, t in zip(cached.stacked, dataset.tensors))
    rows = torch.tensor([3, 0, 36, 3])
    batch = cached.gather(rows)
    expected = stack_batches([next(iter(make_loader(dataset, 4, {}, indices=rows.tolist())))])
    assert type(batch) is list and all(_same(a, b) for a, b in zip(batch, expected))


def test_other_datasets_keep_their_structure_in_minibatches():
    g = torch.Generator().manual_seed(1)
    dataset = DictDataset(torch.randn(20, 3, generator=g), torch.randint(0, 4, (20,), generator=g))
    cached = DatasetOnDevice(dataset, 6, {}, CPU, cache=True)
    batch = cached.gather(torch.tensor([19, 2]))
    assert set(batch) == {"x", "y"}
    assert torch.equal(batch["x"], dataset.x[[19, 2]]) and torch.equal(batch["y"], dataset.y[[19, 2]])
    nested = TensorDataset(torch.randn(10, 2, generator=g))
    collate = {"collate_fn": lambda items: (torch.stack([i[0] for i in items]), 7)}  # a constant leaf
    custom = DatasetOnDevice(nested, 4, collate, CPU, cache=True)
    out = custom.gather(torch.tensor([1, 5]))
    assert isinstance(out, tuple) and out[1] == 7 and torch.equal(out[0], nested.tensors[0][[1, 5]])
