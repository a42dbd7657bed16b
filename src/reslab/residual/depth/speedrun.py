from reslab.residual.depth.base import Recipe


class Speedrun(Recipe):
    """The modded-nanogpt speedrun's residual stack on pre-LN: learned residual and branch scales per sublayer
    (`scales`), the embedding re-injected into every block (`x0`), a gated long skip (`long-skip`) and value
    embeddings mixed into attention's values (`value-embed`), each at its own defaults (see `reslab list`).

    Records #9 (2024-11-06), #11 (2024-11-10), #14-15 (2024-12), #32 (2025-09-11), #45 (2025-11-18) and #55
    (2025-12-29) introduced them; `reference/residuals-2026.md` section 4 has the lines.
    """

    name = "speedrun"
    formula = "x = a x + b F(LN(x)) + c x0,  long skip s -> d through sigmoid(w),  v = v + g ve(token)"
    paper = "Jordan et al. 2024-26, modded-nanogpt (KellerJordan/modded-nanogpt @f411b3d)"
    parts = ("scales", "x0", "long-skip", "value-embed")
