"""Hugging Face interop: reslab models from `transformers` models or local HF checkpoints, and back.

Why this exists: reslab's GPT-2 and Llama-family models are only a trustworthy lab if they compute what the
reference implementations compute. Loading real weights proves it (the tests compare logits with `transformers`),
and it lets users study the residual stream of published checkpoints with reslab's probes.

Supported: GPT-2 (`gpt2`) as reslab's `gpt`; Llama (`llama`), Mistral without a sliding window (`mistral`),
Qwen3 (`qwen3`, with QK-norm), Mixtral (`mixtral`) and Qwen3-MoE (`qwen3_moe`) as reslab's `llama` (the last two
with `moe_experts`); DeepSeek-V3 (`deepseek_v3`) as reslab's `deepseek`. Anything the reslab model would compute
differently (biases it lacks, RoPE scaling, sliding windows, another activation) is refused with a ReslabError
instead of being loaded into a model that silently disagrees with the original.

Checkpoints are read from safetensors only (never pickle), from a local directory only (never the network).
`transformers` is imported lazily, only where a config has to be parsed or built.

Layout, and the rule: one adapter per model family (`gpt2.py`, `llama.py`, `deepseek.py`) holds everything that
family knows:
its HF model types, config mapping both ways, refused fields and weight-name tables. The contract is `base.py`,
the registry `registry.py`. The generic code (`convert.py`: configs and state dicts; `checkpoint.py`: directories
and safetensors) never branches on a model or family name; if it seems to need to, the adapter contract lacks
a field. To add a family:
  1. write `<family>.py` with a subclass of `base.HFAdapter`: `reslab_model`, `hf_types`, `hf_prefix`,
     `hf_layer`, `refused`, `overrides` (HF config -> reslab fields, `refuse(...)` what reslab cannot compute),
     `hf_config` (reslab config -> HF config) and the tables `outer_weights` / `block_weights`;
  2. add one line for it to `registry.ADAPTERS`;
  3. add its tiny configs to the round-trip test in tests/test_interop_adapters.py.
"""

from reslab.interop.base import HF_INSTALL_HINT, HFAdapter, Refusal, Weight, quiet_transformers, require_transformers
from reslab.interop.checkpoint import (
    HF_TOKENIZER,
    folder_tokenizer,
    load_hf_checkpoint,
    read_hf_config,
    safetensors_files,
)
from reslab.interop.convert import (
    config_from_hf,
    convert_state_dict,
    from_hf,
    load_state_strict,
    to_hf_config,
    to_hf_state_dict,
)
from reslab.interop.registry import ADAPTERS, supported_types, unsupported_type

__all__ = [
    "ADAPTERS", "HF_INSTALL_HINT", "HF_TOKENIZER", "HFAdapter", "Refusal", "Weight", "config_from_hf",
    "convert_state_dict", "folder_tokenizer", "from_hf", "load_hf_checkpoint", "load_state_strict",
    "quiet_transformers", "read_hf_config", "require_transformers", "safetensors_files", "supported_types",
    "to_hf_config", "to_hf_state_dict", "unsupported_type",
]
