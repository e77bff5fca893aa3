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
    if config["image_dim"] is None or config["in_channels"] != 36 or config["out_channels"] != 16:
        raise CheckpointError(f"{where} [{fmt}]: a Wan transformer with {config['in_channels']} input channels and "
                              f"{'no' if config['image_dim'] is None else 'an'} image branch is not Wan2.1-I2V (36 input "
                              f"channels, CLIP image branch); FantasyPortrait needs Wan2.1-I2V-14B 480P or 720P")


