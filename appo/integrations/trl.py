"""``KernelGRPOTrainer``: TRL's ``GRPOTrainer`` (tested with trl 1.16) with per-token log-probs and
entropies from ``appo_kernels.linear_token_stats``.

The trainer runs the model's backbone, takes its last hidden states at the completion positions
and hands them, with the LM head's weight and bias, to ``linear_token_stats``: no ``[B, T, V]``
logits, only the completion rows are scored (prompt and padding rows are ``ignore_index``), and
the backward streams the vocabulary again. TRL's temperature, ``logits_to_keep``, completion
padding (log-prob and entropy 0 there, as TRL writes them) and so its entropy masking
(``top_entropy_quantile``) are kept. A soft-capped model (Gemma 2's ``final_logit_softcapping``,
any value) is scored with the cap before the temperature, as the model and TRL apply it; other
logit transforms (``logit_scale`` and the like, where not 1.0) are refused at construction
(``appo.model.lm_head_softcap``). Vision inputs and MoE auxiliary losses go to TRL's own fused
LM head. Everything else is ``trl.GRPOTrainer``.
"""

from __future__ import annotations

from typing import Any

try:
    from trl import GRPOTrainer
except ImportError as error:  # pragma: no cover - exercised in an environment without trl
    raise ImportError(
        "appo.integrations.trl needs trl 1.16: pip install 'appo-kernels[trl]'"
    ) from error

import torch

import appo_kernels
from appo.model import lm_head_softcap
from appo_kernels import validation


def _fused_head(model: torch.nn.Module) -> tuple[torch.nn.Module, float | None]:
    """The LM head (a module with a ``[V, H]`` weight) and the soft cap of ``model``; a clear
    error for a model whose logits are not ``hidden @ weight.T + bias`` (soft-capped or not)."""
    try:
        softcap = lm_head_softcap(model.config)
    except ValueError as error:
        raise ValueError(f"KernelGRPOTrainer: {error}; use trl.GRPOTrainer") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"KernelGRPOTrainer needs a causal LM with a linear output head, got "
            f"{type(model).__name__} whose get_output_embeddings() is {type(head).__name__}"
        )
    return head, softcap


def _check_batch(input_ids: object, attention_mask: object, logits_to_keep: object) -> None:
    """What the trainer reads from TRL's batch: ``[B, T]`` integer ids, a ``[B, T]`` mask and
    ``1 <= logits_to_keep < T`` (the completion, after at least one prompt token)."""
    input_ids = validation.check_int("input_ids", input_ids)
    validation.check_ndim("input_ids", input_ids, 2, "[B, T]")
    attention_mask = validation.check_mask("attention_mask", attention_mask)
    validation.check_shape("attention_mask", attention_mask, input_ids.shape, "input_ids")
    validation.check_count("logits_to_keep", logits_to_keep, 1)
    if logits_to_keep >= input_ids.shape[1]:
        raise ValueError(
            f"logits_to_keep must be < input_ids.shape[1] = {input_ids.shape[1]} (at least one "
            f"prompt token before the completion), got {logits_to_keep}"
        )


class KernelGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy, old policy, reference)
    come from ``appo_kernels.linear_token_stats`` (module docstring). Takes the same arguments."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if hasattr(unwrapped, "get_base_model"):
            unwrapped = unwrapped.get_base_model()
        _fused_head(unwrapped)  # refuses a model it cannot score, before any training

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **vision_inputs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if compute_aux_loss or any(value is not None for value in vision_inputs.values()):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **vision_inputs,
            )
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped = (
            unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        )
        head, softcap = _fused_head(unwrapped)  # the reference model's own (same family)
        _check_batch(input_ids, attention_mask, logits_to_keep)
        captured: list[torch.Tensor] = []
        hook = unwrapped.base_model.register_forward_hook(
            lambda module, args, output: captured.append(output.last_hidden_state)
        )
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        try:
            for start in range(0, input_ids.size(0), batch_size):
                ids = input_ids[start : start + batch_size]
                mask = attention_mask[start : start + batch_size]
                with self.accelerator.autocast():
                    # through the (possibly wrapped) model, so DDP/FSDP hooks run; one logit row
                    model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
                hidden = captured.pop()[:, -logits_to_keep - 1 : -1]
                labels = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100)
                stats = appo_kernels.linear_token_stats(
                    hidden.to(head.weight.dtype),
                    head.weight,
                    labels,
                    bias=head.bias,
                    temperature=self.temperature,
                    softcap=softcap,
                )
                logps.append(stats.logprob)
                entropies.append(stats.entropy)
        finally:
            hook.remove()
        entropy = torch.cat(entropies) if compute_entropy else None
        return torch.cat(logps), entropy, None
