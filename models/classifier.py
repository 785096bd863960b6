"""Fine-tuning model: the pretrained encoder on all tokens, mean-pooled patch tokens, LayerNorm, dropout, a linear
head."""

import torch
import torch.nn as nn

from models.config import ClassifierConfig, resolve_config
from models.encoder import VideoViT
from models.layers import init_weights


class VideoClassifier(VideoViT):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        init_weights(self)
        self.init_tokens()
        self.init_head()

    def init_head(self) -> None:
        """A small head (weights and bias scaled by head_init_scale) so fine-tuning starts near uniform logits."""
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.head.weight.data.mul_(self.cfg.head_init_scale)

    def forward_features(self, videos: torch.Tensor) -> torch.Tensor:
        """[N, C, T, H, W] -> [N, D]: mean of the patch tokens (not the cls token), then the LayerNorm."""
        x = self.encode(self.embed(videos))  # [N, 1+L, D]
        return self.norm(x[:, 1:].mean(dim=1))

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(videos)))  # [N, num_classes] logits


def build_classifier(name: str = "vit_b", num_classes: int = 400, **overrides) -> VideoClassifier:
    """Classifier of size vit_b | vit_l | vit_h | vit_tiny; overrides use mae_st's constructor argument names."""
    return VideoClassifier(resolve_config(ClassifierConfig, name, num_classes=num_classes, **overrides))
