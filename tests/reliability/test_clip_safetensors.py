"""The CLIP loader reads safetensors only: a local checkpoint with pickle weights alone is refused (issue 13 #7)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import CLIPModel

from mmel.backbones.clip import CLIPBackbone, create_random_clip
from mmel.core.errors import MmelError


@pytest.fixture(scope="module")
def safetensors_clip(tmp_path_factory):
    return create_random_clip(tmp_path_factory.mktemp("clip-safetensors"), seed=0)


@pytest.fixture(scope="module")
def pickle_clip(tmp_path_factory, safetensors_clip):
    """The same tiny CLIP, its weights saved as pytorch_model.bin (a pickled state dict) and nothing else.

    transformers 5 no longer writes that format, so it is written as older releases did: torch.save.
    """
    directory = tmp_path_factory.mktemp("clip-pickle")
    for file in safetensors_clip.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    torch.save(CLIPModel.from_pretrained(safetensors_clip).state_dict(), directory / "pytorch_model.bin")
    return directory


def test_pickle_only_weights_are_refused_naming_the_file_and_the_fix(pickle_clip):
    assert (pickle_clip / "pytorch_model.bin").is_file() and not (pickle_clip / "model.safetensors").exists()
    with pytest.raises(MmelError, match=r"pytorch_model\.bin: CLIP weights stored as pickle") as refused:
        CLIPBackbone.load(pickle_clip)
    assert "model.safetensors" in str(refused.value) and "save_pretrained" in str(refused.value)


def test_safetensors_weights_load_and_match_the_saved_model(safetensors_clip):
    backbone = CLIPBackbone.load(safetensors_clip)
    saved = CLIPModel.from_pretrained(safetensors_clip)
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(backbone.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_converting_as_the_message_says_makes_the_directory_loadable(pickle_clip, tmp_path):
    converted = tmp_path / "converted"
    shutil.copytree(pickle_clip, converted)
    CLIPModel.from_pretrained(converted, use_safetensors=False).save_pretrained(converted)
    assert CLIPBackbone.load(converted).text_dim == 32
