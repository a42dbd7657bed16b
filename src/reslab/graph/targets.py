"""What a command's TARGET names, worked out once (`resolve_target`), and the model it builds or loads.

TARGET is one of (`Kind`)
- a built-in model name (`gpt`, `llama`, ...), configured by the model flags of `reslab train`;
- a run directory: its `config.json` names the model and its config;
- a Hugging Face folder (`save_pretrained`: config.json with a `model_type` + *.safetensors) of a family reslab's
  interop adapters convert (`reslab.interop.supported_types`), read as the reslab model computing the same;
- `hf:MODEL_TYPE`: a Hugging Face transformers model built from `AutoConfig.for_model(MODEL_TYPE, ...)` with
  small defaults (2 layers, width 64) that `--set key=value` overrides;
- `FILE.py:CALLABLE` or `package.module:CALLABLE`: a function returning `(model, example_inputs)`.

`reslab audit` and `reslab diagram` take every kind; `info`, `lens`, `sample` and `export` a few (`INFO`, `LENS`,
`WEIGHTED`). `load_target` turns one into (model, example inputs) for the audit; `load_trained` loads a run's or a
folder's weights and tokenizer.

Built-in, run-directory, folder and hf: models are built on the meta device by default: no weight is allocated, so the
size of the configuration does not matter. Models whose forward reads tensor values need `device="cpu"`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from reslab.errors import ReslabError
from reslab.interop.base import quiet_transformers
from reslab.io import parse_json, read_json_file

TOKENS = 8  # length of the example token sequence
DEVICES = ("meta", "cpu")
CPU_RETRY_PARAMS = 50_000_000  # an hf: model that must run on CPU is built at its --set size up to this many

# Small configurations per transformers model type, in each config's own field names; `--set` overrides them.
HF_SMALL: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 128},
    "llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64},
    "qwen3": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64},
    "mistral": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64},
    "bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "vocab_size": 128, "max_position_embeddings": 64},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
           "vocab_size": 128},
    "vit": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
            "image_size": 32, "patch_size": 8},
    # Qwen4-Exp (configuration_qwen4_exp.py, Qwen4ExpTextConfig): every 4th layer is `indexed_attention`, so 4 layers
    # to have one; its QSA indexer needs all five indexer_* fields, one key head, a head at least head_dim wide
    # (the rotary part must fit) and a budget divisible by the compress ratio (validate_architecture).
    "qwen4_exp_text": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64, "num_experts": 4,
                       "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                       "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                       "linear_value_head_dim": 16, "hc_lowrank": 8, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                       "indexer_head_dim": 16, "indexer_budget": 4, "indexer_compress_ratio": 2},
    # Gemma 3n (configuration_gemma3n.py, Gemma3nTextConfig): the last num_kv_shared_layers (15) layers reuse the KV
    # of an earlier layer of their type (kv_sharing_modes), which 2 layers do not have: no sharing. Both attention
    # types, and the per-layer-input embedding (262144 x 256 per layer by default) made small.
    "gemma3n_text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 16, "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64,
                     "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 0,
                     "laurel_rank": 4, "altup_num_inputs": 2, "layer_types": ["sliding_attention", "full_attention"],
                     "sliding_window": 16},
}
HF_GENERIC = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "vocab_size": 128}
# Fields set only on configs that have them: as many key-value heads as heads (HF_GENERIC has 4), a few small
# experts with the mixture from layer 1 on, no layer reusing another's KV cache (2 layers have none to share).
HF_SMALL_OPTIONAL = {"rotary_dim": 8, "num_key_value_heads": 4, "num_experts": 4, "num_local_experts": 4,
                     "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "shared_expert_intermediate_size": 64, "first_k_dense_replace": 1, "n_group": 1,
                     "topk_group": 1, "num_kv_shared_layers": 0}


@dataclass
class Target:
    label: str  # how the target is named in reports
    model: nn.Module
    inputs: Any  # a tuple of positional arguments or a dict of keyword arguments


def parse_value(text: str) -> Any:
    """`--set` values: JSON (4, 1e-5, true, null, [1, 2]), Python's True/False/None, else the string itself."""
    value = parse_json(text, f"--set value {text[:40]!r}", "give a shallower value", allow_nan=True, invalid=_TEXT)
    return {"True": True, "False": False, "None": None}.get(text, text) if value is _TEXT else value


_TEXT = object()  # a --set value that is not JSON: the text itself


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ReslabError(f"--set takes KEY=VALUE, got {item!r}")
        values[key.strip()] = parse_value(value.strip())
    return values


class Kind(Enum):
    """The kinds of TARGET, each valued by how a message names it."""

    BUILTIN = "a model name"  # built in or a plug-in's (entry-point group reslab.models)
    RUN = "a run directory"
    HF_FOLDER = "a Hugging Face folder (save_pretrained)"
    HF_TYPE = "hf:MODEL_TYPE"
    CALLABLE = "FILE.py:CALLABLE"


WEIGHTED = (Kind.RUN, Kind.HF_FOLDER)  # what holds trained weights: `sample`, `load_trained`
LENS = (Kind.BUILTIN, *WEIGHTED)
INFO = LENS


@dataclass(frozen=True)
class TargetSpec:
    """What TARGET names, worked out once by `resolve_target`; every command then branches on `kind` alone."""

    kind: Kind
    text: str  # as the user gave it
    path: Path | None = None  # a run directory or a Hugging Face folder
    model_type: str | None = None  # a Hugging Face folder's or hf:'s `model_type`

    def __str__(self) -> str:
        return self.text


def resolve_target(text: str, accepts: tuple[Kind, ...] = tuple(Kind), unknown: str | None = None) -> TargetSpec:
    """The kind of TARGET `text` names, one of `accepts`; a ReslabError naming the forms accepted otherwise
    (`unknown`, if given, is the message for a text that names nothing)."""
    target = _resolve(text, accepts, unknown)
    if target.kind not in accepts:
        raise ReslabError(f"{text} is {target.kind.value}; give {_forms(accepts)}")
    return target


def _forms(accepts: tuple[Kind, ...]) -> str:
    from reslab.models import list_models

    names = [f"{kind.value} ({', '.join(list_models())})" if kind is Kind.BUILTIN else kind.value for kind in accepts]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _resolve(text: str, accepts: tuple[Kind, ...], unknown: str | None) -> TargetSpec:
    from reslab.models import MODELS, list_models

    if text.startswith("hf:"):
        return TargetSpec(Kind.HF_TYPE, text, model_type=text[3:])
    if Path(text).is_dir():
        return _directory(Path(text))
    if ":" in text:
        return TargetSpec(Kind.CALLABLE, text)
    if text in MODELS or text in list_models():  # a built-in name never reads the plug-ins
        return TargetSpec(Kind.BUILTIN, text)
    raise ReslabError(unknown or f"unknown target {text!r}; give {_forms(accepts)}")


def _directory(path: Path) -> TargetSpec:
    """A run directory (its marker, or a config.json naming a reslab model) or a Hugging Face folder of a supported
    family (a config.json with a `model_type`); anything else is one line saying what was expected."""
    from reslab.interop import supported_types, unsupported_type
    from reslab.rundir import CONFIG, MARKER

    if (path / MARKER).is_file():
        return TargetSpec(Kind.RUN, str(path), path)
    try:
        config = read_json_file(path / CONFIG, "")
    except ReslabError:
        config = None
    if isinstance(config, dict) and "model" in config and "model_config" in config:
        return TargetSpec(Kind.RUN, str(path), path)  # written before the marker existed
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(model_type, str):
        if model_type not in supported_types():
            raise ReslabError(f"{path}: {unsupported_type(model_type)}")
        return TargetSpec(Kind.HF_FOLDER, str(path), path, model_type)
    why = f"has no {CONFIG}" if not (path / CONFIG).exists() else f"has a {CONFIG} that names no model nor model_type"
    raise ReslabError(f"{path} {why}: it is not a reslab run directory ({MARKER}, {CONFIG}) nor a Hugging Face "
                      f"folder ({CONFIG} with a model_type, *.safetensors); give one of them")


def saved_config(target: TargetSpec) -> tuple[str, dict[str, Any]]:
    """(reslab model name, config fields) of a run directory or Hugging Face folder, read without its weights."""
    if target.kind is Kind.RUN:
        return run_config(target.path)
    from reslab.interop import config_from_hf, read_hf_config

    with quiet_transformers():
        return config_from_hf(read_hf_config(target.path))


def build_saved(target: TargetSpec) -> nn.Module:
    """The model a run directory or Hugging Face folder describes, built on the meta device: its structure and size,
    no weight read or allocated."""
    from reslab.models import build_model

    name, config = saved_config(target)
    with torch.device("meta"):
        return build_model(name, **config).eval()


@dataclass
class Trained:
    """A model with its trained weights (eval mode, on the device asked for) and the tokenizer it reads."""

    target: TargetSpec
    model: nn.Module
    tokenizer: Any  # a reslab.data.Tokenizer
    config: dict[str, Any] | None = None  # a run's config.json (its data); None for a Hugging Face folder

    def describe(self) -> str:
        """What model, in words (a run's training step is read from its checkpoint only here)."""
        if self.target.kind is Kind.HF_FOLDER:
            return f"Hugging Face folder {self.target.path} ({self.target.model_type}, {self.tokenizer.kind} tokenizer)"
        from reslab.rundir import CHECKPOINT
        from reslab.train.checkpoint import checkpoint_step

        step = checkpoint_step(self.target.path / CHECKPOINT)
        return f"run {self.target.path} ({self.config['model']}, {self.model.config.residual}, trained {step} steps)"


def load_trained(target: TargetSpec, device: str | torch.device = "cpu") -> Trained:
    """The weights and tokenizer of a run directory or a Hugging Face folder (whose tokenizer is its
    tokenizer.json, else token ids written as numbers)."""
    from reslab.data import load_tokenizer
    from reslab.interop import folder_tokenizer, load_hf_checkpoint
    from reslab.train.checkpoint import load_run_model

    if target.kind is Kind.RUN:
        model, config = load_run_model(target.path, device)
        return Trained(target, model, load_tokenizer(target.path), config)
    if target.kind is not Kind.HF_FOLDER:
        raise ReslabError(f"{target} is {target.kind.value}, which holds no trained weights; give {_forms(WEIGHTED)}")
    with quiet_transformers():
        model = load_hf_checkpoint(target.path)
    return Trained(target, model.to(device).eval(), folder_tokenizer(target.path, model.config.vocab_size))


def load_target(spec: str | TargetSpec, overrides: dict[str, Any] | None = None, device: str = "meta") -> Target:
    """Build the model TARGET names, with config `overrides` (model flags or `--set`), and its example inputs."""
    if device not in DEVICES:
        raise ReslabError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    overrides = overrides or {}
    target = spec if isinstance(spec, TargetSpec) else resolve_target(spec)
    label = target.text + (" (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")" if overrides else "")
    if target.kind is Kind.BUILTIN:
        return Target(label, *_builtin(target.text, overrides, device))
    if target.kind in WEIGHTED:
        name, config = saved_config(target)
        return Target(label, *_builtin(name, {**config, **overrides}, device))
    if target.kind is Kind.HF_TYPE:
        model_type = target.model_type
        return Target(label, *_unsupported_as_one_line(model_type, lambda: _huggingface(model_type, overrides, device)))
    if overrides:
        raise ReslabError(f"{target.text} builds its own model; --set and model flags do not apply to it")
    return Target(target.text, *_callable_target(target.text))


def _builtin(name: str, overrides: dict[str, Any], device: str) -> tuple[nn.Module, tuple]:
    """A built-in model; one whose forward reads tensor values (MoE routing) is built again on CPU, with a note,
    as hf: models are, when it is small enough to."""
    model, inputs = _build_builtin(name, overrides, device)
    if device == "meta" and _fits_on_cpu(model) and not _runs(model, inputs):
        _note_cpu(name, "with random weights")
        model, inputs = _build_builtin(name, overrides, "cpu")
    return model, inputs


def _build_builtin(name: str, overrides: dict[str, Any], device: str) -> tuple[nn.Module, tuple]:
    from reslab.models import build_model

    with torch.device(device):
        model = build_model(name, **overrides)
    model.eval()
    return model, example_inputs(model, device)


def example_inputs(model: nn.Module, device: str) -> tuple:
    """A batch of one for a reslab model: 8 tokens (or the context, if shorter), or one input vector."""
    config = getattr(model, "config", None)
    if hasattr(config, "layer_sizes"):
        return (torch.zeros(1, config.layer_sizes[0], device=device),)
    if hasattr(config, "vocab_size"):
        return (torch.zeros(1, min(TOKENS, getattr(config, "context", TOKENS)), dtype=torch.long, device=device),)
    raise ReslabError(f"cannot make example inputs for {type(model).__name__}; audit it as FILE.py:CALLABLE")


def run_config(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(model name, config fields) of a run directory, read from its config.json."""
    from reslab.rundir import RunDir

    config = RunDir(run_dir).read_config(required=("model", "model_config"))  # the one reader of config.json
    return config["model"], dict(config["model_config"])


def _unsupported_as_one_line(model_type: str, build):
    """A model type whose config or inputs this builder does not know (composite configs like CLIP's, audio models)
    is one error line naming it, never a traceback."""
    try:
        import transformers  # noqa: F401 - only whether it is installed
    except ImportError:
        raise ReslabError("hf: targets need transformers; pip install 'reslab[hf]'") from None
    try:
        with quiet_transformers():  # small vocabularies make configs and models warn about their token ids
            return build()
    except ReslabError:
        raise
    except Exception as error:  # noqa: BLE001 - anything transformers raises while building a model we do not know
        raise ReslabError(f"cannot build hf:{model_type} from a small config ({type(error).__name__}: "
                          f"{_reason(error)[:200]}); audit it as FILE.py:CALLABLE returning (model, inputs)") from None


def _huggingface(model_type: str, overrides: dict[str, Any], device: str) -> tuple[nn.Module, dict]:
    """The model class a user would load for MODEL_TYPE (with its LM or classification head where it has one),
    built from a small config. On meta, a forward that reads tensor values (an MoE router's `nonzero`, `.item()`,
    grouped matmuls) cannot run: such a model is built again on CPU, where its small size costs little."""
    config = _hf_config(model_type, overrides)
    model = _hf_build(model_type, config, device)
    inputs = _hf_inputs(model, config, device)
    if device == "meta" and not _runs(model, inputs):
        if not _fits_on_cpu(model) and overrides:
            config = _hf_config(model_type, {})  # too large to build for real: fall back to the small defaults
            note = "at its small default size, without --set"
        else:
            note = "with random weights"
        _note_cpu(f"hf:{model_type}", note)
        for part in (config, config.get_text_config()):  # on CPU, without a KV cache (a composite's text model
            if getattr(part, "use_cache", None):  # reads its own): a hybrid whose few layers are all recurrent
                part.use_cache = False  # has no attention layer to tell a cache's length
        model = _hf_build(model_type, config, "cpu")
        inputs = _hf_inputs(model, config, "cpu")
    return model, inputs


def _hf_config(model_type: str, overrides: dict[str, Any]):
    """MODEL_TYPE's config with the small values and `overrides`. A composite config (a vision-language or
    multimodal one) gets them in its text sub-config, which its causal LM builds from: on the outer config they
    would be kept as attributes nobody reads, and the default full-size text model built."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise ReslabError("hf: targets need transformers; pip install 'reslab[hf]'") from None
    if model_type not in CONFIG_MAPPING:
        raise ReslabError(f"unknown transformers model type {model_type!r}; e.g. {', '.join(HF_SMALL)} "
                          "(any key of transformers' CONFIG_MAPPING)")
    defaults = CONFIG_MAPPING[model_type]()
    text, key = _text_part(defaults)
    unknown = sorted(name for name in overrides if not hasattr(defaults, name) and not hasattr(text, name))
    if unknown:  # transformers would keep a typo as an attribute nobody reads
        raise ReslabError(f"--set {unknown[0]}: hf:{model_type}'s config has no field {unknown[0]!r}; check the name "
                          f"in transformers' {type(defaults).__name__}")
    optional = {name: value for name, value in HF_SMALL_OPTIONAL.items() if getattr(text, name, None) is not None}
    small = {**optional, **HF_SMALL.get(model_type, HF_SMALL.get(text.model_type, HF_GENERIC))}
    if key is None:
        values = {**small, **overrides}
    else:  # an override the text config has goes into it; the outer config's own fields stay outside
        inner = {name: value for name, value in overrides.items() if hasattr(text, name)}
        values = {name: value for name, value in overrides.items() if name not in inner}
        given = values.get(key)
        values[key] = {**small, **(given if isinstance(given, dict) else {}), **inner}
    with quiet_transformers():
        try:
            return AutoConfig.for_model(model_type, **values)
        except Exception as error:  # transformers validates configs with several exception types
            raise ReslabError(f"cannot build hf:{model_type} from its config: {_reason(error)[:300]}") from None


def _text_part(config) -> tuple[Any, str | None]:
    """(text config, the outer config's field holding it) of a composite config; (config, None) otherwise."""
    text = config.get_text_config()
    if text is config:
        return config, None
    key = next((name for name in getattr(config, "sub_configs", {}) if getattr(config, name, None) is text), None)
    return (text, key) if key else (config, None)


def _hf_build(model_type: str, config, device: str) -> nn.Module:
    import transformers

    with quiet_transformers(), torch.device(device):
        try:
            model = _hf_auto_class(model_type, config).from_config(config)
        except Exception:  # a head class this config cannot pick (DeiT has two): the bare model, else the error
            try:
                model = transformers.AutoModel.from_config(config)
            except Exception as error:
                raise ReslabError(f"cannot build hf:{model_type} from its config: {_reason(error)}") from None
    return model.eval()


def _hf_auto_class(model_type: str, config):
    """Sequence-to-sequence LM for encoder-decoders, masked LM for encoders, causal LM for decoders, image
    classification for vision models; the bare model class for anything else."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    choices = [("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
               ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
               ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification")]
    if getattr(config, "is_encoder_decoder", False):
        choices.insert(0, ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"))
    elif getattr(config, "is_decoder", False):
        choices.reverse()
    for mapping, auto_class in choices:
        if model_type in getattr(auto, mapping, {}):
            return getattr(transformers, auto_class)
    return transformers.AutoModel


def _runs(model: nn.Module, inputs: Any) -> bool:
    """Does the forward run on meta? (It costs no memory there.)"""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    except Exception:
        return False
    return True


def _fits_on_cpu(model: nn.Module) -> bool:
    """Is a model small enough to be built again on CPU when its forward cannot run on meta?"""
    return sum(p.numel() for p in model.parameters()) <= CPU_RETRY_PARAMS


def _note_cpu(label: str, how: str) -> None:
    print(f"note: {label} reads tensor values in its forward, which the meta device cannot; traced on cpu {how}",
          file=sys.stderr)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1].strip() if text else type(error).__name__


def _hf_inputs(model: nn.Module, config, device: str) -> dict[str, torch.Tensor]:
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        inputs = {"input_ids": torch.zeros(1, TOKENS, dtype=torch.long, device=device)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.zeros(1, TOKENS, dtype=torch.long, device=device)
        return inputs
    if main == "pixel_values":
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        return {"pixel_values": torch.zeros(1, config.num_channels, *size, device=device)}
    raise ReslabError(f"cannot make example inputs {main!r} for {type(model).__name__}; audit it as FILE.py:CALLABLE")


def _user_code(spec: str, doing: str, run):
    """Run the user's file or function; what it raises (a SyntaxError, a missing argument) is one error line."""
    try:
        return run()
    except (Exception, SystemExit) as error:  # noqa: BLE001 - what the user's code raises (or exits with) is reported
        where = f" (line {error.lineno})" if isinstance(error, SyntaxError) and error.lineno else ""
        message = str(error).splitlines()[0] if str(error) else ""
        raise ReslabError(f"{doing} {spec} failed: {type(error).__name__}{where}: {message}; it must define a "
                          "function taking no arguments that returns (model, example_inputs)") from None


def _callable_target(spec: str) -> tuple[nn.Module, Any]:
    """What the callable returns. A model it builds on meta whose forward cannot run there (a grouped matmul that
    wants bf16, routing that reads values) is built again on CPU, as built-in and hf: models are: the callable
    runs again with every tensor it puts on meta put on the CPU, and a note says so."""
    model, inputs = _callable(spec)
    if any(p.is_meta for p in model.parameters()) and _fits_on_cpu(model) and not _runs(model, inputs):
        _note_cpu(spec, "with random weights (its callable run again, meta read as cpu)")
        with _MetaAsCpu():
            model, inputs = _callable(spec)
    return model, inputs


class _MetaAsCpu(TorchFunctionMode):
    """Every tensor made or moved onto the meta device (`torch.device("meta")`, `device="meta"`, `.to("meta")`)
    is made or moved onto the CPU instead. A `with torch.device("meta")` inside enters after this mode, so it hands
    its device to this one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args = tuple(_cpu_for_meta(value) for value in args)
        kwargs = {key: _cpu_for_meta(value) for key, value in (kwargs or {}).items()}
        return func(*args, **kwargs)


def _cpu_for_meta(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    if isinstance(value, str) and value.partition(":")[0] == "meta":
        return "cpu"
    return value


def _callable(spec: str) -> tuple[nn.Module, Any]:
    source, _, name = spec.rpartition(":")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ReslabError(f"no file {source}")
        module_spec = importlib.util.spec_from_file_location(f"reslab_target_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses and pickling look the module up by name
        _user_code(spec, "running", lambda: module_spec.loader.exec_module(module))
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise ReslabError(f"cannot import {source!r}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ReslabError(f"{source} has no callable {name!r}")
    result = _user_code(spec, "calling", function)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ReslabError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if not isinstance(inputs, (tuple, list, dict, torch.Tensor)):
        raise ReslabError(f"{spec}: example_inputs must be a tuple of arguments or a dict of keyword arguments")
    return model, inputs

