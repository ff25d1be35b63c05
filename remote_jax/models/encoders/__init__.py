"""Pretrained text and vision encoders (BERT, CLIP ViT); see docs/design.md section 2."""
from remote_jax.models.encoders.bert import BertConfig, BertEmbeddings, BertEncoder, BertLayer
from remote_jax.models.encoders.clip_vit import (
    CLIPEncoderLayer,
    CLIPVisionConfig,
    CLIPVisionEmbeddings,
    CLIPVisionTower,
)

__all__ = [
    "BertConfig", "BertEmbeddings", "BertEncoder", "BertLayer",
    "CLIPEncoderLayer", "CLIPVisionConfig", "CLIPVisionEmbeddings", "CLIPVisionTower",
]
