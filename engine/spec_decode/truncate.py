"""Makes a draft model from a target checkpoint by keeping some of its decoder layers (a
"truncated-layer" draft: same tokenizer, embeddings, final norm and LM head). Used by the
benchmark and the tests; no training involved."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def make_truncated_draft(src: str | Path, out: str | Path, layers: list[int]) -> Path:
    """Writes ``out``: the checkpoint ``src`` with only decoder ``layers`` (in the given order)."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers must be a non-empty list of indices in [0, {n}), got {layers}")
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()).get("draft_layers") == layers:
        return out  # already made
    out.mkdir(parents=True, exist_ok=True)
    new_index = {old: new for new, old in enumerate(layers)}
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, tensor in load_file(f).items():
            m = _LAYER.match(name)
            if m is None:
                weights[name] = tensor
            elif int(m.group(1)) in new_index:
                weights[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    config["num_hidden_layers"] = len(layers)
    config["draft_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
