"""The adapter contract: what one model family declares so that the generic interop code can convert it.

An adapter is data plus three small methods. The generic code (`convert.py`, `checkpoint.py`) looks the adapter up
and follows its tables; it never asks which family it is converting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reslab.errors import ReslabError

HF_INSTALL_HINT = 'install it with: pip install "reslab[hf]"'


@dataclass(frozen=True)
class Weight:
    """One reslab tensor and the HF tensor(s) it is made of, names relative to a block (or to the model).

    Several HF parts are stacked along dim 0 into one reslab tensor (q|k|v into `qkv`, gate|up into `gate_up`);
    `sizes(config)` gives their rows to split them again on export. `transpose`: HF stores the matrix as
    (in, out), as GPT-2's Conv1D does. `bias_of`: on export, a reslab model without this bias gets zeros with as
    many rows as that weight has, for HF families whose layers always carry a bias.
    """

    reslab: str
    hf: tuple[str, ...]
    transpose: bool = False
    sizes: Callable[[Any], list[int]] | None = None
    bias_of: str | None = None

    def prefixed(self, ours: str, theirs: str) -> Weight:
        bias_of = ours + self.bias_of if self.bias_of else None
        return dataclasses.replace(self, reslab=ours + self.reslab, hf=tuple(theirs + n for n in self.hf),
                                   bias_of=bias_of)


def weight(reslab: str, *hf: str, **options: Any) -> Weight:
    """`Weight` with the HF parts as positional arguments: weight("attn.out.weight", "self_attn.o_proj.weight")."""
    return Weight(reslab, hf, **options)


@dataclass(frozen=True)
class Refusal:
    """An HF config field whose every value but `supported` makes the model compute something reslab does not.

    A config that lacks the field counts as supported (HF's default is the plain architecture).
    """

    field: str
    supported: Any
    fix: str


class HFAdapter:
    """One model family's bridge between a reslab model and its Hugging Face counterpart.

    Declare: `reslab_model` (the name `build_model` knows), `hf_types` (the HF `model_type`s it reads),
    `hf_prefix` (what *ForCausalLM puts before the base model's weights), `hf_layer` (one block's HF prefix,
    with `{i}`), `ignored_suffixes` (HF buffers that carry no weights), `refused` (fields refused in one line).
    Implement: `overrides` (HF config -> reslab config fields), `hf_config` (reslab config -> HF config) and the
    weight tables `outer_weights` / `block_weights`. The LM head (`lm_head.weight` <-> `head.weight`, or the
    tied embedding) and the one-stream residual check are generic.
    """

    reslab_model: ClassVar[str]
    hf_types: ClassVar[tuple[str, ...]]
    hf_prefix: ClassVar[str]
    hf_layer: ClassVar[str]
    hf_head: ClassVar[str] = "lm_head.weight"
    residual: ClassVar[str] = "pre"  # the only residual scheme HF's implementation computes
    ignored_suffixes: ClassVar[tuple[str, ...]] = ()
    refused: ClassVar[tuple[Refusal, ...]] = ()

    def overrides(self, hf_config: Any) -> dict[str, Any]:
        """reslab config fields computing what `hf_config`'s model computes; `refuse(...)` what reslab cannot."""
        raise NotImplementedError

    def hf_config(self, config: Any, transformers: Any) -> Any:
        """The `transformers` config of a model built from reslab `config` (`transformers`: the module)."""
        raise NotImplementedError

    def outer_weights(self, config: Any) -> tuple[Weight, ...]:
        """Weights outside the blocks (embeddings, final norm), HF names without `hf_prefix`; not the LM head."""
        raise NotImplementedError

    def block_weights(self, config: Any) -> tuple[Weight, ...]:
        """The weights of one block, names relative to `blocks.{i}.` and `hf_layer`."""
        raise NotImplementedError

    def module_layout(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """HF tensors as a checkpoint file may store them -> as the HF modules hold them (the names the tables
        use). The identity, unless a family's files differ from its modules (per-expert files, stacked experts)."""
        return tensors

    def layer_weights(self, config: Any, layer: int) -> tuple[Weight, ...]:
        """The weights of block `layer`: `block_weights` for every block, unless a family's blocks differ (dense
        and MoE blocks in DeepSeek-V3)."""
        return self.block_weights(config)

    def weight_table(self, config: Any) -> list[Weight]:
        """Every weight but the LM head, blocks expanded, HF names without `hf_prefix`."""
        table = list(self.outer_weights(config))
        for i in range(config.layers):
            table += [w.prefixed(f"blocks.{i}.", self.hf_layer.format(i=i)) for w in self.layer_weights(config, i)]
        return table


def refuse(problem: str, fix: str) -> ReslabError:
    """The one-line error for a feature reslab does not implement: the problem; the fix."""
    return ReslabError(f"{problem}; {fix}")


def check_refusals(adapter: HFAdapter, hf_config: Any) -> None:
    """Raise for the first of the adapter's refused fields that `hf_config` sets to an unsupported value."""
    for refusal in adapter.refused:
        value = getattr(hf_config, refusal.field, refusal.supported)
        if value != refusal.supported:
            raise refuse(f"{hf_config.model_type} {refusal.field}={value!r} is not supported", refusal.fix)


def require_transformers(purpose: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ReslabError(f"{purpose} needs the transformers package; {HF_INSTALL_HINT}") from None
    return transformers


@contextmanager
def quiet_transformers() -> Iterator[Any]:
    """`transformers` (yielded) with its warnings and progress bars off: small vocabularies make configs warn about
    their token ids, and `save_pretrained` draws a bar, neither of which a reslab command's output wants."""
    transformers = require_transformers("reading a Hugging Face model")
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
