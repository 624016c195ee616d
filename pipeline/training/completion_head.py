"""The training loss's output projection on the completion tokens only, where trl would project every position.

trl's SFTTrainer scores each batch through a fused LM head (`trl.trainer.utils.add_fused_lm_head`). On
CUDA it projects only the positions whose label counts; elsewhere it projects every position, in
chunks, and its backward accumulates in fp32. On the default task a row is ~28 tokens of which the
loss reads 3-5, so on CPU most of that work (a [tokens, 49,152] projection forward, again backward,
and the softmax statistics over it) went to prompt and padding positions whose loss is zero.
`score_completions_only` replaces that head, on CPU, with one that projects the labelled positions and
returns the fields SFT reads (log-probabilities, entropy, top-1 hits, label mask); the loss, gradients
and logged metrics are trl's (a test holds them to trl's head, exactly in fp32 and to bf16's precision
on the bf16 base that CPU training uses).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

# Config fields that rescale the logits before the softmax (softcapping, logit scales): trl's head applies
# them; this one does not, so a model that has any keeps trl's head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# A batch with more labelled positions than this (long completions) goes to trl's head, which projects in
# chunks: this one holds [positions, vocab] fp32 logits and their log-softmax at once (~0.8 GB each at
# 4,096 x 49,152). Classification labels are a few tokens a row.
MAX_LABELLED_POSITIONS = 4096


def score_completions_only(model: Any) -> bool:
    """On CPU, replace the fused LM head trl added to `model` by one that projects only labelled positions.

    Whether it did: only on CPU (on CUDA trl's own head compacts; elsewhere trl keeps shapes fixed to spare
    recompiles), and not for a model whose config rescales its logits, that returns router losses, or
    whose output layer carries LoRA weights (trl's head reads the raw weight). `model` is the one trl
    patched: the PEFT model's base model.
    """
    text_config = model.config.get_text_config()
    if (model.device.type != "cpu" or any(getattr(text_config, name, None) is not None for name in _LOGIT_TRANSFORMS)
            or getattr(text_config, "output_router_logits", False)
            or hasattr(model.get_output_embeddings(), "lora_A")):
        return False
    fused_forward = model.forward  # trl's: the original forward when called without `fused_lm_head`

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if fused_lm_head:
            # position t predicts token t + 1, unless the caller has shifted the labels already
            targets = labels[:, 1:] if shift_labels is None else shift_labels
            mask = targets != -100
            if int(mask.sum()) <= MAX_LABELLED_POSITIONS:
                return _labelled_positions_output(self, args, kwargs, targets[mask], mask, shift_labels is None,
                                                  num_items_in_batch)
        return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                             num_items_in_batch=num_items_in_batch, **kwargs)

    forward.labelled_positions_only = True  # how a test tells this head from trl's
    model.forward = types.MethodType(forward, model)
    return True


def _labelled_positions_output(model: Any, args: tuple, kwargs: dict, wanted: torch.Tensor, mask: torch.Tensor,
                               shifted_here: bool, num_items_in_batch: Any) -> Any:
    """trl's `FusedCausalLMOutput` for one batch, projecting only the positions `mask` marks ([batch,
    positions]), whose next tokens are `wanted`. `shifted_here`: the labels were shifted by one here, so the
    last position predicts nothing."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state
    hidden = hidden[:, :-1] if shifted_here else hidden
    logits = model.get_output_embeddings()(hidden[mask]).float()  # [labelled positions, vocab]
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(-1, wanted[:, None]).squeeze(-1)
    with torch.no_grad():  # metrics only, as in trl's SFT loss
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        is_top1 = logits.argmax(-1) == wanted

    def spread(values: torch.Tensor) -> torch.Tensor:
        # back to trl's [batch, positions] layout, zero where the label is ignored
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = spread(log_probs)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=spread(entropy),
                               is_top1=spread(is_top1), label_mask=mask)
