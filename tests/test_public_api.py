"""``stable_sam``'s public API (``stable_sam/__init__.py``): every exported name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import stable_sam


def test_every_exported_name_resolves_to_what_its_module_defines():
    import stable_sam.builders  # a submodule of the same stem must not hide the function

    for name in stable_sam.__all__:
        value = getattr(stable_sam, name)
        assert getattr(value, "__name__", name) == name or not callable(value), name
    assert stable_sam.build is stable_sam.builders.build and callable(stable_sam.build)
    assert {"build", "StableSamPredictor", "PluginConfig", "open_dataset", "train_plugin"} <= set(stable_sam.__all__)


def test_importing_a_settings_module_does_not_load_the_model_code():
    code = "import sys, stable_sam.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
