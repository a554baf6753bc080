"""Independent reference: transformers' Llama (for LLaDA) and Qwen2 (for Dream) models,
loaded from the same checkpoint files and run with bidirectional attention. The code is the
parity recipe's (`converters/parity.py`), which names the hub tensors without our key maps."""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "converters" / "parity.py"
_spec = importlib.util.spec_from_file_location("qdlm_converters_parity", _PATH)
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

reference_model = parity.reference_model
reference_logits = parity.reference_logits
