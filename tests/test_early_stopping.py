"""Early stopping keeps the adapter of the best validation loss (pipeline.training.early_stopping)."""

import torch

from pipeline.training.early_stopping import KeepBest


def test_keep_best_restores_the_trainable_weights_of_the_lowest_loss_and_leaves_frozen_ones():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)  # the frozen base
    keep = KeepBest(model)
    with torch.no_grad():
        model[1].weight.fill_(1.0)
    keep.saw(0.9, step=10)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    keep.saw(0.5, step=20)  # the best
    best = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[0].weight.fill_(7.0)
    keep.saw(0.7, step=30)
    keep.restore()
    assert torch.equal(model[1].weight, best) and keep.best_step == 20 and keep.best_loss == 0.5
    assert torch.all(model[0].weight == 7.0)  # not an adapter weight: not kept, not restored
    assert keep.evaluations == 3
