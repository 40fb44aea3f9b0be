"""Flat parameter vectors and directions (`core.directions`): coordinates behave as the
dense matrix of unit vectors they stand for."""

import torch
from torch import nn

from polca_study.core.directions import Coordinates, chunks, column, flatten_parameters, project


def test_coordinates_are_the_unit_vectors_of_their_parameters():
    coords = Coordinates(torch.tensor([4, 0, 9]), 10, torch.float64)
    dense = torch.eye(10, dtype=torch.float64)[:, [4, 0, 9]]
    assert coords.shape == (10, 3) and coords.ndim == 2
    assert torch.equal(coords.dense(), dense)
    assert torch.equal(coords.dense(1, 3), dense[:, 1:3])
    x = torch.randn(10, dtype=torch.float64)
    assert torch.equal(project(coords, x), x[[4, 0, 9]])
    torch.testing.assert_close(project(dense, x), x[[4, 0, 9]], rtol=0, atol=0)
    for j in range(3):
        assert torch.equal(column(coords, j), dense[:, j]) and torch.equal(column(dense, j), dense[:, j])
    for sparse_chunk, dense_chunk in zip(chunks(coords, 2), chunks(dense, 2), strict=True):
        assert torch.equal(sparse_chunk, dense_chunk)  # (c, d) rows
    assert [c.shape for c in chunks(coords, 2)] == [(2, 10), (1, 10)]


def test_flatten_parameters_takes_the_trainable_ones_in_order_detached():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    theta = flatten_parameters(model)
    want = torch.cat([model[0].weight.reshape(-1), model[1].weight.reshape(-1), model[1].bias])
    assert torch.equal(theta, want) and not theta.requires_grad
