"""FlashPortrait on ComfyUI's own Wan MODEL against our sampler, in a real ComfyUI (runs when COMFYUI_DIR is
set, as tests/test_native_comfyui.py, whose setup and tolerance it reuses).

The tiny FlashPortrait release (transformer.pt with emo_{k,v}_proj, portrait_encoder.pt) is loaded by
ComfyUI (Load Diffusion Model's loader on transformer.pt + our Adapter Loader with
``flashportrait_transformer``) and by our Model Loader path; both run the normalised block through the
one portrait branch, so the latents must agree as the FantasyPortrait ones do. A plain Wan MODEL with
the FlashPortrait adapter is refused by Patch Model.
"""

import pytest
import torch

from fantasyportrait_core.sampling.flow import flow_sigmas
from fantasyportrait_core.weights.load import load_adapter_for, load_transformer
from fantasyportrait_core.weights import tiny as W
from nodes.loaders import build_portrait_model

from .test_native_comfyui import (ATOL, COMFYUI_DIR, F_LAT, LAT, SEED, SHIFT, STEPS, _conditioning, _our_latent,
                                  _portraits, _result, run_native)

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the native tests")

RUNS = [
    dict(name="plain_before", guider="basic"),
    dict(name="flash_one_cfg1", portrait="one", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0),
    dict(name="flash_two_cfg3", portrait="two", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0),
    dict(name="flash_on_plain_wan", model="plain", portrait="one", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("native_flash")
    plain, adapter = W.tiny_native_models(seed=0)
    flash = W.tiny_native_models(seed=0)[0]
    with torch.no_grad():  # FlashPortrait fine-tuned the attention: its DiT differs from the plain one there
        for block in flash.blocks:
            block.attn2.to_out[0].bias.add_(0.05 * torch.randn_like(block.attn2.to_out[0].bias))
    adapter.family = "flashportrait"
    files = W.write_flashportrait(flash, adapter, str(d / "FlashPortrait"), dtype=torch.float32)
    plain_path = W.write_wan_original(plain, str(d / "plain_wan.safetensors"), dtype=torch.float32)
    return d, files, plain_path, _conditioning(), _portraits()


@pytest.fixture(scope="module")
def native(setup):
    d, files, plain_path, cond, portraits = setup
    job = dict(comfy_dir=COMFYUI_DIR, checkpoint=files["transformer"], checkpoints={"plain": plain_path},
               adapter=files["adapter"], flashportrait_transformer=files["transformer"], conditioning=cond,
               latent_shape=(1, 16, F_LAT, LAT, LAT), portraits=portraits, sigmas=flow_sigmas(STEPS, SHIFT),
               seed=SEED, runs=RUNS)
    return run_native(job, d)


@pytest.fixture(scope="module")
def ours(setup):
    _, files, _, _, _ = setup
    transformer = load_transformer(files["transformer"], dtype=torch.float32)
    adapter = load_adapter_for(transformer, files["adapter"], dtype=torch.float32)
    assert adapter.normalize_expression
    return build_portrait_model(transformer, adapter, torch.float32)


@pytest.mark.parametrize("name, portrait, cfg, portrait_cfg", [("flash_one_cfg1", "one", 1.0, 4.0),
                                                               ("flash_two_cfg3", "two", 3.0, 4.0)])
def test_native_flashportrait_equals_our_sampler(native, ours, setup, name, portrait, cfg, portrait_cfg):
    theirs = _result(native, name)
    mine = _our_latent(ours, (None, None, setup[3], setup[4]), portrait, cfg, portrait_cfg)
    err = (theirs - mine).abs().max().item()
    assert err < ATOL, f"{name}: native and our sampler differ by {err:.2e}"
    assert (theirs - _result(native, "plain_before")).abs().max().item() > 100 * ATOL


def test_flashportrait_adapter_on_a_plain_wan_model_is_refused(native):
    msg = native["flash_on_plain_wan"]
    assert isinstance(msg, str) and "not FlashPortrait's transformer" in msg and "\n" not in msg
