"""Writes the Gemma fixtures' config.json as transformers 4.x saves it (RoPE in `rope_theta`,
`rope_local_base_freq` and `rope_scaling`; the fixtures themselves come from 5.x, which keeps
them in per-layer-type `rope_parameters`) to tests/fixtures/<family>/config_v4.json, so that
tests can check that both layouts give the same model. Needs only transformers (no torch):

    python -m venv v4 && v4/bin/pip install transformers==4.57.6
    v4/bin/python tools/make_v4_configs.py
"""

import json
import pathlib
import tempfile

import transformers
from transformers import Gemma2Config, Gemma3TextConfig

assert transformers.__version__ == "4.57.6", transformers.__version__
root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
for family, cls in [("gemma2", Gemma2Config), ("gemma3", Gemma3TextConfig)]:
    v5 = json.loads((root / family / "safetensors" / "config.json").read_text())
    rope = v5.pop("rope_parameters")
    kw = {k: v for k, v in v5.items() if not k.startswith("_") and k not in ("dtype", "transformers_version")}
    if family == "gemma3":
        full, local = rope["full_attention"], rope["sliding_attention"]
        kw["rope_theta"] = full["rope_theta"]
        kw["rope_local_base_freq"] = local["rope_theta"]
        kw["rope_scaling"] = {"rope_type": full["rope_type"], "factor": full["factor"]}
    else:
        kw["rope_theta"] = rope["rope_theta"]
    config = cls(**kw)
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        text = (pathlib.Path(d) / "config.json").read_text()
    (root / family / "config_v4.json").write_text(text)
    print(family, {k: v for k, v in json.loads(text).items() if "rope" in k or "layer_types" in k or "sliding" in k})
