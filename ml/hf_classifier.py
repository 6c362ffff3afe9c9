"""The text classifier as a Hugging Face model class, for exported models.

Stamen's classifier (ml/model.py: EncoderClassifier) is an encoder, mean pooling over the
attention mask, and a linear head: how sentence-transformers trained all-MiniLM-L6-v2.
No class in transformers pools that way (BertForSequenceClassification reads the [CLS]
token through a pooler whose weights that checkpoint does not ship), so an export carries
this file beside its weights and names it in config.json's ``auto_map``:

    AutoModelForSequenceClassification.from_pretrained(export_dir, trust_remote_code=True)

The module and parameter names are EncoderClassifier's (``backbone.*``, ``head.*``), so a
peft adapter trained in Stamen applies to it unchanged. This file imports only torch and
transformers: it is copied into every export and runs without Stamen installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolingClassifier(PreTrainedModel):
    """An encoder (any ``AutoModel`` architecture), mean pooling, a linear head."""

    config_class = AutoConfig
    base_model_prefix = "backbone"
    # attention runs in the backbone, which supports what its own class supports
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.backbone = AutoModel.from_config(config)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        # token_type_ids and the like are not passed on: Stamen's classifier trained without them
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
