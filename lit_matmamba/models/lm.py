"""MatMamba language model, parameter-compatible with mamba-ssm's `MambaLMHeadModel` (Mamba2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lit_matmamba.kernels import cross_entropy

from .backbone import InferenceCache, MatMambaStack, NestedModel
from .config import MatMambaConfig, Width
from .nested_linear import direct_grads_apply, nested_linear

if TYPE_CHECKING:
    from lit_matmamba.graphs import GraphedDecoder


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
        if not self.tied:
            import copy

            head = copy.deepcopy(self.lm_head)
        return MatMambaLM(config, head=head)

    @property
    def tied(self) -> bool:
        """Whether the head's weight is the embedding's."""
        return getattr(self.lm_head, "weight", None) is self.backbone.embedding.weight

    def custom_head(self) -> nn.Module | None:
        """The head, unless it is the default: a linear LM head without bias, tied to the embedding
        exactly when `config.tie_embeddings`."""
        head, cfg = self.lm_head, self.config
        default = (
            type(head) is nn.Linear
            and head.bias is None
            and tuple(head.weight.shape) == (cfg.padded_vocab_size, cfg.d_model)
            and self.tied == cfg.tie_embeddings
        )
        return None if default else head

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
    def prefill(self, prompts: Sequence[torch.Tensor], cache: InferenceCache) -> torch.Tensor:
        """Run prompts of any lengths into `cache` (allocated for `len(prompts)` rows): row i of the
        cache continues prompt i exactly as if it had been run alone. Prompts of the same length
        run as one batch; no padding enters any state. Returns the logits after each prompt's last
        token, (B, V). `cache.seqlen_offset` becomes the longest prompt's length."""
        lengths = [int(p.shape[0]) for p in prompts]
        if len(prompts) != cache.states[0].ssm.shape[0]:
            raise ValueError(f"the cache has {cache.states[0].ssm.shape[0]} rows for {len(prompts)} prompts")
        if min(lengths, default=0) < 1:
            raise ValueError("every prompt needs at least one token")
        device, dtype = cache.states[0].conv.device, cache.states[0].conv.dtype
        groups = []  # (rows, cache, last logits) per prompt length
        for length in sorted(set(lengths)):
            idx = [i for i, n in enumerate(lengths) if n == length]
            sub = self.allocate_cache(len(idx), cache.widths, dtype=dtype, device=device)
            h = self.forward_features(torch.stack([prompts[i] for i in idx]), cache.widths, sub)
            rows = torch.tensor(idx, device=device)
            groups.append((rows, sub, self._logits(h[:, -1])))  # the head on the last token only: (b, V)
        last = groups[0][2].new_empty(len(prompts), groups[0][2].shape[-1])  # (B, V)
        for rows, _, logits in groups:
            last[rows] = logits
        for i, state in enumerate(cache.states):
            for name in ("conv", "ssm"):
                first = getattr(groups[0][1].states[i], name)
                # In the cache's own dtypes (an SSM state allocated in bf16 stays bf16).
                full = first.new_empty(len(prompts), *first.shape[1:], dtype=getattr(state, name).dtype)
                for rows, sub, _ in groups:
                    full[rows] = getattr(sub.states[i], name).to(full.dtype)
                setattr(state, name, full)
        cache.seqlen_offset = max(lengths)
        return last

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
        max_new_tokens: int,
        width: Width = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
        cuda_graphs: bool | None = None,
        decoder: GraphedDecoder | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Prefill the prompts, then sample up to `max_new_tokens` each at `width` (see `sample`
        for temperature, top_k, top_p; greedy when temperature is 0), with the recurrent state sized
        to that width.

        `input_ids` is a (B, L) tensor of prompts of one length, or a list of prompts of any lengths
        (1-D tensors or lists of ids), prefilled without padding (`prefill`). A row stops after it
        samples `eos_token_id`. Returns (B, L + max_new_tokens) for a tensor, rows that stopped
        early padded with `eos_token_id`; for a list, a list of 1-D tensors, each its prompt and its
        new tokens up to and including the EOS.

        The steps run on a `lit_matmamba.graphs.GraphedDecoder`: `decoder` if given (built once for
        this width and up to its batch size, as a server or a benchmark keeps it), else one made for
        this call, with CUDA graphs when `cuda_graphs` (default: on a CUDA device). Graphed and
        eager steps compute the same (tested on the GPU token for token).
        """
        from lit_matmamba.graphs import GraphedDecoder

        as_tensor = isinstance(input_ids, torch.Tensor)
        if as_tensor and input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        device = self.backbone.embedding.weight.device
        prompts = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in input_ids]
        if not prompts:
            raise ValueError("no prompts to continue")
        if decoder is None:
            n = len(prompts)
            decoder = GraphedDecoder(self, width, n, cuda_graphs=cuda_graphs, buckets=[n])
        elif decoder.widths != self.config.resolve(width) or decoder.batch_size < len(prompts):
            raise ValueError(
                f"the decoder runs widths {decoder.widths} for up to {decoder.batch_size} rows, not "
                f"{self.config.resolve(width)} for {len(prompts)}"
            )
        logits = decoder.prefill(prompts)  # (B, V)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        new: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            token = sample(logits[:, : self.config.vocab_size], temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done = done | (token == eos_token_id)
            new.append(token)
            # Asking whether every row is done waits for the GPU: only when there is an EOS to see.
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = decoder.step(token)  # (B, V), the decoder's buffer: read before the next step
        tokens = torch.stack(new, 1) if new else prompts[0].new_empty(len(prompts), 0)  # (B, N)
        if as_tensor:
            if tokens.shape[1] < max_new_tokens:  # every row stopped: pad with EOS to the stated shape
                pad = tokens.new_full((len(prompts), max_new_tokens - tokens.shape[1]), eos_token_id)
                tokens = torch.cat([tokens, pad], 1)
            return torch.cat([torch.stack(prompts), tokens], 1)
        out = []
        for prompt, row in zip(prompts, tokens):
            if eos_token_id is not None and bool((row == eos_token_id).any()):
                row = row[: int((row == eos_token_id).nonzero()[0]) + 1]
            out.append(torch.cat([prompt, row]))
        return out


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): the argmax when `temperature` is 0, else a draw from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens and then to the
    smallest set whose probability reaches `top_p` (nucleus sampling)."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
