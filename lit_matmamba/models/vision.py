"""MatMamba-Vision: a ViT-like classifier whose blocks are nested Mamba2 mixers."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import MatMambaStack, NestedModel
from .config import MatMambaConfig, Width


class ClassifierHead(nn.Module):
    """Dropout + linear classifier on pooled features (B, d_model) -> (B, num_classes)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.fc.bias)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))


class MatMambaVision(NestedModel):
    """A nested MatMamba image classifier.

    Patches get learned positions; the class token is appended at the END of the sequence,
    because the scan is causal and only the last token has seen every patch. Features are
    pooled from that token (`pool="token"`) or averaged over all tokens (`pool="mean"`).

    Args:
        config: a `MatMambaConfig` or the name of a preset, e.g. "vision-35m".
        head: maps pooled features (B, d_model) to outputs; default `ClassifierHead`.
    """

    def __init__(self, config: MatMambaConfig | str = "vision-tiny", head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = MatMambaConfig.from_name(config) if isinstance(config, str) else config
        cfg = self.config
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.grid = cfg.img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, cfg.d_model))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for p in (self.pos_embed, self.cls_token):
            p._no_weight_decay = True
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.backbone = MatMambaStack(cfg)
        self._init_weights()
        self.head = head if head is not None else ClassifierHead(cfg.d_model, cfg.num_classes, cfg.drop_rate)

    def _new_like(self, config: MatMambaConfig) -> MatMambaVision:
        return MatMambaVision(config, head=copy.deepcopy(self.head))

    def custom_head(self) -> nn.Module | None:
        """The head, unless it is the default `ClassifierHead` for `config.num_classes`."""
        head, cfg = self.head, self.config
        default = (
            type(head) is ClassifierHead
            and head.fc.in_features == cfg.d_model
            and head.fc.out_features == cfg.num_classes
        )
        return None if default else head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for `num_classes` (fine-tuning on another label set)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.head = ClassifierHead(self.config.d_model, num_classes, self.config.drop_rate).to(
            self.pos_embed.device
        )

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, grid_h * grid_w + 1, d_model): patch positions resized (bicubic) to the input's grid
        when it differs from training, then the class token's position."""
        patch_pos, cls_pos = self.pos_embed[:, :-1], self.pos_embed[:, -1:]
        if (grid_h, grid_w) != (self.grid, self.grid):
            d = patch_pos.shape[-1]
            patch_pos = patch_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)  # (1, D, g, g)
            patch_pos = F.interpolate(
                patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False
            )
            patch_pos = patch_pos.to(cls_pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d)
        return torch.cat([patch_pos, cls_pos], dim=1)

    def forward_features(self, images: torch.Tensor, width: Width = None) -> torch.Tensor:
        """images: (B, C, H, W) -> pooled features (B, d_model). H and W need only be multiples
        of the patch size."""
        widths = self.config.resolve(width)
        p = self.config.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}")
        x = self.patch_embed(images)  # (B, D, h, w)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        x = torch.cat([x, self.cls_token.expand(x.shape[0], -1, -1)], dim=1)  # (B, h*w+1, D)
        x = self.pos_drop(x + self.position_embeddings(gh, gw))
        x = self.backbone(x, widths)  # (B, h*w+1, D)
        return x[:, -1] if self.config.pool == "token" else x.mean(dim=1)

    def forward(self, images: torch.Tensor, width: Width = None) -> torch.Tensor:
        """images: (B, C, H, W) -> head outputs, e.g. logits (B, num_classes)."""
        return self.head(self.forward_features(images, width))

    def loss(
        self, images: torch.Tensor, targets: torch.Tensor, width: Width = None, return_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the logits at `width` in float32, a 0-d tensor. `targets` are class
        indices (B,) or soft targets (B, num_classes), as mixup and cutmix make. With
        `return_logits`: (loss, logits (B, num_classes) in float32), for distillation
        (`lit_matmamba.training.joint.Distillation`)."""
        logits = self(images, width).float()  # (B, num_classes)
        if targets.is_floating_point():
            loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits, targets)
        return (loss, logits) if return_logits else loss
