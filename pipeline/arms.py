"""The arms' model work: batched greedy generation, and LoRA fine-tuning with trl.

Prompt arms and the fine-tuned arm share `generate_calls`; they differ only in the text
they send and in the weights (base vs base + adapter).
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import interrupts
from pipeline.config import FinetuneConfig
from pipeline.models import ModelError

Progress = Callable[[list["Call"]], None]


@dataclass
class Call:
    """One model call as a caller sees it."""

    output: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the model's end-of-turn ids and the tokenizer's eos."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _completion_length(new_tokens: list[int], stop_ids: list[int]) -> int:
    """Generated tokens up to and including the first stop token (later ones are padding)."""
    for i, token in enumerate(new_tokens):
        if token in stop_ids:
            return i + 1
    return len(new_tokens)


def _decode_new_tokens(tokenizer: Any, new_tokens: torch.Tensor, stop_ids: list[int]) -> list[tuple[str, int]]:
    """Each row's answer text and its completion token count (through the first stop token)."""
    results = []
    for row in new_tokens.tolist():
        n = _completion_length(row, stop_ids)
        results.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
    return results


class LabelConstraint:
    """Greedy decoding restricted to one label of the set, then a stop token (a trie over label tokens).

    Each label is tokenized as the answer alone, the way the fine-tuned arm learns it and the
    prompt arms' chat turns present it; an output can then only be a label, so none is invalid.
    """

    _END = -1

    def __init__(self, tokenizer: Any, labels: list[str], stop_ids: list[int]):
        self.stop_ids = list(stop_ids)
        self.trie: dict[int, dict] = {}
        self.longest = 0
        for label in labels:
            ids = tokenizer(label, add_special_tokens=False)["input_ids"]
            node = self.trie
            for token in ids:
                node = node.setdefault(token, {})
            node[self._END] = {}
            self.longest = max(self.longest, len(ids))

    def allowed(self, generated: list[int]) -> list[int]:
        """Tokens that may follow `generated` (the answer so far)."""
        node = self.trie
        for token in generated:
            if token in self.stop_ids:
                return self.stop_ids  # the answer is finished; what follows is padding
            node = node.get(token)
            if node is None:
                return self.stop_ids
        tokens = [t for t in node if t != self._END]
        return tokens + self.stop_ids if self._END in node else tokens

    def for_prompt_width(self, width: int) -> Callable[[int, torch.Tensor], list[int]]:
        """The `prefix_allowed_tokens_fn` for a batch whose prompts are `width` tokens wide."""
        return lambda _row, ids: self.allowed(ids[width:].tolist())


def shared_prefix_length(prefix_ids: list[int], encoded: list[list[int]]) -> int:
    """Tokens every prompt shares with the static prefix (tokens can merge across the boundary),
    leaving at least one token per prompt to run."""
    length = len(prefix_ids)
    for ids in encoded:
        n = 0
        limit = min(length, len(ids) - 1)
        while n < limit and ids[n] == prefix_ids[n]:
            n += 1
        length = n
    return max(length, 0)


class PrefixCache:
    """The KV cache of a shared prompt prefix, computed once and rolled back after each call."""

    def __init__(self, model: Any, prefix_ids: list[int]):
        from transformers import DynamicCache

        self.length = len(prefix_ids)
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([prefix_ids], device=model.device), cache=self.cache,
                  use_cache=True)
        self._batch = 1

    def for_batch(self, size: int) -> Any:
        if size != self._batch:
            # Rebuild the batch dimension from the first row: every row holds the same prefix.
            for layer in self.cache.layers:
                layer.keys = layer.keys[:1].repeat(size, 1, 1, 1)
                layer.values = layer.values[:1].repeat(size, 1, 1, 1)
            self._batch = size
        return self.cache

    def rollback(self) -> None:
        extra = self.cache.get_seq_length() - self.length
        if extra > 0:
            self.cache.crop(-extra)


@torch.inference_mode()
def _generate_batch(model: Any, tokenizer: Any, batch_ids: list[list[int]], max_new_tokens: int,
                    stop_ids: list[int], constraint: LabelConstraint | None = None,
                    prefix: PrefixCache | None = None) -> list[tuple[str, int]]:
    """Greedy answers for one batch: each row's text and completion token count.

    Rows are padded on the left of their own part, so every prompt's last token sits at the
    same position. With a prefix cache, only the per-call suffixes run and the padding goes
    between prefix and suffix, masked out; position ids follow the attention mask, so each
    row sees the positions it would unpadded.
    """
    shared = prefix.length if prefix else 0
    suffixes = [ids[shared:] for ids in batch_ids]
    width = max(len(s) for s in suffixes)
    pad = tokenizer.pad_token_id
    head = batch_ids[0][:shared]
    input_ids = torch.tensor([head + [pad] * (width - len(s)) + s for s in suffixes])
    attention = torch.tensor([[1] * shared + [0] * (width - len(s)) + [1] * len(s) for s in suffixes])
    extra: dict[str, Any] = {}
    if prefix:
        extra["cache"] = prefix.for_batch(len(batch_ids))
    if constraint:
        extra["prefix_allowed_tokens_fn"] = constraint.for_prompt_width(input_ids.shape[1])
    try:
        out = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            eos_token_id=stop_ids, pad_token_id=pad, **extra,
        )
    finally:
        if prefix:
            prefix.rollback()
    return _decode_new_tokens(tokenizer, out[:, input_ids.shape[1] :], stop_ids)


@dataclass
class Generation:
    """The calls of one evaluation and how long they took.

    With several timed passes over the same prompts, each call's latency is its median over
    the passes, `seconds` is the median pass, and `pass_p50_ms` holds each pass's p50 latency
    (their spread says how noisy the timing is on this machine).
    """

    calls: list[Call]
    seconds: float
    pass_p50_ms: list[float]


def generate_calls(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, max_new_tokens: int,
                   warmup: int = 0, progress: Progress | None = None, prefix: str = "",
                   min_prefix_tokens: int = 16, constraint: LabelConstraint | None = None,
                   repeats: int = 1) -> Generation:
    """Greedy-generate an answer per prompt, timing each call.

    With a `prefix` shared by all prompts (system text, label list, few-shot examples), its KV
    cache is computed once and each call runs only its own suffix. With a `constraint`, every
    answer is one of its labels. `warmup` calls on the first prompts run untimed first, so
    one-off costs stay out of the latency figures; then `repeats` timed passes run over all
    prompts (answers come from the first; `progress` sees its batches). Each call's latency is
    the wall time of the batch it was sent in: what its caller waits.
    """
    if constraint is not None:
        max_new_tokens = constraint.longest + 1  # the longest label and its stop token: never more
    with _foldable_output_projection(model):
        return _generate_calls(model, tokenizer, prompts, batch_size, max_new_tokens, warmup, progress, prefix,
                               min_prefix_tokens, constraint, max(repeats, 1))


@contextmanager
def _foldable_output_projection(model: Any):
    """Let torch fold the last-token projection into a single matmul.

    torch.matmul folds a [batch, 1, hidden] slice into one [batch, hidden] matmul only when the
    weight requires grad; for a frozen weight (peft freezes everything) it takes a batched path
    that copies the vocabulary matrix once per row, which halves decoding speed on CPU. Under
    inference_mode the flag records nothing, so it is set for the duration of generation only.
    """
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    frozen = weight is not None and not weight.requires_grad
    if frozen:
        weight.requires_grad_(True)
    try:
        yield
    finally:
        if frozen:
            weight.requires_grad_(False)


def _generate_calls(model, tokenizer, prompts, batch_size, max_new_tokens, warmup, progress, prefix,
                    min_prefix_tokens, constraint, repeats) -> Generation:
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop_ids = stop_token_ids(model, tokenizer)
    cache = None
    if prefix:
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        shared = shared_prefix_length(prefix_ids, encoded)
        if shared >= min_prefix_tokens:
            cache = PrefixCache(model, prefix_ids[:shared])

    def run(batch: list[list[int]]) -> list[tuple[str, int]]:
        return _generate_batch(model, tokenizer, batch, max_new_tokens, stop_ids, constraint, cache)

    for ids in encoded[:warmup]:
        run([ids])
    calls: list[Call] = []
    latencies: list[list[float]] = [[] for _ in encoded]
    pass_seconds, pass_p50_ms = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            t0 = time.perf_counter()
            results = run(batch)
            latency_ms = (time.perf_counter() - t0) * 1000
            for i in range(start, start + len(batch)):
                latencies[i].append(latency_ms)
            if repeat == 0:
                done = [Call(text, len(ids), n_new, latency_ms) for ids, (text, n_new) in zip(batch, results)]
                calls.extend(done)
                if progress:
                    progress(done)
            else:
                interrupts.check()  # timing-only passes stop on Ctrl-C too
        pass_seconds.append(time.perf_counter() - started)
        pass_p50_ms.append(statistics.median(lat[repeat] for lat in latencies))
    for call, lat in zip(calls, latencies):
        call.latency_ms = statistics.median(lat)
    return Generation(calls, statistics.median(pass_seconds), pass_p50_ms)


@dataclass
class FinetuneResult:
    model: Any
    train_time_s: float
    train_tokens: int
    train_loss: float
    adapter_dir: Path
    resumed_from: str | None = None


class _TrainClock:
    """Training wall time that survives a resume: saved beside each checkpoint, added on restart."""

    FILE = "train_time.json"

    def __init__(self):
        self.started = time.perf_counter()
        self.before = 0.0

    def resume_from(self, checkpoint: str | None) -> None:
        path = Path(checkpoint) / self.FILE if checkpoint else None
        self.before = json.loads(path.read_text())["seconds"] if path and path.is_file() else 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class CheckpointHooks(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                interrupts.check()  # a Ctrl-C swallowed inside the step still stops training here

            def on_save(self, args, state, control, **kwargs):
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    (checkpoint / clock.FILE).write_text(json.dumps({"seconds": clock.seconds()}))

        return CheckpointHooks()


def finetune(model: Any, tokenizer: Any, prompts: list[str], completions: list[str], cfg: FinetuneConfig,
             dtype: torch.dtype, out_dir: Path, report_to: list[str],
             on_resume: Callable[[str], None] | None = None) -> FinetuneResult:
    """Train a LoRA adapter with trl's SFTTrainer, loss on the completion only; save it as safetensors.

    Checkpoints go to `out_dir/trainer` every `cfg.checkpoint_steps` steps; when one is there
    (a run was killed), training resumes from the latest with its optimizer, scheduler, RNG
    state and data order, and the reported training time includes the time before the kill.
    """
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    train = Dataset.from_dict({"prompt": prompts, "completion": completions})
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
    )
    use_cuda = torch.cuda.is_available()
    trainer_dir = out_dir / "trainer"
    args = SFTConfig(
        output_dir=str(trainer_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        completion_only_loss=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # On CPU the base weights are already bf16 (see load_model); autocast would only add casts.
        bf16=use_cuda and dtype == torch.bfloat16,
        fp16=use_cuda and dtype == torch.float16,
        logging_steps=5,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=2,
        save_only_model=False,
        report_to=report_to,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # Rows of similar length share a batch, so little compute goes to padding.
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        warmup_steps=0.05,
        # trl turns this on by default to save memory; a 135M model does not need it and it costs a forward pass.
        gradient_checkpointing=False,
        lr_scheduler_type="linear",
    )
    serving_attention = model.config._attn_implementation
    if not use_cuda:
        # Training rows are short (tens of tokens): on CPU eager attention beats SDPA's kernels there.
        model.set_attn_implementation("eager")
    # The adapter's random init comes from the seed too, not from whatever ran before.
    set_seed(cfg.seed)
    # fp32 adapters on a bf16 base cost a cast per matmul (~1.25x slower on CPU), but in bf16 the optimizer's
    # small updates round away: 3 points of accuracy on the default task (bench/train.py).
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=dtype == torch.float32 or cfg.adapter_fp32)
    clock = _TrainClock()
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[clock.callback()])
    checkpoint = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    clock.resume_from(checkpoint)
    if checkpoint and on_resume:
        on_resume(checkpoint)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    train_time_s = clock.seconds()
    adapter_dir = out_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
    model.set_attn_implementation(serving_attention)
    return FinetuneResult(peft_model.eval(), train_time_s, int(trainer.state.num_input_tokens_seen),
                          float(output.training_loss), adapter_dir, resumed_from=checkpoint)


def load_adapter(model: Any, adapter_dir: Path) -> Any:
    """A stored adapter on the base model, for a re-run that reuses a finished training stage."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{adapter_dir}: adapter does not fit this base model ({first})") from None
