"""Model configuration read from a checkpoint: the diffusers Wan2.1 transformer config inferred from
tensor shapes, and the check that the transformer is the I2V model FantasyPortrait needs."""

from __future__ import annotations

from fantasyportrait_core.weights.files import CheckpointError


def infer_transformer_config(shapes: dict[str, tuple], num_heads: int | None = None) -> dict:
    """Wan2.1 I2V diffusers config from diffusers-named tensor shapes.

    Head count is not visible in the weights: ``num_heads`` or ``dim // 128`` (every released
    Wan2.1 model uses head_dim 128).
    """
    from fantasyportrait_core.model.build import WAN21_I2V_14B

    pe = shapes["patch_embedding.weight"]
    dim, in_ch = pe[0], pe[1]
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    heads = num_heads or max(dim // 128, 1)
    cfg = dict(WAN21_I2V_14B)
    cfg.update(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=in_ch,
        out_channels=shapes["proj_out.weight"][0] // (pe[2] * pe[3] * pe[4]), patch_size=tuple(pe[2:]),
        text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        freq_dim=shapes["condition_embedder.time_embedder.linear_1.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.net.0.proj.weight"][0], num_layers=num_layers,
    )
    if "condition_embedder.image_embedder.norm1.weight" in shapes:
        cfg.update(image_dim=shapes["condition_embedder.image_embedder.norm1.weight"][0], added_kv_proj_dim=dim)
    else:
        cfg.update(image_dim=None, added_kv_proj_dim=None)
    cfg["cross_attn_norm"] = "blocks.0.norm2.weight" in shapes
    return cfg


def check_i2v(where, fmt: str, config: dict):
    """A T2V (or other) Wan transformer instead of I2V is named as such.

    Raises:
        CheckpointError: without the CLIP image branch or with other than 36 input / 16 output channels.
    """
    if transformer_family(config) == WAN22_I2V_EXPERT:
        raise CheckpointError(f"{where} [{fmt}]: this is one Wan2.2-I2V-A14B expert (no CLIP image branch), not Wan2.1-I2V: "
                              f"give both experts (high-noise as the transformer, low-noise as the second transformer; "
                              f"experimental) or a Wan2.1-I2V-14B file")
    if config["image_dim"] is None or config["in_channels"] != 36 or config["out_channels"] != 16:
        raise CheckpointError(f"{where} [{fmt}]: a Wan transformer with {config['in_channels']} input channels and "
                              f"{'no' if config['image_dim'] is None else 'an'} image branch is not Wan2.1-I2V (36 input "
                              f"channels, CLIP image branch); FantasyPortrait needs Wan2.1-I2V-14B 480P or 720P")




# Which Wan transformer a checkpoint holds, from its inferred config (one name per family; the
# messages below and the loaders use these).
WAN21_I2V = "Wan2.1-I2V"
WAN22_I2V_EXPERT = "Wan2.2-I2V-A14B expert"


def transformer_family(config: dict) -> str:
    """``WAN21_I2V`` (36 input channels, CLIP image branch), ``WAN22_I2V_EXPERT`` (36 input channels, no
    image branch: one of the two Wan2.2-I2V-A14B experts, Wan-Video/Wan2.2 ``wan_i2v_A14B.py``) or a
    description of anything else (T2V: 16 input channels; TI2V-5B: 48)."""
    if config["in_channels"] == 36 and config["out_channels"] == 16:
        return WAN21_I2V if config["image_dim"] is not None else WAN22_I2V_EXPERT
    return f"Wan with {config['in_channels']} input channels (not image-to-video)"


def check_wan22_expert(where, fmt: str, config: dict):
    """The file must hold one Wan2.2-I2V-A14B expert (Wan2.1-14B shape, 36 input channels, no CLIP branch).

    Raises:
        CheckpointError: one line naming what the file is instead (a Wan2.1-I2V model where an expert
            is expected, T2V, TI2V-5B...).
    """
    family = transformer_family(config)
    if family == WAN22_I2V_EXPERT:
        return
    if family == WAN21_I2V:
        raise CheckpointError(f"{where} [{fmt}]: this is a Wan2.1-I2V transformer (CLIP image branch), not a Wan2.2-I2V-"
                              f"A14B expert: give the wan2.2_i2v_high_noise / low_noise files, or load it alone as "
                              f"Wan2.1 (no second transformer)")
    raise CheckpointError(f"{where} [{fmt}]: a {family} is not a Wan2.2-I2V-A14B expert (36 input channels, no image "
                          f"branch): give the wan2.2_i2v_high_noise / low_noise files")
