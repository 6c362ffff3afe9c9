"""A Hugging Face user's script: load an exported Stamen model with transformers (and peft)
only, classify the held-out examples in a JSON file, print the accuracy as JSON.

    python tests/hf_user.py merged  EXPORT/model   heldout.json BATCH
    python tests/hf_user.py adapter EXPORT/adapter heldout.json BATCH

Run in a fresh process by tests/test_checkpoint_e2e.py. Stamen's own packages are made
unimportable first, so a load that needed them fails here.
"""

import importlib.abc
import json
import sys

PROJECT = {"ml", "stamen", "strategies", "server_app", "client_app", "measurements", "deploy", "device_runtime", "cli"}


class _NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"{name}: Stamen's code is not available to a Hugging Face user")
        return None


sys.meta_path.insert(0, _NoProject())

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def load(kind: str, path: str):
    if kind == "merged":
        return AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(base_path, trust_remote_code=True)
    return PeftModel.from_pretrained(base, path)


def main(kind: str, path: str, data_file: str, batch_size: int) -> None:
    data = json.loads(open(data_file).read())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load(kind, path).eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(data["texts"]), batch_size):
            texts = data["texts"][start : start + batch_size]
            enc = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            correct += int((logits.argmax(-1) == torch.tensor(data["labels"][start : start + batch_size])).sum())
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT)
    print(json.dumps({"accuracy": correct / len(data["texts"]), "n": len(data["texts"]), "project_modules": loaded,
                      "labels": model.config.id2label if kind == "merged" else None}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
