"""The training loss's LM head on labelled positions only: the same loss, gradients and metrics as trl's
fused head, for a fraction of the projection (a small random Llama on CPU)."""

import pytest
import torch

from pipeline.training import completion_head
from pipeline.training.completion_head import score_completions_only


def _tiny_lora_model(dtype=torch.float32, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         **config)).to(dtype)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer does
    # fp32 adapters on the base's dtype, as training runs them (get_peft_model's autocast_adapter_dtype)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in peft.named_parameters():  # B starts at zero; make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return peft


def _batch(peft):
    torch.manual_seed(1)
    input_ids = torch.randint(0, 300, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # a right-padded row
    labels = torch.full_like(input_ids, -100)
    labels[0, 8:] = input_ids[0, 8:]  # completions: the last few real tokens of each row
    labels[1, 6:9] = input_ids[1, 6:9]
    labels[2, 10:] = input_ids[2, 10:]
    with torch.no_grad():  # two labels the model ranks first, so top-1 hits are there to count
        top = peft(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    labels[0, 9], labels[2, 11] = top[0, 8], top[2, 10]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _scored(peft, batch):
    peft.zero_grad()
    out = peft(**batch, fused_lm_head=True, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    return out, grads


def _projected_rows(peft, batch):
    """The scored output of `peft` on `batch`, and the rows each call of its output layer projected."""
    projected = []
    hook = peft.get_base_model().get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[0]))
    try:
        return _scored(peft, batch), projected
    finally:
        hook.remove()


def test_same_loss_gradients_and_metrics_as_trls_head_projecting_only_labelled_positions():
    peft = _tiny_lora_model()
    batch = _batch(peft)
    trl_out, trl_grads = _scored(peft, batch)

    assert score_completions_only(peft.get_base_model())
    (out, grads), projected = _projected_rows(peft, batch)

    labelled = int((batch["labels"][:, 1:] != -100).sum())  # position t predicts label t + 1
    assert labelled == 9 and projected == [labelled]  # of 33 next-token positions, only the 9 the loss reads
    torch.testing.assert_close(out.loss, trl_out.loss, rtol=1e-5, atol=1e-6)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, field), getattr(trl_out, field), rtol=1e-5, atol=1e-5)
    assert int(trl_out.is_top1.sum()) == 2 and torch.equal(out.is_top1, trl_out.is_top1)
    assert torch.equal(out.label_mask, trl_out.label_mask)
    assert grads.keys() == trl_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 linear layers, 2 layers
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # Without fused_lm_head the model's own forward runs: generation and evaluation are untouched.
    plain = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert plain.shape == (3, 12, 300)


def test_on_a_bf16_base_with_fp32_adapters_the_loss_and_gradients_agree_to_bf16_precision():
    """How training runs on CPU: trl's head adds its gradient up in fp32, this one through bf16 autograd."""
    peft = _tiny_lora_model(torch.bfloat16)
    batch = _batch(peft)
    trl_out, trl_grads = _scored(peft, batch)
    score_completions_only(peft.get_base_model())
    out, grads = _scored(peft, batch)
    torch.testing.assert_close(out.loss, trl_out.loss, rtol=1e-2, atol=1e-2)
    for name in grads:  # each adapter's gradient within 3% of trl's, as a whole
        error = (grads[name].float() - trl_grads[name].float()).norm() / trl_grads[name].float().norm()
        assert error < 0.03, f"{name}: {error:.3f}"


def test_a_batch_with_more_labelled_positions_than_the_limit_goes_to_trls_chunked_head(monkeypatch):
    peft = _tiny_lora_model()
    batch = _batch(peft)
    trl_out, _ = _scored(peft, batch)
    score_completions_only(peft.get_base_model())
    monkeypatch.setattr(completion_head, "MAX_LABELLED_POSITIONS", 8)  # the batch has 9
    (out, _), projected = _projected_rows(peft, batch)
    assert projected == []  # trl's head multiplies by the weight in chunks; it does not call the layer
    torch.testing.assert_close(out.loss, trl_out.loss)


def test_a_batch_without_labelled_positions_gives_a_differentiable_zero():
    peft = _tiny_lora_model()
    batch = _batch(peft)
    score_completions_only(peft.get_base_model())
    batch["labels"][:] = -100
    out = peft(**batch, fused_lm_head=True, use_cache=False)
    out.loss.backward()
    assert out.loss.item() == 0.0 and not out.label_mask.any()


@pytest.mark.parametrize("config", [{"final_logit_softcapping": 30.0}, {"logits_scaling": 2.0}])
def test_models_that_rescale_their_logits_keep_trls_head(config):
    peft = _tiny_lora_model()
    peft.get_base_model().config.update(config)
    fused = peft.get_base_model().forward
    assert not score_completions_only(peft.get_base_model())
    assert peft.get_base_model().forward == fused
