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
* :func:`pretraining_corpus`: the docstrings of a second, disjoint list of
  standard-library modules (:data:`PRETRAINING_MODULES`; no module is in both
  lists, and a docstring that also occurs in the fine-tuning corpus is dropped),
  cached the same way.
* :func:`tiny_gpt2`: a 2-layer GPT-2 (``n_embd=64``, 2 heads, 128 positions,
  ~125k parameters) built from a config, freshly initialised.
* :func:`base_gpt2`: that model pretrained once with AdamW on
  :func:`pretraining_corpus` (:class:`PretrainingRecipe`: 300 steps, ~30 s on one
  CPU thread) and saved with ``save_pretrained`` (model and byte tokenizer) under
  the cache directory, keyed by a hash of the config, the recipe and the corpus
  text, so reruns load it. Nothing is downloaded: it is the base model that
  ``integrations/run_clm.py`` fine-tunes by default.
* :class:`BlockDataset` / :func:`group_into_blocks`: text to fixed-length
  causal-LM blocks (``labels = input_ids``), as transformers' ``run_clm.py`` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
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
    "PRETRAINING_MODULES",
    "STDLIB_MODULES",
    "BlockDataset",
    "Corpus",
    "PretrainingRecipe",
    "base_gpt2",
    "byte_tokenizer",
    "cache_dir",
    "group_into_blocks",
    "pretraining_corpus",
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

_PRETRAINING_MODULE_LIST = """
asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams
asyncio.subprocess asyncio.tasks asyncio.transports bdb bz2 cmd code codecs colorsys
concurrent.futures.process concurrent.futures.thread configparser copyreg dis doctest email.generator
email.headerregistry email.parser email.policy email.utils filecmp fileinput fnmatch ftplib getopt
gettext graphlib gzip html.parser http.cookiejar http.cookies imaplib importlib.abc importlib.metadata
locale lzma mimetypes multiprocessing.connection multiprocessing.pool multiprocessing.queues netrc
numbers optparse pdb pkgutil platform plistlib poplib pstats py_compile pydoc quopri reprlib runpy
shelve smtplib symtable sysconfig trace tracemalloc types unittest.case unittest.loader unittest.mock
unittest.result unittest.suite urllib.error urllib.robotparser wave wsgiref.handlers
wsgiref.simple_server wsgiref.util xml.dom.minidom xml.sax.handler xml.sax.saxutils xmlrpc.client
xmlrpc.server zipapp zipimport zoneinfo
"""
#: The modules whose docstrings pretrain the base model: none of them is in ``STDLIB_MODULES``.
PRETRAINING_MODULES: tuple[str, ...] = tuple(sorted(_PRETRAINING_MODULE_LIST.split()))
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


def _documents(module_names: tuple[str, ...], skip_missing: bool = False) -> list[str]:
    """Docstrings of each module, its public classes and routines, and their public methods, in order.

    ``skip_missing``: leave out modules this Python build lacks (``lzma``, ``bz2``, ...).
    """
    with warnings.catch_warnings():
        # Reading a deprecated module's docstrings (typing.io, ...) warns; the text is all we use.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _collect_documents(module_names, skip_missing)


def _collect_documents(module_names: tuple[str, ...], skip_missing: bool) -> list[str]:
    documents = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            if skip_missing:
                continue
            raise
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
    return _cached_split(folder, refresh, lambda: _documents(STDLIB_MODULES))


def pretraining_corpus(directory: str | os.PathLike | None = None, refresh: bool = False) -> Corpus:
    """The docstrings of :data:`PRETRAINING_MODULES`: the base model's pretraining text, cached.

    No module is shared with :func:`stdlib_corpus`, and a document whose docstring also
    occurs there (an inherited method docstring, say) is left out, so no fine-tuning text,
    validation included, is seen in pretraining. ``validation`` is every
    ``VALIDATION_EVERY``-th document, as in :func:`stdlib_corpus`.
    """
    modules_key = hashlib.sha1("\n".join(PRETRAINING_MODULES + STDLIB_MODULES).encode()).hexdigest()[:8]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(directory) if directory is not None else cache_dir()
    folder = root / f"stdlib-pretraining-docs-v{_CORPUS_VERSION}-{version}-{modules_key}"

    def documents() -> list[str]:
        held_out = {_body(d) for d in _documents(STDLIB_MODULES)}
        found = _documents(PRETRAINING_MODULES, skip_missing=True)
        return [d for d in found if _body(d) not in held_out]

    return _cached_split(folder, refresh, documents)


def _cached_split(folder: Path, refresh: bool, documents: Callable[[], list[str]]) -> Corpus:
    """The corpus in ``folder``, built from ``documents()`` on a miss (or ``refresh``): every
    ``VALIDATION_EVERY``-th document is validation, the rest training."""
    train_path, validation_path = folder / "train.txt", folder / "validation.txt"
    if refresh or not (train_path.exists() and validation_path.exists()):
        found = documents()
        train = [d for i, d in enumerate(found) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
        validation = [d for i, d in enumerate(found) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
        _atomic_write(train_path, "\n\n".join(train) + "\n")
        _atomic_write(validation_path, "\n\n".join(validation) + "\n")
    return Corpus(
        train=train_path.read_text(encoding="utf-8"),
        validation=validation_path.read_text(encoding="utf-8"),
        path=folder,
    )


def _body(document: str) -> str:
    """A document without its title line (``module.name``)."""
    return document.partition("\n\n")[2]


# -- the base model ----------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainingRecipe:
    """How :func:`base_gpt2` pretrains the tiny GPT-2: AdamW, linear warm-up, cosine decay to 10%.

    Batches are drawn without replacement from the shuffled blocks of
    :func:`pretraining_corpus`'s train split (a new permutation each epoch), with a
    private generator; the run uses one CPU thread, so it is deterministic.
    """

    steps: int = 300
    batch_size: int = 16
    block_size: int = 128
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 15
    max_grad_norm: float = 1.0
    seed: int = 0


#: Bump to rebuild every cached base model (a change of the training code, say).
_BASE_VERSION = 1


@contextlib.contextmanager
def _exclusive(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (several ranks or runs building one cache entry).

    ``on_wait`` is called once if another process holds the lock, before waiting for it.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the atomic rename still keeps the cache consistent
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_model(model, directory: Path) -> None:
    """``config.json`` and ``model.safetensors`` as ``save_pretrained`` writes them, on any rank.

    (``save_pretrained`` writes nothing on a rank other than 0 of an initialised process group,
    and the rank that builds the base model is whichever takes the lock first.)
    """
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to transformer.wte.weight; from_pretrained ties it again
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _config_key(config) -> dict:
    settings = config.to_dict()
    settings.pop("transformers_version", None)
    return settings


def base_gpt2(
    directory: str | os.PathLike | None = None,
    recipe: PretrainingRecipe = PretrainingRecipe(),
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The directory of the pretrained tiny GPT-2 base model, built on first use and cached.

    A :func:`tiny_gpt2` (seed ``recipe.seed``) is pretrained with AdamW following ``recipe``
    on :func:`pretraining_corpus`, then saved with ``save_pretrained``, the byte tokenizer
    and ``pretraining.json`` (the recipe, the corpus, the final losses) beside it. Load it
    like any model: ``AutoModelForCausalLM.from_pretrained(path)``. The cache entry is keyed by
    a hash of the model config, the recipe, the corpus text and :data:`_BASE_VERSION`; several
    processes asking at once build it once (a file lock), and a partly written entry is never
    used (it is renamed into place when complete). ``progress`` receives one line when a build
    starts and one when it ends.
    """
    root = Path(directory) if directory is not None else cache_dir()
    corpus = pretraining_corpus(root)
    config = tiny_gpt2_config(n_positions=max(128, recipe.block_size))
    key_material = json.dumps(
        {
            "version": _BASE_VERSION,
            "config": _config_key(config),
            "recipe": asdict(recipe),
            "corpus": hashlib.sha256((corpus.train + "\0" + corpus.validation).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:12]
    folder = root / f"tiny-gpt2-base-v{_BASE_VERSION}-{key}"
    if (folder / "pretraining.json").exists():
        return folder

    def on_wait() -> None:
        if progress is not None:
            progress(f"Waiting for another process to pretrain the base model into {folder}")

    with _exclusive(root / f"{folder.name}.lock", on_wait):
        if (folder / "pretraining.json").exists():  # another process built it while this one waited
            return folder
        if progress is not None:
            progress(
                f"Pretraining the base model once ({recipe.steps} AdamW steps of {recipe.batch_size} x "
                f"{recipe.block_size} tokens on {corpus.path.name}); it is cached in {folder}"
            )
        started = time.time()
        summary = _pretrain(config, corpus, recipe)
        summary["seconds"] = round(time.time() - started, 1)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{folder.name}.", suffix=".tmp"))
        try:
            _save_model(summary["model"], tmp)
            byte_tokenizer().save_pretrained(tmp)
            del summary["model"]
            (tmp / "pretraining.json").write_text(
                json.dumps({**summary, "recipe": asdict(recipe), "corpus": str(corpus.path)}, indent=1) + "\n"
            )
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress is not None:
            progress(
                f"Base model pretrained in {summary['seconds']:.0f} s: pretraining eval loss "
                f"{summary['eval_loss']:.4f} (perplexity {math.exp(summary['eval_loss']):.2f})"
            )
    return folder


def _pretrain(config, corpus: Corpus, recipe: PretrainingRecipe) -> dict:
    """Pretrain a fresh tiny GPT-2 on ``corpus`` following ``recipe``; one CPU thread, deterministic."""
    from transformers import GPT2LMHeadModel

    tokenizer = byte_tokenizer()
    train = group_into_blocks(corpus.train, tokenizer, recipe.block_size)
    validation = group_into_blocks(corpus.validation, tokenizer, recipe.block_size)
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(recipe.seed)
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # as tiny_gpt2 names it (the class name does not)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            groups,
            lr=recipe.lr,
            betas=recipe.betas,
        )

        def factor(step: int) -> float:  # linear warm-up, then cosine from 1 to 0.1
            if step < recipe.warmup_steps:
                return (step + 1) / recipe.warmup_steps
            progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
            return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        generator = torch.Generator().manual_seed(recipe.seed)
        order: list[int] = []
        model.train()
        losses = []
        for _ in range(recipe.steps):
            if len(order) < recipe.batch_size:
                order += torch.randperm(train.shape[0], generator=generator).tolist()
            batch, order = train[order[: recipe.batch_size]], order[recipe.batch_size :]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            eval_losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in validation.split(64)]
            sizes = [chunk.shape[0] for chunk in validation.split(64)]
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng_state)
    tail = losses[-20:]
    return {
        "model": model,
        "train_loss_last_20_steps": sum(tail) / len(tail),
        "eval_loss": sum(loss * n for loss, n in zip(eval_losses, sizes)) / sum(sizes),
        "train_blocks": train.shape[0],
        "eval_blocks": validation.shape[0],
    }


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
