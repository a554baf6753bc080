"""A checkpoint's tokenizer, loaded as transformers loads it, and its special token ids.

`load_hf_tokenizer(dir)` gives transformers' fast tokenizer of a checkpoint directory:
`tokenizer.json` with `tokenizer_config.json` / `special_tokens_map.json` (added tokens,
special tokens, `chat_template` or `chat_template.jinja`), or, without a `tokenizer.json`,
the transformers class that `tokenizer_config.json` names built from `vocab.json` +
`merges.txt`. No code from the checkpoint is run: a class that only exists as remote code
(Dream's `DreamTokenizer`, a Qwen2 BPE) is read as the transformers class it wraps.

`resolve_special_ids(dir, family=..., vocab_size=...)` states which ids a checkpoint uses.
Each of pad / bos / eos / mask is the first of

  1. `config.json` `<name>_token_id` (the model's own config, as transformers reads it;
     a list means the first id, and every id of it ends generation),
  2. `generation_config.json` `<name>_token_id`,
  3. the tokenizer's `<name>_token` (`tokenizer_config.json`, then `special_tokens_map.json`),
  4. the family's published token name found in the tokenizer (`FAMILY_TOKENS`),
  5. the family's published id, when the vocabulary is the published one (same size).

The end-of-turn id (`eot`: LLaDA's `<|eot_id|>`, Dream's `<|im_end|>`) comes from
`config.json` `eot_token_id`, else steps 4-5. `stops` (ids that end a generated answer) are
EOS, EOT and every id of `config.json` / `generation_config.json` `eos_token_id`. A missing
mask id where the family's noise is the mask token (LLaDA, Dream; DiffusionGemma's noise is a
uniform vocabulary id, it has none), or a missing BOS where the family prepends one (LLaDA),
is a `ConfigError` naming the files and keys that were read.

`CheckpointTokenizer` wraps the transformers tokenizer with the resolved ids and the few
calls the project makes: `encode` (no special tokens added: the callers frame BOS / EOS
themselves from the resolved ids), `decode`, `chat_prompt` (the chat template applied).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qdlm_jax.errors import CheckpointError, ConfigError
from qdlm_jax.models.config import dream_7b, llada_8b
from qdlm_jax.models.gemma_config import FAMILY as GEMMA_FAMILY
from qdlm_jax.models.gemma_config import diffusion_gemma_26b_a4b

__all__ = [
    "FAMILY_TOKENS",
    "TOKENIZER_FILES",
    "CheckpointTokenizer",
    "SpecialIds",
    "load_hf_tokenizer",
    "resolve_special_ids",
    "stop_index",
    "tokenizer_files",
]

# Every file a checkpoint's tokenizer and generation settings may live in; copied along by
# every command that writes a checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")

def tokenizer_files(directory: str | Path) -> list[Path]:
    """The files of `TOKENIZER_FILES` that `directory` holds."""
    return [Path(directory) / f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()]


# The special tokens of the published checkpoints, by name (step 4 of the resolution).
FAMILY_TOKENS: dict[str, dict[str, str]] = {
    "llada": {"pad": "<|endoftext|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>",
              "mask": "<|mdm_mask|>", "eot": "<|eot_id|>"},
    "dream": {"pad": "<|endoftext|>", "bos": "<|beginoftext|>", "eos": "<|endoftext|>",
              "mask": "<|mask|>", "eot": "<|im_end|>"},
    GEMMA_FAMILY: {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"},
}
_PUBLISHED = {"llada": llada_8b(), "dream": dream_7b(), GEMMA_FAMILY: diffusion_gemma_26b_a4b()}
# Families whose noise is a uniform vocabulary id: no mask token to require.
NO_MASK_FAMILIES = (GEMMA_FAMILY,)
_FIELDS = ("pad", "bos", "eos", "mask")
# Tokenizer classes that exist only as a checkpoint's remote code, and the transformers class
# that reads the same files.
_REMOTE_CLASSES = {"DreamTokenizer": "Qwen2Tokenizer"}


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The special token ids a checkpoint uses, and where each was found."""

    pad: int | None
    bos: int | None
    eos: int | None
    mask: int | None
    eot: int | None = None  # end of an instruct turn
    stops: tuple[int, ...] = ()  # ids that end a generated answer (EOS, EOT, generation EOS)
    sources: tuple[tuple[str, str], ...] = ()  # (field, "file:key" it came from)

    def config_fields(self) -> dict[str, Any]:
        """The `ModelConfig` keyword arguments these ids set (`of_config` reads them back)."""
        extra = tuple(t for t in self.stops if t not in (self.eos, self.eot))
        return {"mask_token_id": self.mask, "pad_token_id": self.pad,
                "eos_token_id": self.eos, "bos_token_id": self.bos,
                "eot_token_id": self.eot, "stop_token_ids": extra}

    @classmethod
    def of_config(cls, config, source: str) -> "SpecialIds":
        """The ids a `ModelConfig` or `DiffusionGemmaConfig` holds (resolved when its
        checkpoint was converted), each attributed to `source`."""
        ids = {f: getattr(config, f"{f}_token_id") for f in (*_FIELDS, "eot")}
        return cls(**ids, stops=config.stop_ids,
                   sources=tuple((f, source) for f, v in ids.items() if v is not None))

    def describe(self) -> str:
        """One line: `mask=126336 (config.json:mask_token_id), ...`."""
        where = dict(self.sources)
        parts = [f"{f}={getattr(self, f)} ({where.get(f, 'not set')})"
                 for f in (*_FIELDS, "eot")]
        return ", ".join(parts) + f", stops={list(self.stops)}"


def stop_index(ids: Sequence[int], stops) -> int:
    """Where a generated answer ends: the position of the first id in `stops` (all of `ids`
    when none occurs)."""
    stops = set(stops)
    return next((j for j, t in enumerate(ids) if int(t) in stops), len(ids))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token entry of tokenizer_config / special_tokens_map (string or AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_ids(directory: Path) -> dict[str, int]:
    """Token text -> id for the added tokens and (if present) `vocab.json`'s entries, read
    from the files alone (no tokenizer is built)."""
    ids: dict[str, int] = {}
    vocab = directory / "vocab.json"
    if vocab.is_file():
        ids.update({k: int(v) for k, v in _read_json(vocab).items()})
    tok_json = directory / "tokenizer.json"
    if tok_json.is_file():
        data = _read_json(tok_json)
        model_vocab = (data.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):  # BPE / WordPiece: token -> id
            ids.update(model_vocab)
        for entry in data.get("added_tokens") or []:
            ids[entry["content"]] = int(entry["id"])
    config = _read_json(directory / "tokenizer_config.json")
    for idx, entry in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None:
            ids[text] = int(idx)
    ids.update({k: int(v) for k, v in _read_json(directory / "added_tokens.json").items()})
    return ids


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [int(v) for v in values if v is not None]
    except (TypeError, ValueError):
        raise ConfigError(f"token id {value!r}: expected an integer or a list of integers") \
            from None


def resolve_special_ids(directory: str | Path, *, family: str, vocab_size: int,
                        config: Mapping[str, Any] | None = None,
                        files: bool = True) -> SpecialIds:
    """The special ids of the checkpoint in `directory` (module docstring for the order);
    `config` is its parsed `config.json` when the caller has it; `files=False` reads nothing
    but `config` (steps 1 and 5)."""
    d = Path(directory)
    cfg = dict(config) if config is not None else _read_json(d / "config.json")
    read = _read_json if files else (lambda path: {})
    gen = read(d / "generation_config.json")
    tok_cfg = read(d / "tokenizer_config.json")
    tok_map = read(d / "special_tokens_map.json")
    names = FAMILY_TOKENS.get(family, {})
    published = _PUBLISHED.get(family)
    same_vocab = published is not None and published.vocab_size == vocab_size
    token_ids: dict[str, int] | None = None

    def lookup(text: str) -> int | None:
        nonlocal token_ids
        if token_ids is None:
            token_ids = _token_ids(d) if files else {}
        return token_ids.get(text)

    found: dict[str, int | None] = {}
    sources: dict[str, str] = {}
    stops: list[int] = []
    for field in (*_FIELDS, "eot"):
        key = f"{field}_token_id"
        candidates = [("config.json", cfg.get(key))]
        if field != "eot":
            candidates.append(("generation_config.json", gen.get(key)))
        value = None
        for file, raw in candidates:
            ids = _as_ids(raw)
            if field == "eos":
                stops += ids
            if ids and value is None:
                value, sources[field] = ids[0], f"{file}:{key}"
        if value is None and field != "eot":
            for file, table in (("tokenizer_config.json", tok_cfg),
                                ("special_tokens_map.json", tok_map)):
                text = _token_text(table.get(f"{field}_token"))
                if text is not None and lookup(text) is not None:
                    value, sources[field] = lookup(text), f"{file}:{field}_token {text!r}"
                    break
        if value is None and field in names and lookup(names[field]) is not None:
            value = lookup(names[field])
            sources[field] = f"tokenizer vocabulary: {family}'s {names[field]!r}"
        if value is None and same_vocab and getattr(published, key) is not None:
            value = getattr(published, key)
            sources[field] = f"published {family} default"
        if value is not None and not 0 <= value < vocab_size:
            raise ConfigError(f"{d}: {field} id {value} ({sources[field]}) is outside the "
                              f"vocabulary [0, {vocab_size}) of config.json")
        found[field] = value
    if found["mask"] is None and family not in NO_MASK_FAMILIES:
        raise ConfigError(
            f"{d / 'config.json'}: no mask_token_id (nor generation_config.json mask_token_id, "
            "nor a mask_token in tokenizer_config.json / special_tokens_map.json"
            + (f", nor {names['mask']!r} in the tokenizer" if "mask" in names else "")
            + "); every dLLM needs its mask id: add \"mask_token_id\": <id> to config.json")
    if family == "llada" and found["bos"] is None:
        raise ConfigError(
            f"{d / 'config.json'}: no bos_token_id (nor in generation_config.json, nor a "
            "bos_token in the tokenizer files); LLaDA prompts start with BOS: add "
            "\"bos_token_id\": <id> to config.json")
    for extra in (found["eos"], found["eot"]):
        if extra is not None:
            stops.append(extra)
    return SpecialIds(**found, stops=tuple(dict.fromkeys(stops)),
                      sources=tuple(sorted(sources.items())))


def load_hf_tokenizer(directory: str | Path):
    """transformers' fast tokenizer of a checkpoint directory (module docstring)."""
    from transformers import PreTrainedTokenizerFast

    d = Path(directory)
    where = d / "tokenizer.json"
    try:
        if where.is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(d))
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            import transformers

            where = d / "tokenizer_config.json"
            name = _read_json(where).get("tokenizer_class") or "Qwen2Tokenizer"
            name = _REMOTE_CLASSES.get(name, name)
            cls = getattr(transformers, name.removesuffix("Fast"), None)
            if cls is None:
                raise CheckpointError(f"{where}: tokenizer_class {name!r} is not a "
                                      "transformers class; add a tokenizer.json")
            return cls.from_pretrained(str(d))
    except (OSError, ValueError, TypeError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: cannot load the tokenizer "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise CheckpointError(f"{d}: no tokenizer (expected tokenizer.json, or vocab.json and "
                          "merges.txt, beside config.json)")


@dataclasses.dataclass(frozen=True, eq=False)
class CheckpointTokenizer:
    """A checkpoint's transformers tokenizer with the special ids the model uses."""

    hf: Any  # transformers PreTrainedTokenizerBase
    special: SpecialIds
    source: str  # the directory it was loaded from

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added (special tokens written in the text,
        e.g. by a chat template, are recognised)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (EOS, padding) left out unless asked for."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None) or None

    def chat_prompt(self, messages: Sequence[Mapping[str, str]], *,
                    add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role", "content"}, ...]) as text."""
        if self.chat_template is None:
            raise ConfigError(f"{self.source}: the tokenizer has no chat_template "
                              "(tokenizer_config.json or chat_template.jinja); run without "
                              "the chat template")
        return self.hf.apply_chat_template(list(messages), tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def describe(self) -> str:
        """One line for reports: class, vocabulary, chat template, special ids."""
        return (f"{type(self.hf).__name__} from {self.source} ({len(self.hf)} tokens, chat "
                f"template: {'yes' if self.chat_template else 'no'}); {self.special.describe()}")
