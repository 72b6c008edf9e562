"""bench.int8_matmul's split one-row product (the benchmark itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.int8_matmul import product, split_product


@pytest.mark.parametrize("splits", [1, 4, 8])
def test_a_one_row_product_split_over_its_inputs_is_the_product(splits):
    gen = torch.Generator().manual_seed(splits)
    x = torch.randn(1, 256, generator=gen)
    w = torch.randint(-127, 128, (24, 256), dtype=torch.int8, generator=gen)
    s = torch.rand(24, generator=gen) / 100
    wf = w.float()
    torch.testing.assert_close(split_product(x, wf, None, splits), F.linear(x, wf), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(split_product(x, w, s, splits), product(x, w, s), rtol=1e-5, atol=1e-4)
    assert split_product(x.bfloat16(), w, s.bfloat16(), splits).dtype == torch.bfloat16
