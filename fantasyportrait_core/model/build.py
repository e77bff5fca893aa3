"""Model configurations and construction: Wan2.1 I2V transformer, Wan VAE, adapter, encoder.

Every size comes from a config dict, so the tiny configs used by the demo and the tests build
the same classes as the released 14B model (config: diffusers ``WanTransformer3DModel`` for
Wan2.1-I2V-14B-720P, ``../shared/reference/wan21_i2v_14b_diffusers_keys.json``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from fantasyportrait_core.model.adapter import PortraitAdapter

# Weight dtypes by the names the CLI and the nodes offer.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

WAN21_I2V_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
    rope_max_seq_len=1024, pos_embed_seq_len=None,
)

# Tiny I2V transformer for the random-weight demo and the CPU tests (diffusers test sizes).
TINY_TRANSFORMER = dict(
    WAN21_I2V_14B, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2,
    text_dim=32, freq_dim=32, image_dim=16, added_kv_proj_dim=24,
)
# Wan2.2-I2V-A14B: two experts of the Wan2.1-14B shape without the CLIP image branch (Wan-Video/Wan2.2
# ``wan/configs/wan_i2v_A14B.py``; diffusers ``convert_wan_to_diffusers.py`` "Wan2.2-I2V-14B-720p":
# added_kv_proj_dim None, no image_dim). Experimental with the FantasyPortrait adapter (trained on Wan2.1).
WAN22_I2V_A14B_EXPERT = dict(WAN21_I2V_14B, image_dim=None, added_kv_proj_dim=None)
TINY_WAN22_EXPERT = dict(TINY_TRANSFORMER, image_dim=None, added_kv_proj_dim=None)
TINY_ADAPTER = dict(proj_dim=32, resampler_dim=32, resampler_depth=1, resampler_heads=1, resampler_dim_head=64)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])

# Wan2.1 VAE latent normalisation (per channel), published with the VAE (diffusers config
# ``latents_mean``/``latents_std``; ComfyUI ``latent_formats.Wan21``).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]


def _latent_stats(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def as_tensor(values):
        return torch.tensor(values, device=latent.device, dtype=latent.dtype).view(1, -1, 1, 1, 1)

    return as_tensor(WAN21_LATENTS_MEAN), as_tensor(WAN21_LATENTS_STD)


def normalize_latent(latent: torch.Tensor) -> torch.Tensor:
    """Raw Wan VAE latent ``[B, 16, F, h, w]`` -> the normalised latent the DiT works in."""
    mean, std = _latent_stats(latent)
    return (latent - mean) / std


def denormalize_latent(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_latent`."""
    mean, std = _latent_stats(latent)
    return latent * std + mean


@contextlib.contextmanager
def parameters_on_meta():
    """Create ``nn.Parameter`` s on the meta device (buffers stay real, so RoPE tables are built).

    Lets a 14B model be constructed without allocating its weights; the loader then assigns
    real tensors with ``load_state_dict(..., assign=True)``.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Module.register_parameter = original


def build_transformer(config: dict | None = None, empty: bool = False):
    """diffusers ``WanTransformer3DModel`` from ``config`` (default: Wan2.1-I2V-14B).

    Args:
        empty: parameters on the meta device (to be assigned by the checkpoint loader).
    """
    from diffusers import WanTransformer3DModel

    config = dict(WAN21_I2V_14B if config is None else config)
    if empty:
        # diffusers computes RoPE tables in __init__; build them on the CPU, weights on meta.
        with parameters_on_meta(), torch.device("cpu"):
            model = WanTransformer3DModel(**config)
        return model
    return WanTransformer3DModel(**config)


def adapter_config_for(transformer_config: dict, **overrides) -> dict:
    """Adapter sizes that fit a transformer: width and block count come from its config."""
    cfg = dict(dim=transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"],
               num_layers=transformer_config["num_layers"])
    cfg.update(overrides)
    return cfg


def build_adapter(transformer_config: dict, empty: bool = False, **overrides) -> PortraitAdapter:
    """:class:`PortraitAdapter` sized for ``transformer_config`` (released sizes unless overridden)."""
    cfg = adapter_config_for(transformer_config, **overrides)
    if empty:
        with parameters_on_meta():
            return PortraitAdapter(**cfg)
    return PortraitAdapter(**cfg)


def build_vae(config: dict | None = None):
    """diffusers ``AutoencoderKLWan`` (default config = Wan2.1 VAE)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**(config or {}))


def random_tiny_models(seed: int = 0):
    """Tiny randomly initialised (transformer, adapter, VAE) for the demo and tests.

    The adapter's K/V projections are zero at init (as in the reference); they get small random
    values here so the portrait branch actually moves the output.
    """
    from fantasyportrait_core.model.expression import FanEncoder

    torch.manual_seed(seed)
    transformer = build_transformer(TINY_TRANSFORMER).eval()
    adapter = build_adapter(TINY_TRANSFORMER, **TINY_ADAPTER).eval()
    for block in adapter.ip_adapter.blocks:
        for lin in (block.cross_attn.ip_adapter_single_stream_k_proj, block.cross_attn.ip_adapter_single_stream_v_proj):
            nn.init.normal_(lin.weight, std=0.2)
    vae = build_vae(TINY_VAE).eval()
    encoder = FanEncoder().eval()
    return transformer, adapter, vae, encoder
