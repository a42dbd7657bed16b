"""The names reslab offers, free of torch: models, residual schemes (with each scheme's formula, paper and options)
and reproductions, built in or from plug-ins. `reslab --help` and `reslab list` read them without building anything;
`reslab.models`, `reslab.residual` and `reslab.reproduce` load the classes behind a name when it is asked for.

A plug-in is an installed package that declares entry points in the groups of `GROUPS` (`reslab.schemes`:
`name = module:Class`). They are read only when a name is not built in, or when everything is listed; a plug-in
may not take a built-in name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache
from importlib import import_module
from typing import Any

from reslab.errors import ReslabError, unknown

# model name -> "module:Class"
MODELS: dict[str, str] = {
    "mlp": "reslab.models.mlp:DeepMLP",
    "tiny": "reslab.models.tiny:TinyTransformer",
    "gpt": "reslab.models.gpt:GPT",
    "llama": "reslab.models.llama:Llama",
    "deepseek": "reslab.models.deepseek:DeepSeek",
    "deepseek-v4": "reslab.models.deepseek_v4:DeepSeekV4",
}
TRANSFORMERS = ("tiny", "gpt", "llama", "deepseek", "deepseek-v4")

# scheme name -> "module:Class"; a new scheme is one file in reslab/residual/ plus one line here (its formula and
# paper are its class's attributes, read by `described` without importing torch)
SCHEMES: dict[str, str] = {
    "none": "reslab.residual.none:NoResidual",
    "post": "reslab.residual.post:PostLN",
    "post-none": "reslab.residual.post_none:PostNoResidual",
    "pre": "reslab.residual.pre:PreLN",
    "sandwich": "reslab.residual.sandwich:SandwichLN",
    "rezero": "reslab.residual.rezero:ReZero",
    "layerscale": "reslab.residual.layerscale:LayerScale",
    "deepnorm": "reslab.residual.deepnorm:DeepNorm",
    "add": "reslab.residual.add:PlainAdd",
    "article-edit": "reslab.residual.article_edit:ArticleEdit",
    "hc": "reslab.residual.hc:HyperConnections",
    "mhc": "reslab.residual.mhc:ManifoldHyperConnections",
    "attnres": "reslab.residual.attnres:AttentionResiduals",
    "value-residual": "reslab.residual.value_residual:ValueResidual",
    "laurel": "reslab.residual.laurel:Laurel",
    "olmo2": "reslab.residual.olmo2:Olmo2Norm",
    "mix-ln": "reslab.residual.mixln:MixLN",
    "completep": "reslab.residual.completep:CompleteP",
    "frac": "reslab.residual.frac:FracConnections",
    "mhc-lite": "reslab.residual.mhc_lite:MHCLite",
    "resi-dual": "reslab.residual.resi_dual:ResiDual",
    "gated-hc": "reslab.residual.gated_hc:GatedHyperConnections",
    "mhc-v4": "reslab.residual.mhc_v4:DeepSeekV4MHC",
    "altup": "reslab.residual.altup:AltUp",
    # connections across depth (reslab/residual/depth/): alone on `pre`, or composed, `pre+x0+long-skip`
    "scales": "reslab.residual.depth.scales:ResidualScales",
    "x0": "reslab.residual.depth.x0:X0Injection",
    "unet": "reslab.residual.depth.skips:UNetSkips",
    "long-skip": "reslab.residual.depth.skips:LongSkip",
    "value-embed": "reslab.residual.depth.value_embed:ValueEmbeddings",
    "backout": "reslab.residual.depth.backout:Backout",
    "denseformer": "reslab.residual.depth.denseformer:DenseFormerDWA",
    "mudd": "reslab.residual.depth.mudd:MUDD",
    "speedrun": "reslab.residual.depth.speedrun:Speedrun",
}

# scheme option -> (type, help): the model commands' flag `--<option>` for the built-in schemes' options (each a key
# of some scheme's `option_defaults`; a test keeps them equal). Any option, a plug-in's too, is also `--set NAME=VALUE`.
SCHEME_OPTIONS: dict[str, tuple[type, str]] = {
    "layerscale_init": (float, "LayerScale init (default: CaiT's rule by depth)"),
    "rezero_init": (float, "ReZero's initial alpha (default 0)"),
    "streams": (int, "parallel residual streams n of hc, mhc and mhc-lite (default 4; mhc-lite at most 6)"),
    "hc_dynamic": (bool, "hc: dynamic, input-dependent connection weights (default static)"),
    "sinkhorn_iters": (int, "mhc: Sinkhorn-Knopp iterations (default 20)"),
    "attnres_block": (int, "attnres: transformer blocks per AttnRes block (default 0 = full)"),
    "value_mix": (float, "value-residual: weight m of a layer's own values, lerp(v_1, v, m) (0.5)"),
    "value_mix_learned": (bool, "value-residual: learn m per head, starting at --value-mix"),
    "laurel_form": (str, "laurel: rw, lr, rw+lr (default) or gemma3n (Gemma 3n's block)"),
    "laurel_rank": (int, "laurel: rank r of the low-rank map W_R W_L (default 16, at most the width)"),
    "mixln_alpha": (float, "mix-ln: fraction of post-LN blocks, the first floor(alpha L) (default 0.25)"),
    "completep_alpha": (float, "completep: depth exponent, branch x (L/L_base)^-alpha (1 CompleteP, 0.5 depth-muP)"),
    "completep_base_layers": (int, "completep: L_base, the depth the hyper-parameters were tuned at (default 1)"),
    "completep_init_std": (float, "completep: std of every branch matrix at init (default 0.02)"),
    "scales_resid_init": (float, "scales: initial a in x = a x + b F(LN(x)) (default sqrt(1.1), the speedrun's)"),
    "scales_branch_init": (float, "scales: initial b (default 1)"),
    "x0_init": (float, "x0: initial weight c of the re-injected embedding, per block (default 0)"),
    "x0_gated": (bool, "x0: add a per-token gate read from the embedding's first 12 channels (zero at init)"),
    "unet_init": (float, "unet: raw init of each skip weight (default -1.5 through the sigmoid, 1 without)"),
    "unet_plain": (bool, "unet: each skip weight used as is, record #11's form (default: through a sigmoid, #32)"),
    "long_skip_from": (int, "long-skip: source block, 0-based (default 3 of 11 scaled to depth)"),
    "long_skip_to": (int, "long-skip: destination block, 0-based (default 6 of 11 scaled to depth)"),
    "long_skip_init": (float, "long-skip: raw init of the gate w, sigmoid(w) (default -1.5)"),
    "value_embed_layers": (str, "value-embed: layers with value embeddings: all (U-net banks, default) or ends"),
    "backout_from": (int, "backout: block whose output is backed out, 0-based (default the 8th of 11 scaled)"),
    "backout_init": (float, "backout: initial lambda (default 0.5)"),
    "denseformer_dilation": (int, "denseformer: dilation k, X_j enters the average after block i if j = i+1 mod k"),
    "denseformer_period": (int, "denseformer: period p, an average after every p-th block only (default 1)"),
    "mudd_streams": (str, "mudd: streams the dense connections feed: qkvr (the paper's) or r"),
    "mudd_hidden": (int, "mudd: generator hidden width (0: C L_i, x4 after the last block)"),
    "mhc_lite_perm_logit": (float, "mhc-lite: initial logit of each non-identity permutation in H_res (default -8)"),
    "gated_hc_streams": (int, "gated-hc: parallel residual streams n, at least 2 (default 4, Qwen4-Exp's hc_count)"),
    "gated_hc_rank": (int, "gated-hc: rank r of the read gate's W_down/W_up (default 0: 320/2048 of the width)"),
    "resi_dual_alpha": (float, "resi-dual: weight a of the post-LN stream in the output a x + LN(d) (default 1)"),
    "resi_dual_scale": (float, "resi-dual: scale s of the writes into the dual stream d, in (0, 1] (default 1)"),
    "mhc_v4_streams": (int, "mhc-v4: parallel residual streams n, DeepSeek-V4's hc_mult (default 4)"),
    "mhc_v4_sinkhorn_iters": (int, "mhc-v4: Sinkhorn iterations, softmax first, eps in each step (default 20)"),
    "frac_streams": (int, "frac: streams n, each split into fractions (default 1)"),
    "frac_fractions": (int, "frac: fractions m per stream, >= 2, dividing the width (default 4)"),
    "frac_dynamic": (bool, "frac: input-dependent connection weights, as the package has (default true)"),
    "frac_tanh": (bool, "frac: tanh on the dynamic terms (default true)"),
    "altup_streams": (int, "altup: streams K, the embedding and K - 1 learned projections of it (default 4)"),
    "altup_coef_clip": (float, "altup: clip of the prediction and correction coefficients in training (120; 0: none)"),
}

# reproduction name -> module (with CLAIM, add_arguments, run)
REPRODUCTIONS: dict[str, str] = {
    "deep-mlp-gradients": "reslab.reproduce.deep_mlp",
    "tiny-residual": "reslab.reproduce.tiny_residual",
    "depth": "reslab.reproduce.depth",
    "post-vs-pre": "reslab.reproduce.post_vs_pre",
    "mhc-gain": "reslab.reproduce.mhc_gain",
    "minimind-diagram": "reslab.reproduce.minimind_diagram",
    "book-figure": "reslab.reproduce.book_figure",
    "refine-not-replace": "reslab.reproduce.refine_not_replace",
    "deepseek-residuals": "reslab.reproduce.deepseek_residuals",
    "leaderboard": "reslab.reproduce.leaderboard",
    "speedrun-ladder": "reslab.reproduce.speedrun_ladder",
    "denseformer-depth": "reslab.reproduce.denseformer_depth",
    "mix-ln": "reslab.reproduce.mix_ln",
    "depth-transfer": "reslab.reproduce.depth_transfer",
}

# kind -> (entry-point group, the built-in table). A reproduction plug-in names a module (`name = package.module`).
GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "model": ("reslab.models", MODELS),
    "residual scheme": ("reslab.schemes", SCHEMES),
    "reproduction": ("reslab.reproductions", REPRODUCTIONS),
}


@cache
def plugins(kind: str) -> dict[str, str]:
    """The installed plug-ins of `kind`: name -> "module:attr" (or "module"). One line, exit 2, for a plug-in that
    takes a built-in name."""
    from importlib.metadata import entry_points

    group, builtin = GROUPS[kind]
    found: dict[str, str] = {}
    for point in entry_points(group=group):
        if point.name in builtin:
            raise ReslabError(f"plug-in {point.value!r} (entry point {group}) registers {kind} {point.name!r}, "
                              "a built-in name; rename it in the plug-in's entry points")
        found[point.name] = point.value
    return found


def names(kind: str) -> list[str]:
    """Every name of `kind`: the built-in ones, then the plug-ins'."""
    return [*GROUPS[kind][1], *plugins(kind)]


def load(kind: str, name: str) -> Any:
    """The class (or module) registered under `name`, built in or a plug-in's; one ReslabError line for an unknown
    name or a plug-in that fails to load."""
    builtin = GROUPS[kind][1]
    if name in builtin:
        return _resolve(builtin[name])
    target = plugins(kind).get(name)
    if target is None:
        raise unknown(kind, name, names(kind))
    try:
        return _resolve(target)
    except Exception as error:  # noqa: BLE001 (a plug-in's own bug: name it, not as reslab's traceback)
        message = " ".join(str(error).split()) or type(error).__name__
        raise ReslabError(f"plug-in {kind} {name!r} ({target}) failed to load: {message}") from None


def described(kind: str, name: str) -> tuple[str, str]:
    """(formula, paper) of a scheme: read from its class's source when built in (`reslab list` imports no torch),
    else from the loaded plug-in class; "?" where it states none."""
    target = GROUPS[kind][1].get(name)
    found = _class_strings(target, ("formula", "paper")) if target else {}
    if "formula" not in found:
        scheme = load(kind, name)
        found = {key: getattr(scheme, key, "") for key in ("formula", "paper")}
    return found.get("formula") or "?", found.get("paper") or ""


def _class_strings(target: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The string constants a built-in class assigns to `keys` in its body, from its source file."""
    import ast
    from pathlib import Path

    module, _, cls = target.partition(":")
    path = Path(__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {stmt.targets[0].id: stmt.value.value for stmt in node.body
                    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id in keys and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)}
    return {}


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    loaded = import_module(module)
    for part in filter(None, attr.split(".")):
        loaded = getattr(loaded, part)
    return loaded


def lazy_names(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for a package whose public names load on first use (PEP 562): `names` maps each name
    to the module that defines it (absolute, or relative to `package` with a leading dot), so that importing the
    package, and `reslab CMD --help` with it, imports no torch. A name must not also be a submodule's: once that
    submodule is imported, the import system's attribute would hide the lazy name (`reslab.lens` is both on
    purpose: that package is callable as the function, `lens/__init__.py`)."""

    def attribute(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(names[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def listing() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return attribute, listing
