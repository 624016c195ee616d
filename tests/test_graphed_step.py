"""The CUDA-graphed training step's loss is SFT's completion-only loss on fixed shapes (CPU), and on a GPU
its replayed steps give the eager step's loss and gradients (skipped without one)."""

import pytest
import torch

from pipeline.training.graphed_step import GraphedTrainingStep, completion_loss
from test_completion_head import _batch, _tiny_lora_model


def _reference(peft, batch):
    """The model's own loss (shifted cross-entropy, mean over labelled tokens, padding masked) and gradients."""
    peft.zero_grad()
    loss = peft(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}


def _ours(peft, batch, positions):
    peft.zero_grad()
    projected = []
    hook = peft.get_base_model().get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[0]))
    try:
        loss = completion_loss(peft.get_base_model(), batch["input_ids"], batch["labels"], positions)
    finally:
        hook.remove()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}, projected


@pytest.mark.parametrize("positions", [9, 20])
def test_completion_loss_is_the_models_loss_without_a_padding_mask(positions):
    peft = _tiny_lora_model()
    batch = _batch(peft)  # 9 labelled positions; row 1 is right-padded
    expected_loss, expected_grads = _reference(peft, batch)
    loss, grads, projected = _ours(peft, batch, positions)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert projected == [positions]  # a fixed number of rows, whatever the batch labels


def test_completion_loss_ignores_padding_rows_and_columns():
    """What the graphed step adds to fit a batch into its graph's shape changes nothing."""
    peft = _tiny_lora_model()
    batch = _batch(peft)
    expected, _ = _reference(peft, batch)
    ids = torch.randint(0, 300, (5, 20))  # leftovers of an earlier, longer batch
    labels = torch.full((5, 20), -100)
    ids[:3, :12], labels[:3, :12] = batch["input_ids"], batch["labels"]
    loss, _, _ = _ours(peft, {"input_ids": ids, "labels": labels}, 15)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_steps_match_eager_steps_on_new_batches():
    peft = _tiny_lora_model().cuda()
    model = peft.get_base_model()
    step = GraphedTrainingStep(model, rows=4, labelled_per_row=6, autocast_dtype=None)
    for seed, length in [(1, 12), (2, 9), (3, 16), (4, 33)]:  # 12, 9 and 16 share a bucket: replays
        torch.manual_seed(seed)
        ids = torch.randint(0, 300, (3, length), device="cuda")
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]
        peft.zero_grad(set_to_none=True)
        loss = step(peft, {"input_ids": ids, "labels": labels})
        grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
        expected, expected_grads = _reference(peft, {"input_ids": ids, "labels": labels})
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert step.captures_failed == 0 and sorted(step.graphs) == [16, 48]
