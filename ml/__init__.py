"""Model and data code: base-model loading, LoRA injection, datasets, partitioning and the
train/eval loops. No Flower imports here: this is what a ClientApp or the server runs."""
