"""Tokenizers: from a Hugging Face folder, or converted from a GGUF file and cached on disk.

transformers converts a GGUF vocabulary into a fast tokenizer in tens of seconds (it parses every
metadata item in Python), so the converted tokenizer is saved under
`$RADIXKV_CACHE/tokenizers/<key>` (default `~/.cache/radixkv`), keyed by the file's real path,
size and mtime and the transformers version; a second start loads it in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from radixkv.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in common chat templates; one counts as a stop token for a
# model when its chat template mentions it.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_memo: dict[str, Any] = {}
_memo_lock = threading.Lock()


def cache_root() -> Path:
    """Root of radixkv's on-disk cache: $RADIXKV_CACHE, else ~/.cache/radixkv."""
    env = os.environ.get("RADIXKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radixkv"


def gguf_tokenizer_cache_dir(gguf_path: str) -> Path:
    """Where the tokenizer converted from `gguf_path` is cached (changes when the file does)."""
    import transformers

    real = os.path.realpath(gguf_path)
    st = os.stat(real)
    key = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return cache_root() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _from_pretrained(path: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)


def _save_atomically(tokenizer: Any, target: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: readers never see a partial dir."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError as exc:
        log.warning("radixkv: cannot cache the tokenizer under %s: %s", target.parent, exc)
        return
    try:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError as exc:  # e.g. another process cached it first: theirs is as good
        log.debug("radixkv: tokenizer cache %s not written: %s", target, exc)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_from_gguf(gguf_path: str) -> Any:
    """The tokenizer (and chat template) stored in a GGUF file, through the on-disk cache."""
    cache_dir = gguf_tokenizer_cache_dir(gguf_path)
    if (cache_dir / "tokenizer_config.json").is_file():
        try:
            return _from_pretrained(str(cache_dir))
        except Exception as exc:  # a damaged cache entry is rebuilt, not fatal
            log.warning("radixkv: rebuilding tokenizer cache %s (%s)", cache_dir, exc)
            shutil.rmtree(cache_dir, ignore_errors=True)
    real = os.path.realpath(gguf_path)
    try:
        tokenizer = _from_pretrained(os.path.dirname(real), gguf_file=os.path.basename(real))
    except Exception as exc:
        raise ModelLoadError(f"cannot build a tokenizer from {gguf_path}: {exc}") from exc
    _save_atomically(tokenizer, cache_dir)
    return tokenizer


def tokenizer_from_folder(folder: str) -> Any:
    """The tokenizer of a Hugging Face model folder (tokenizer.json / tokenizer_config.json)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        raise ModelLoadError(f"{folder} has no tokenizer files (tokenizer.json, "
                             "tokenizer_config.json, ...)")
    try:
        return _from_pretrained(folder)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {exc}") from exc


def get_tokenizer(kind: str, path: str) -> Any:
    """Tokenizer of a resolved model (`kind` "gguf" or "hf").

    GGUF tokenizers are also memoised per process, keyed like the disk cache (so a changed file
    is re-read); a folder's tokenizer loads fast and is read afresh each time.
    """
    if kind != "gguf":
        return tokenizer_from_folder(path)
    key = str(gguf_tokenizer_cache_dir(path))
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    tokenizer = tokenizer_from_gguf(path)
    with _memo_lock:
        return _memo.setdefault(key, tokenizer)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's eos and of the end-of-turn markers its chat template uses."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in template and marker in vocab:
            ids.append(int(vocab[marker]))
    return ids


def chat_ids(tokenizer: Any, messages: Iterable[dict[str, str]],
             add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` with the tokenizer's chat template and tokenize the result.

    The rendered text already holds every special token the template wants (e.g. a BOS), so it is
    tokenized without adding more, as transformers' own apply_chat_template does.
    """
    msgs = list(messages)
    for m in msgs:
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)):
            raise InvalidRequestError(f"a chat message must be a dict with str 'role' and "
                                      f"'content', got {m!r}")
    if not tokenizer.chat_template:
        raise ModelLoadError("this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(msgs, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
