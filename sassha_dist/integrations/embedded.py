"""The embedded default for the causal-LM job: tokenizer, corpus and model, with no download.

* :func:`byte_tokenizer`: a byte-level tokenizer built in code. Token ``i < 256``
  is byte ``i``; then ``<|endoftext|>`` (256, also BOS) and ``<pad>`` (257). No
  vocabulary file, no merges: every UTF-8 text round-trips.
* :func:`stdlib_corpus`: a few hundred KB of English-and-code text, the
  docstrings of a fixed, sorted list of Python standard-library modules
  (module, public classes and functions, public methods), built at run time,
  cached under ``$SASSHA_DIST_CACHE`` (default ``~/.cache/sassha_dist``) and
  split deterministically into train and validation. The text depends on the
  Python version (its docstrings), so the cache file name carries it.
* :func:`tiny_gpt2`: a 2-layer GPT-2 (``n_embd=64``, 2 heads, 128 positions,
  ~125k parameters) built from a config and trained **from scratch**: no
  pretrained weights are involved.
* :class:`BlockDataset` / :func:`group_into_blocks`: text to fixed-length
  causal-LM blocks (``labels = input_ids``), as transformers' ``run_clm.py`` does.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "BOS_TOKEN",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "EOS_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "STDLIB_MODULES",
    "BlockDataset",
    "Corpus",
    "byte_tokenizer",
    "cache_dir",
    "group_into_blocks",
    "stdlib_corpus",
    "tiny_gpt2",
    "tiny_gpt2_config",
]

EOS_TOKEN = BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
EOS_ID, PAD_ID = 256, 257
#: 256 bytes + ``<|endoftext|>`` + ``<pad>``.
BYTE_VOCAB_SIZE = 258

_MODULE_LIST = """
abc argparse ast base64 bisect calendar collections contextlib copy csv dataclasses datetime
decimal difflib email.message enum fractions functools glob hashlib heapq hmac http.client
http.server inspect io ipaddress itertools json logging mailbox math operator os pathlib pickle
pprint queue random re sched secrets selectors shlex shutil socket statistics string struct
subprocess tarfile tempfile textwrap threading time timeit tokenize traceback typing
urllib.parse urllib.request uuid warnings weakref xml.etree.ElementTree zipfile
"""
#: The modules whose docstrings make the corpus, in this (sorted) order.
STDLIB_MODULES: tuple[str, ...] = tuple(sorted(_MODULE_LIST.split()))
#: Every ``VALIDATION_EVERY``-th document (module, class or function docstring) goes to validation.
VALIDATION_EVERY = 10
_CORPUS_VERSION = 1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def byte_tokenizer():
    """A fast byte-level tokenizer built in code (no files): ids 0-255 are bytes, 256 EOS/BOS, 257 pad.

    It is a ``tokenizers`` BPE model with the 256 byte symbols and no merges
    behind GPT-2's byte-level pre-tokenizer and decoder, wrapped as a
    transformers fast tokenizer, so ``save_pretrained`` / ``AutoTokenizer``,
    the data collators and the Trainer treat it like any other.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = _bytes_to_unicode()
    model = models.BPE(vocab={byte_symbols[b]: b for b in range(256)}, merges=[])
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 30,
    )
    assert tokenizer.eos_token_id == EOS_ID and tokenizer.pad_token_id == PAD_ID and len(tokenizer) == 258
    return tokenizer


def tiny_gpt2_config(vocab_size: int = BYTE_VOCAB_SIZE, n_positions: int = 128, **overrides):
    """``GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)`` for the byte vocabulary, no dropout.

    Dropout is off so that SASSHA's passes (gradient, perturbed gradient,
    Hessian) see the same function; pass ``resid_pdrop=...`` etc. to change it.
    Attention is ``"eager"``: exact Hessian-vector products need a double
    backward, which the fused SDPA attention kernels do not implement.
    """
    from transformers import GPT2Config

    settings = {
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 2,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "attn_implementation": "eager",
    }
    settings.update(overrides)
    return GPT2Config(**settings)


def tiny_gpt2(seed: int = 0, **config_overrides):
    """A freshly initialised (untrained) tiny GPT-2 from :func:`tiny_gpt2_config`; ``seed`` fixes it."""
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2_config(**config_overrides)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(state)
    # transformers infers the loss from the class name, which "GPT2LMHeadModel" does not match.
    # Name it, so the Trainer counts the tokens of the shifted labels when it normalises the loss.
    model.loss_type = "ForCausalLM"
    return model


# -- corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """The corpus's two splits, and where they are cached."""

    train: str
    validation: str
    path: Path


def cache_dir() -> Path:
    """``$SASSHA_DIST_CACHE``, else ``$XDG_CACHE_HOME/sassha_dist``, else ``~/.cache/sassha_dist``."""
    explicit = os.environ.get("SASSHA_DIST_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sassha_dist"


def _documents(module_names: tuple[str, ...]) -> list[str]:
    """Docstrings of each module, its public classes and routines, and their public methods, in order."""
    documents = []
    for name in module_names:
        module = importlib.import_module(name)
        doc = inspect.getdoc(module)
        if doc:
            documents.append(f"Module {name}\n\n{doc}")
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                documents.append(f"{name}.{attr}\n\n{doc}")
            if inspect.isclass(obj):
                for method_name in sorted(vars(obj)):
                    method = vars(obj)[method_name]
                    if method_name.startswith("_") or not inspect.isroutine(method):
                        continue
                    doc = inspect.getdoc(method)
                    if doc:
                        documents.append(f"{name}.{attr}.{method_name}\n\n{doc}")
    return documents


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stdlib_corpus(directory: str | os.PathLike | None = None, refresh: bool = False) -> Corpus:
    """The standard-library docstring corpus, built on first use and cached (safe for concurrent ranks).

    Documents are separated by a blank line and ``<|endoftext|>`` is not
    inserted (the byte tokenizer would split it into bytes). Every
    ``VALIDATION_EVERY``-th document (from the 10th) goes to validation, the rest to
    train. The cache key holds the Python version and the module list.
    """
    modules_key = hashlib.sha1("\n".join(STDLIB_MODULES).encode()).hexdigest()[:8]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(directory) if directory is not None else cache_dir()
    folder = root / f"stdlib-docs-v{_CORPUS_VERSION}-{version}-{modules_key}"
    train_path, validation_path = folder / "train.txt", folder / "validation.txt"
    if refresh or not (train_path.exists() and validation_path.exists()):
        documents = _documents(STDLIB_MODULES)
        train = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
        validation = [d for i, d in enumerate(documents) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
        _atomic_write(train_path, "\n\n".join(train) + "\n")
        _atomic_write(validation_path, "\n\n".join(validation) + "\n")
    return Corpus(
        train=train_path.read_text(encoding="utf-8"),
        validation=validation_path.read_text(encoding="utf-8"),
        path=folder,
    )


# -- blocks ------------------------------------------------------------------------------


def group_into_blocks(text: str, tokenizer, block_size: int, chunk_chars: int = 1 << 20) -> torch.Tensor:
    """Tokenize ``text`` (in line-aligned chunks), concatenate, and cut into ``[n, block_size]`` blocks.

    The tail shorter than ``block_size`` is dropped, as in transformers' ``run_clm.py``.
    """
    if block_size < 2:
        raise ValueError(f"Invalid {block_size=}. Must be >= 2.")
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"The text has {len(ids)} tokens, fewer than one block of {block_size}: lower --block_size."
        )
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


class BlockDataset(Dataset):
    """Fixed-length causal-LM examples: ``{"input_ids": block, "labels": block}`` (the model shifts)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"Invalid blocks of shape {tuple(blocks.shape)}. Must be [n_blocks, block_len].")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}
