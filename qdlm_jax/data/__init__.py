"""Data layer: text sources and splits, the BPE tokenizer and the arithmetic task.

* :mod:`qdlm_jax.data.sources` -- local files, Hugging Face datasets, the
  offline BIG-bench Wikipedia default, deterministic document splits, token windows.
* :mod:`qdlm_jax.data.tokenizer` -- the project's byte-level BPE (mask / BOS / EOS / PAD) for
  training.
* :mod:`qdlm_jax.data.hf_tokenizer` -- a checkpoint's tokenizer as transformers loads it, its
  special ids.
* :mod:`qdlm_jax.data.llamacpp_vocab` -- real vocabularies (llama.cpp's vocab files), fetched at
  first use.
* :mod:`qdlm_jax.data.arithmetic` -- seeded addition / subtraction problems.
"""

from qdlm_jax.data.arithmetic import (
    ArithmeticProblem,
    ArithmeticSpec,
    extract_answer,
    generate_problems,
    is_heldout,
    render_answer,
    render_prompt,
    render_text,
    render_training_lines,
)
from qdlm_jax.data.sources import (
    DEFAULT_SOURCE,
    DataSourceError,
    DocumentSplit,
    SplitFractions,
    cache_dir,
    fetch_bigbench_task,
    fetch_bigbench_tasks,
    load_bigbench_wikipedia,
    load_documents,
    load_split,
    read_jsonl,
    read_text_file,
    split_documents,
    token_windows,
)
from qdlm_jax.data.tokenizer import (
    SpecialTokenIds,
    TokenizerSpec,
    load_bpe_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
    train_tokenizer_on_source,
)

__all__ = [
    "DEFAULT_SOURCE",
    "ArithmeticProblem",
    "ArithmeticSpec",
    "DataSourceError",
    "DocumentSplit",
    "SpecialTokenIds",
    "SplitFractions",
    "TokenizerSpec",
    "cache_dir",
    "extract_answer",
    "fetch_bigbench_task",
    "fetch_bigbench_tasks",
    "generate_problems",
    "is_heldout",
    "load_bigbench_wikipedia",
    "load_documents",
    "load_split",
    "load_bpe_tokenizer",
    "read_jsonl",
    "read_text_file",
    "render_answer",
    "render_prompt",
    "render_text",
    "render_training_lines",
    "save_tokenizer",
    "special_token_ids",
    "split_documents",
    "token_windows",
    "train_tokenizer",
    "train_tokenizer_on_source",
]
