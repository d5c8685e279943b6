"""``KernelGRPOTrainer``: TRL's ``GRPOTrainer`` (tested with trl 1.16) with per-token log-probs and
entropies from ``appo_kernels.linear_token_stats``.

The trainer runs the model's backbone, takes its last hidden states at the completion positions
and hands them, with the LM head's weight and bias, to ``linear_token_stats``: no ``[B, T, V]``
logits, only the completion rows are scored (prompt and padding rows are ``ignore_index``), and
the backward streams the vocabulary again. TRL's temperature, ``logits_to_keep``, completion
padding (log-prob and entropy 0 there, as TRL writes them) and so its entropy masking
(``top_entropy_quantile``) are kept. Vision inputs and MoE auxiliary losses go to TRL's own fused
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

# Config fields with which a model transforms its logits beyond ``hidden @ W.T + b``.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _check_plain_lm_head(model: torch.nn.Module) -> None:
    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"KernelGRPOTrainer computes logits as hidden @ lm_head.weight.T + bias; the model "
                f"config sets {name}={value!r}, which it does not apply: use trl.GRPOTrainer"
            )


class KernelGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy, old policy, reference)
    come from ``appo_kernels.linear_token_stats`` (module docstring). Takes the same arguments."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _check_plain_lm_head(self.model)

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
        head = unwrapped.get_output_embeddings()
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
                )
                logps.append(stats.logprob)
                entropies.append(stats.entropy)
        finally:
            hook.remove()
        entropy = torch.cat(entropies) if compute_entropy else None
        return torch.cat(logps), entropy, None
