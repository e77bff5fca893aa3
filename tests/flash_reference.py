"""Literal port (for tests only) of FlashPortrait's cross-attention block and guidance loop.

Source: Francis-Rings/FlashPortrait at c72d9de: ``wan/models/wan_transformer3d.py``
``WanI2VCrossAttention.forward`` (the ``len(emo_proj.shape) == 4`` path, single GPU, no padding
tail) and ``wan/pipeline/pipeline_wan_long.py`` ``__call__`` (the three-pass guidance around
``ip_scale`` / ``emo_cfg_scale`` / ``text_cfg_scale``). Written from reading that code, step for step,
in plain PyTorch (``attention`` = SDPA with default scaling, as ``wan/models/attention_utils``);
the weights are taken from our diffusers-layout modules so both sides run on identical weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms(x, weight, eps):
    # WanRMSNorm: x * rsqrt(mean(x^2) + eps), in float, then * weight
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def _attention(q, k, v, attn_mask=None):
    # q, k, v: [B, L, n, d] -> [B, L, n, d]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


def flash_cross_attention(attn, emo_k_proj, emo_v_proj, x, context, emo_proj, ip_scale=1.0, emo_attn_mask=None,
                          eps=1e-6):
    """FlashPortrait ``WanI2VCrossAttention.forward``.

    attn: a diffusers ``WanAttention`` (attn2 of an I2V block) supplying q/k/v/o, k_img/v_img and the
    norms (original names: q=to_q, k_img=add_k_proj, norm_k_img=norm_added_k, o=to_out.0).
    x: [B, L1, C]; context: [B, 257 + 512, C] (image first); emo_proj: [B, F, Lk, 2048].
    """
    n = attn.heads
    b = x.size(0)
    d = x.shape[-1] // n
    context_img = context[:, :257]
    context = context[:, 257:]
    q = _rms(attn.to_q(x), attn.norm_q.weight, eps).view(b, -1, n, d)
    k = _rms(attn.to_k(context), attn.norm_k.weight, eps).view(b, -1, n, d)
    v = attn.to_v(context).view(b, -1, n, d)
    k_img = _rms(attn.add_k_proj(context_img), attn.norm_added_k.weight, eps).view(b, -1, n, d)
    v_img = attn.add_v_proj(context_img).view(b, -1, n, d)
    img_x = _attention(q, k_img, v_img)
    x = _attention(q, k, v)

    B, L, n, d = q.shape
    Fr = emo_proj.shape[1]
    L_eff = (L // Fr) * Fr
    q_eff = q[:, :L_eff]
    tokens_per_frame = L_eff // Fr
    emo_q = q_eff.view(B * Fr, tokens_per_frame, n, d)
    ip_key = emo_k_proj(emo_proj).view(B * Fr, -1, n, d)
    ip_value = emo_v_proj(emo_proj).view(B * Fr, -1, n, d)
    emo_x = _attention(emo_q, ip_key, ip_value, attn_mask=emo_attn_mask)
    emo_x = emo_x.reshape(B, L_eff, n, d).flatten(2)

    x = x.flatten(2)
    img_x = img_x.flatten(2)
    x = x + img_x
    mean_x, std_x = torch.mean(x, dim=(1, 2), keepdim=True), torch.std(x, dim=(1, 2), keepdim=True)
    mean_emo, std_emo = torch.mean(emo_x, dim=(1, 2), keepdim=True), torch.std(emo_x, dim=(1, 2), keepdim=True)
    emo_x = (emo_x - mean_emo) * (std_x / (std_emo + 1e-5)) + mean_x
    x = x + emo_x * ip_scale
    return attn.to_out[0](x)


def flash_guidance_step(transformer, latent, emo, text_cfg_scale, emo_cfg_scale, ip_scale=1.0):
    """One step of ``pipeline_wan_long.__call__``'s guidance.

    transformer(latent, prompt, ip_scale) -> noise prediction; prompt is "positive" or "negative".
    """
    noise_pred_posi = transformer(latent, "positive", emo, ip_scale)
    if emo_cfg_scale and emo_cfg_scale > 1.0:
        noise_pred_no_emo = transformer(latent, "positive", emo, 0.0)
        if text_cfg_scale != 1.0:
            noise_pred_no_cond = transformer(latent, "negative", emo, 0.0)
            return (noise_pred_no_cond + text_cfg_scale * (noise_pred_no_emo - noise_pred_no_cond)
                    + emo_cfg_scale * (noise_pred_posi - noise_pred_no_emo))
        return noise_pred_no_emo + emo_cfg_scale * (noise_pred_posi - noise_pred_no_emo)
    if text_cfg_scale != 1.0:
        noise_pred_no_text = transformer(latent, "negative", emo, ip_scale)
        return noise_pred_no_text + text_cfg_scale * (noise_pred_posi - noise_pred_no_text)
    return noise_pred_posi


# ------------------------------------------------------------------------------------------------
# Long videos: pipeline_wan_long.py's context_scheduler (step 0, stride 1) + last-window fix, and
# its window-after-window blend of the step outputs.

def _ordered_halving(val):
    bin_str = f"{val:064b}"
    return int(bin_str[::-1], 2) / (1 << 64)


def flash_context_windows(num_frames, context_size=51, context_overlap=30):
    """``global_context`` of ``WanI2VLongPipeline.__call__`` (lists of latent frame indices)."""
    import numpy as np

    queue = []
    if num_frames <= context_size:
        queue.append(list(range(num_frames)))
    else:
        stride = min(1, int(np.ceil(np.log2(num_frames / context_size))) + 1)
        for context_step in 1 << np.arange(stride):
            pad = int(round(num_frames * _ordered_halving(0)))
            for j in range(int(_ordered_halving(0) * context_step) + pad, num_frames + pad - context_overlap,
                           context_size * context_step - context_overlap):
                queue.append([e % num_frames for e in range(j, j + context_size * context_step, context_step)])
    step = min(1, int(np.ceil(np.log2(num_frames / context_size))) + 1)
    queue[-1] = [e % num_frames for e in range(num_frames - context_size * step, num_frames, step)]
    return queue


def flash_blend(preds, windows, num_frames, context_size=51):
    """The loop body's blend (``i != 0``): ``preds[i]`` ``[1, C, len(window_i), ...]`` -> ``[1, C, F, ...]``."""
    out = torch.zeros((1, preds[0].shape[1], num_frames) + tuple(preds[0].shape[3:]), dtype=preds[0].dtype)
    for i_index, context_index in enumerate(windows):
        sub = preds[i_index].clone()
        if i_index != 0:
            prev = windows[i_index - 1]
            n = len(set(context_index) & set(prev))
            cur_idx = [ii % context_size for ii in range(0, n)]
            prev_idx = [prev[ii] for ii in range(context_size - n, context_size)]
            weight = torch.zeros(1, 1, n, 1, 1, dtype=sub.dtype)
            for j in range(n):
                weight[:, :, j] = j / (n - 1)
            sub[:, :, cur_idx] = sub[:, :, cur_idx] * weight + out[:, :, prev_idx] * (1 - weight)
        for j, c in enumerate(context_index):
            out[:, :, c] = sub[:, :, j]
    return out


def flash_step_distill_sigmas(denoising_step_list=(1000, 750, 500, 250), shift=5.0, num_train_timesteps=1000):
    """``StepDistillScheduler.set_timesteps`` (wan/utils/step_distill_scheduler.py) -> its ``sigmas``."""
    sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    index = [num_train_timesteps - x for x in denoising_step_list]
    return torch.cat([sigmas[index], torch.tensor([0.0])])


def flash_step_distill_step(flow_pred, sigmas, i, latents):
    """``StepDistillScheduler.step``: x0 = x − σ·v, then x0 + σ_next·v (none after the last step)."""
    sigma = sigmas[i].item()
    denoised = latents - sigma * flow_pred
    if i + 1 < len(sigmas) - 1:
        return denoised + flow_pred * sigmas[i + 1].item()
    return denoised
