"""MatMamba language model, parameter-compatible with mamba-ssm's `MambaLMHeadModel` (Mamba2)."""

from __future__ import annotations

import torch
from torch import nn

from lit_matmamba.kernels import cross_entropy

from .backbone import InferenceCache, MatMambaStack, NestedModel
from .config import MatMambaConfig, Width
from .nested_linear import direct_grads_apply, nested_linear


class LMBackbone(MatMambaStack):
    """Embedding + blocks + final norm; names as mamba-ssm's `MixerModel` (`backbone.*`)."""

    def __init__(self, config: MatMambaConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)


class MatMambaLM(NestedModel):
    """A nested MatMamba language model.

    Args:
        config: a `MatMambaConfig` or the name of a preset (`MatMambaConfig.presets()`).
        head: maps features (B, L, d_model) to logits; default a linear LM head tied to the
            embedding when `config.tie_embeddings`.

    Every forward takes `width`: None (full), an int (every layer) or one int per layer
    (Mix'n'Match). State-dict names, shapes and row order are mamba-ssm's.
    """

    def __init__(self, config: MatMambaConfig | str = "lm-tiny", head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = MatMambaConfig.from_name(config) if isinstance(config, str) else config
        cfg = self.config
        self.backbone = LMBackbone(cfg)
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        self._init_weights()
        if head is None:
            head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
            if cfg.tie_embeddings:
                head.weight = self.backbone.embedding.weight
        self.lm_head = head

    def _new_like(self, config: MatMambaConfig) -> MatMambaLM:
        head = None
        if not (self.config.tie_embeddings and self.lm_head.weight is self.backbone.embedding.weight):
            import copy

            head = copy.deepcopy(self.lm_head)
        return MatMambaLM(config, head=head)

    def forward_features(
        self, input_ids: torch.Tensor, width: Width = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """input_ids: (B, L) -> features (B, L, d_model). With `cache`, continues the cached
        sequence and updates the cache (prefill)."""
        widths = self.config.resolve(width) if cache is None else self._check_cache(cache, width)
        h = self.backbone.embedding(input_ids)  # (B, L, D)
        h = self.backbone(h, widths, cache)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        return h

    def forward(
        self, input_ids: torch.Tensor, width: Width = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """input_ids: (B, L) -> logits (B, L, padded_vocab_size)."""
        return self._logits(self.forward_features(input_ids, width, cache))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """`self.lm_head(h)`. Inside `direct_weight_grads()` (training), a plain `nn.Linear` head
        without module hooks goes through `nested_linear`, whose backward adds the head's weight
        gradient into `.grad` in place instead of autograd casting and adding a full-size temporary
        at every width (`lit_matmamba.models.nested_linear`). Any other head runs its own forward."""
        head = self.lm_head
        if (
            type(head) is nn.Linear
            and not (head._forward_pre_hooks or head._forward_hooks)
            and not (head._backward_pre_hooks or head._backward_hooks)
            and direct_grads_apply(head.weight, head.bias)
        ):
            return nested_linear(h, head.weight, head.bias)
        return head(h)

    def loss(
        self,
        input_ids: torch.Tensor,
        width: Width = None,
        reduction: str = "mean",
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy of input_ids (B, L): the mean over the (B, L-1) predictions, a
        0-d float32 tensor (float64 for a float64 model), or with `reduction="none"` one loss per
        prediction, (B * (L-1),). The logits go to the `cross_entropy` op (`config.backend`) in
        their dtype, bf16 under autocast: its Triton kernel computes in float32 without a float32
        copy of the logits. With `return_logits`: (loss, logits (B, L-1, V)), for distillation
        (`lit_matmamba.training.joint.Distillation`)."""
        logits = self(input_ids[:, :-1], width)  # (B, L-1, V)
        loss = cross_entropy(
            logits.flatten(0, 1), input_ids[:, 1:].flatten(), backend=self.config.backend, reduction=reduction
        )
        return (loss, logits) if return_logits else loss

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One decoding step at the cache's widths. input_ids: (B,) -> logits (B, V)."""
        h = self.backbone.embedding(input_ids)  # (B, D)
        h = self.backbone.step(h, cache)
        cache.seqlen_offset += 1
        return self.lm_head(h)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        width: Width = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prefill `input_ids` (B, L), then sample `max_new_tokens` (greedy when temperature is 0).
        Returns (B, L + max_new_tokens)."""
        cache = self.allocate_cache(input_ids.shape[0], width, device=input_ids.device)
        logits = self(input_ids, width, cache)[:, -1]  # (B, V)
        out = [input_ids]
        for i in range(max_new_tokens):
            logits = logits[:, : self.config.vocab_size].float()
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                logits = self.step(token, cache)
        return torch.cat(out, dim=1)
