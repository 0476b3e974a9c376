"""Writes each causal fixture's config.json as transformers 5.x saves it (RoPE moved into
`rope_parameters`) to tests/fixtures/<family>/config_v5.json, so that tests can check that both
layouts give the same model. Needs only transformers (no torch):

    python -m venv v5 && v5/bin/pip install transformers==5.24.0
    v5/bin/python tools/make_v5_configs.py
"""

import json
import pathlib
import tempfile

import transformers
from transformers import AutoConfig

assert transformers.__version__ == "5.24.0", transformers.__version__
root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
for family in ["gpt2", "llama", "qwen2", "phi3"]:
    config = AutoConfig.from_pretrained(root / family / "safetensors")
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        text = (pathlib.Path(d) / "config.json").read_text()
    (root / family / "config_v5.json").write_text(text)
    rope = {k: v for k, v in json.loads(text).items() if "rope" in k}
    print(family, rope)
