"""What a user expects of the installed package: one version, the license in the metadata,
``py.typed`` markers, and ``DASGConfig.use_cache`` honoured by ``generate``."""
from __future__ import annotations

import os
import runpy

import pytest
import setuptools
import torch

import dasg_kernels
import dasg_model
from dasg_model import DASGConfig, DASGForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """The keywords ``setup.py`` passes to ``setuptools.setup`` (nothing is built)."""
    got: dict = {}
    orig = setuptools.setup
    setuptools.setup = lambda **kw: got.update(kw)
    try:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = orig
    return got


def test_one_version_everywhere(setup_kwargs):
    from dasg_kernels._version import __version__

    assert dasg_kernels.__version__ == dasg_model.__version__ == __version__ == setup_kwargs["version"]
    assert all(part.isdigit() for part in __version__.split("."))


def test_license_file_and_metadata(setup_kwargs):
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert setup_kwargs["license"] == "Apache-2.0"
    assert setup_kwargs["license_files"] == ["LICENSE"]
    assert "License :: OSI Approved :: Apache Software License" in setup_kwargs["classifiers"]


@pytest.mark.parametrize("package", ["dasg_kernels", "dasg_model"])
def test_py_typed_marker_is_shipped(setup_kwargs, package):
    assert os.path.isfile(os.path.join(ROOT, package, "py.typed"))
    assert "py.typed" in setup_kwargs["package_data"][package]


def test_use_cache_is_a_config_field(tmp_path):
    assert DASGConfig().use_cache is True
    cfg = DASGConfig(use_cache=False)
    assert cfg.use_cache is False
    cfg.save_pretrained(tmp_path)
    assert DASGConfig.from_pretrained(tmp_path).use_cache is False
    assert DASGConfig.from_json(cfg.to_json()).use_cache is False
    assert cfg.replace(use_cache=True).use_cache is True
    with pytest.raises(ValueError, match="use_cache"):
        DASGConfig(use_cache="no")


def test_generate_honours_config_use_cache():
    """``use_cache=False`` in the config: ``generate`` feeds the whole sequence every step and
    passes no cache; the tokens equal those of the cached model."""
    kw = dict(vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1, attention_window=4,
              group_size=4, shallow_shared_size=16, deep_shared_size=16, shallow_expert_size=16,
              deep_expert_size=16, backend="torch")
    torch.manual_seed(0)
    cached = DASGForCausalLM(DASGConfig(**kw)).eval()
    uncached = DASGForCausalLM(DASGConfig(**kw, use_cache=False)).eval()
    uncached.load_state_dict(cached.state_dict())
    assert uncached.generation_config.use_cache is False and cached.generation_config.use_cache is True
    seen = []
    forward = uncached.forward

    def spy(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append((ids.shape[1], kwargs.get("past_key_values", kwargs.get("cache"))))
        return forward(*args, **kwargs)

    uncached.forward = spy
    prompt = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = cached.generate(prompt, max_new_tokens=4, do_sample=False)
        got = uncached.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert [n for n, _ in seen] == [5, 6, 7, 8] and all(c is None for _, c in seen)
    with torch.no_grad():
        out = uncached(prompt)
    assert out.cache is None
