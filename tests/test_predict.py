"""Test-time flip: the mean of the logits of each image and its mirror image, for accuracy only."""

from __future__ import annotations

import torch

from pipeline.training.module import predict


def test_flip_averages_the_logits_of_an_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))  # not mirror-symmetric
    images = torch.rand(2, 3, 4, 4)
    plain, flipped = predict(model, images), predict(model, images, flip=True)
    assert torch.allclose(plain, model(images))
    assert torch.allclose(flipped, (model(images) + model(images.flip(3))) / 2)
    assert not torch.allclose(plain, flipped)
