"""The patch on ComfyUI's own Wan MODEL against our sampler, in a real ComfyUI (runs when COMFYUI_DIR is
set; ComfyUI's python: COMFYUI_PYTHON, else COMFYUI_DIR/venv/bin/python, else this python).

The same tiny Wan2.1-I2V checkpoint (original key layout; ComfyUI's detection takes it as
WAN21_I2V) and adapter file are loaded by ComfyUI (Load Diffusion Model's loader + our Adapter
Loader) and by our loader (diffusers transformer); with the same CONDITIONING, seed, sigmas
(``flow_sigmas``, fed to SamplerCustomAdvanced as SIGMAS) and settings, the native path and
FantasyPortrait Sampler must give the same latent.

Tolerance: everything is fp32 on the CPU. The two transformers are different implementations of
Wan (ComfyUI's ``WanModel`` with its sub-quadratic CPU attention and float64 RoPE tables vs
diffusers' ``WanTransformer3DModel`` with SDPA); on one forward of this checkpoint they agree to
~5e-6 on outputs of size ~2. Guidance multiplies differences of passes by cfg and portrait_cfg (up
to 4 here), Euler steps accumulate them and the latent is then denormalised (x std up to 3.3,
values up to ~17): the latents differ by ~1.5e-5 (measured). ATOL = 2e-4 leaves >10x margin and is
still >1000x below what a real difference does (no portrait, one pass more or less, a swapped
character, a LoRA, another context window: all move the latent by >0.1).
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.weights.load import load_adapter, load_transformer
from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.sampling.flow import flow_sigmas
from nodes.loaders import build_portrait_model
from nodes.portrait import PortraitInputs
from nodes.sampler import FantasyPortraitSampler

from . import checkpoint_writers as W
from .conftest import ROOT

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the native tests")

ATOL = 2e-4
SEED, STEPS, SHIFT = 11, 3, 5.0
F_LAT, LAT = 3, 8  # 9 frames, 64x64 pixels: 3 x 4 x 4 tokens
REF = 128  # reference image 128x128 (faces mapped to the 64x64 generation through the centre crop)


def comfy_python() -> str:
    py = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFYUI_DIR, "venv", "bin", "python")
    return py if os.path.exists(py) else sys.executable


def run_native(job: dict, directory, stem: str = "job") -> dict:
    """Save ``job`` in ``directory``, run it through ``tests/comfy_native_runner.py`` in ComfyUI's
    python and return its outputs (one latent per run name)."""
    job_path, out_path = os.path.join(directory, f"{stem}.pt"), os.path.join(directory, f"{stem}_out.pt")
    torch.save(job, job_path)
    res = subprocess.run([comfy_python(), os.path.join(ROOT, "tests", "comfy_native_runner.py"), job_path, out_path],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(out_path, weights_only=False)


def _driver(box, frames: int, g) -> DrivingExpression:
    boxes = np.tile(np.asarray(box, float), (frames, 1))
    return DrivingExpression(torch.randn(frames, 554, generator=g), FaceTrack(boxes, np.zeros((frames, 5, 2)),
                                                                              np.ones(frames, bool)))


def _portraits():
    g = torch.Generator().manual_seed(3)
    left, right = np.array([12.0, 30, 52, 80]), np.array([74.0, 34, 116, 84])
    faces = [Face(b, np.zeros((5, 2)), 0.99) for b in (left, right)]
    # 13 driving frames for a 9-frame latent: the windows are cut to the latent's length
    one = dict(faces=faces[:1], drivers=[_driver(left, 13, g)], ref_width=REF, ref_height=REF)
    two = dict(faces=faces, drivers=[_driver(left, 13, g), _driver(right, 13, g)], ref_width=REF, ref_height=REF)
    return {"one": one, "two": two}


def _conditioning():
    g = torch.Generator().manual_seed(5)
    text = []
    for _ in range(2):  # umT5 in ComfyUI: 512 tokens, zero after the prompt's tokens
        t = torch.zeros(1, 512, 4096)
        t[:, :20] = torch.randn(1, 20, 4096, generator=g)
        text.append(t)
    mask = torch.ones(1, 1, F_LAT, LAT, LAT)
    mask[:, :, 0] = 0.0  # WanImageToVideo: 0 = the given start frame
    return {"text_positive": text[0], "text_negative": text[1], "clip": torch.randn(1, 257, 1280, generator=g),
            "concat_latent_image": torch.randn(1, 16, F_LAT, LAT, LAT, generator=g), "concat_mask": mask}


def _write_lora(path: str, transformer_config: dict):
    """A rank-4 LoRA (ComfyUI / lightx2v key style) on every block's cross-attention q and o only: the
    modules the patched cross-attention reuses, so only reuse lets it act."""
    g = torch.Generator().manual_seed(9)
    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    sd = {}
    for i in range(transformer_config["num_layers"]):
        for name in ("q", "o"):
            key = f"diffusion_model.blocks.{i}.cross_attn.{name}"
            sd[key + ".lora_down.weight"] = torch.randn(4, dim, generator=g) * 0.3
            sd[key + ".lora_up.weight"] = torch.randn(dim, 4, generator=g) * 0.3
            sd[key + ".alpha"] = torch.tensor(4.0)
    save_file(sd, path)


RUNS = [
    dict(name="plain_before", guider="basic"),  # first sampling of this MODEL: never patched
    dict(name="one_cfg1", portrait="one", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0, facts=True),
    # adapter loaded in fp16: the patch takes its K/V in the MODEL's compute dtype (fp32 on the CPU)
    dict(name="one_cfg1_fp16_adapter", portrait="one", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0,
         adapter_dtype="fp16"),
    dict(name="one_cfg3", portrait="one", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0),
    dict(name="two_cfg1", portrait="two", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0),
    dict(name="two_cfg3", portrait="two", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0),
    dict(name="two_ksampler_cfg3", portrait="two", guider="cfg", cfg=3.0),  # plain CFGGuider: portrait always on
    # WAN Context Windows (Manual): 5 frames = 2 latent frames, overlap 1 latent frame, static windows [0, 1]
    # and [1, 2], pyramid weights of a 2-frame window = [1, 1]: our context windows with the same sizes
    dict(name="two_context_cfg3", portrait="two", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0, context=(5, 1)),
    dict(name="plain_context", guider="basic", context=(5, 1)),  # plain Wan2.1 I2V under ComfyUI 0.3.64's windows
    dict(name="one_lora0", portrait="one", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0, lora=("tiny.safetensors", 0.0)),
    dict(name="one_lora1", portrait="one", guider="fantasyportrait", cfg=1.0, portrait_cfg=4.0, lora=("tiny.safetensors", 1.0)),
    dict(name="plain_lora1", guider="basic", lora=("tiny.safetensors", 1.0)),
    dict(name="plain_after", guider="basic"),  # the same MODEL object that was patched above
    dict(name="plain_fresh", guider="basic", model="fresh", fresh=True),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    transformer, adapter = W.tiny_native_models(seed=0)
    paths = {"checkpoint": W.write_wan_original(transformer, str(d / "wan_i2v_tiny.safetensors"), dtype=torch.float32),
             "adapter": W.write_adapter_repacked(adapter, str(d / "fantasyportrait_tiny.safetensors"), dtype=torch.float32)}
    os.makedirs(d / "loras")
    _write_lora(str(d / "loras" / "tiny.safetensors"), W.TINY_NATIVE_TRANSFORMER)
    return d, paths, _conditioning(), _portraits()


@pytest.fixture(scope="module")
def native(setup):
    d, paths, cond, portraits = setup
    job = dict(comfy_dir=COMFYUI_DIR, checkpoint=paths["checkpoint"], adapter=paths["adapter"], lora_dir=str(d / "loras"),
               conditioning=cond, latent_shape=(1, 16, F_LAT, LAT, LAT), portraits=portraits,
               sigmas=flow_sigmas(STEPS, SHIFT), seed=SEED, runs=RUNS)
    return run_native(job, d)


@pytest.fixture(scope="module")
def ours(setup):
    _, paths, _, _ = setup
    transformer = load_transformer(paths["checkpoint"], dtype=torch.float32)
    adapter = load_adapter(paths["adapter"], dtype=torch.float32)
    return build_portrait_model(transformer, adapter, torch.float32)


def _our_latent(model, setup, portrait: str, cfg: float, portrait_cfg: float, context_frames: int = 81) -> torch.Tensor:
    _, _, c, portraits = setup
    extra = {"concat_latent_image": c["concat_latent_image"], "concat_mask": c["concat_mask"],
             "clip_vision_output": SimpleNamespace(penultimate_hidden_states=c["clip"])}
    p = portraits[portrait]
    inputs = PortraitInputs(p["faces"], p["drivers"], p["ref_width"], p["ref_height"], 1.0, [None] * len(p["drivers"]))
    out, _ = FantasyPortraitSampler().sample(
        model, inputs, [[c["text_positive"], dict(extra)]], [[c["text_negative"], dict(extra)]],
        {"samples": torch.zeros(1, 16, F_LAT, LAT, LAT)}, SEED, steps=STEPS, cfg=cfg, portrait_cfg=portrait_cfg,
        shift=SHIFT, context_frames=context_frames, context_overlap=4,
        # ComfyUI's context windows are plain windows: ours the same (no reference anchor), always
        long_video="windows", window_anchor="none")
    return out["samples"]


def _result(native, name) -> torch.Tensor:
    value = native[name]
    assert isinstance(value, torch.Tensor), f"{name} failed in ComfyUI: {value}"
    return value


@pytest.mark.parametrize("name, portrait, cfg, portrait_cfg, context_frames", [
    ("one_cfg1", "one", 1.0, 4.0, 81), ("one_cfg3", "one", 3.0, 4.0, 81),
    ("two_cfg1", "two", 1.0, 4.0, 81), ("two_cfg3", "two", 3.0, 4.0, 81),
    # ComfyUI's own CFGGuider on the patched MODEL = portrait in both passes = our portrait_cfg 1 (off)
    ("two_ksampler_cfg3", "two", 3.0, 1.0, 81),
    ("two_context_cfg3", "two", 3.0, 4.0, 5),
])
def test_native_path_equals_our_sampler(native, ours, setup, name, portrait, cfg, portrait_cfg, context_frames):
    theirs = _result(native, name)
    mine = _our_latent(ours, setup, portrait, cfg, portrait_cfg, context_frames)
    assert theirs.shape == mine.shape == (1, 16, F_LAT, LAT, LAT)
    err = (theirs - mine).abs().max().item()
    assert err < ATOL, f"{name}: native and our sampler differ by {err:.2e}"
    # and the portrait really acts: without it the latent is far off
    assert (theirs - _result(native, "plain_before")).abs().max().item() > 100 * ATOL


def test_portrait_guidance_and_characters_change_the_result(native):
    a, b, c = (_result(native, n) for n in ("one_cfg1", "two_cfg1", "one_cfg3"))
    assert (a - b).abs().max() > 100 * ATOL
    assert (a - c).abs().max() > 100 * ATOL


def test_lora_through_loraloadermodelonly(native):
    base = _result(native, "one_cfg1")
    assert torch.equal(_result(native, "one_lora0"), base), "strength 0 = no LoRA"
    lora = _result(native, "one_lora1")
    assert (lora - base).abs().max() > 100 * ATOL, "a LoRA on the reused q / o layers changes the patched result"
    assert (lora - _result(native, "plain_lora1")).abs().max() > 100 * ATOL


def test_context_windows_need_the_patch_for_wan_i2v(native):
    """ComfyUI 0.3.64's context windows do not window the I2V image latent: plain Wan2.1 I2V fails,
    the patched MODEL windows it itself (the equality above shows it is done right)."""
    plain = native["plain_context"]
    if isinstance(plain, str):
        assert "Sizes of tensors must match" in plain
    assert isinstance(native["two_context_cfg3"], torch.Tensor)


def test_adapter_is_under_comfyui_model_management(native):
    """The adapter rides with the MODEL as ComfyUI additional models (loaded by load_models_gpu with
    it, offloaded like any model): its K/V projections and its fp32 expression-token path."""
    facts = native["one_cfg1:facts"]
    kinds = sorted(name for name, _ in facts["additional"])
    assert kinds == ["_BlockList", "_TokenPath"], facts
    assert sum(size for _, size in facts["additional"]) == facts["adapter_bytes"]
    assert all(facts["loaded_with_model"]), facts
    assert facts["token_dtype"] == "torch.float32"
    # K/V follow the MODEL's compute dtype: an fp16-loaded adapter gives the fp32 result exactly
    assert torch.equal(_result(native, "one_cfg1_fp16_adapter"), _result(native, "one_cfg1"))


# ------------------------------------------------------------------------------------------------
# GGUF through city96's ComfyUI-GGUF (COMFYUI_DIR/custom_nodes/ComfyUI-GGUF or COMFYUI_GGUF_DIR)


def gguf_pack_dir() -> str | None:
    for d in (os.environ.get("COMFYUI_GGUF_DIR"), os.path.join(COMFYUI_DIR or "", "custom_nodes", "ComfyUI-GGUF")):
        if d and os.path.isfile(os.path.join(d, "loader.py")):
            return d
    return None


def write_wan_gguf(transformer, gguf_path: str, dequantized_path: str):
    """The tiny Wan as a GGUF file the way Wan GGUFs are published (``general.architecture`` "wan",
    original key names, 2-D weights Q8_0, the rest F32, >4-D tensors flattened with ComfyUI-GGUF's
    ``comfy.gguf.orig_shape`` record), and a safetensors file holding its dequantised values."""
    import gguf

    from fantasyportrait_core.weights.keys import transformer_state_dict_original

    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(gguf_path, arch="wan")
    dequantized = {}
    for key, t in transformer_state_dict_original(transformer).items():
        data = t.float().numpy()
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(data, q8)
            writer.add_tensor(key, packed, raw_dtype=q8)
            dequantized[key] = torch.from_numpy(gguf.quants.dequantize(packed, q8)).contiguous()
            continue
        if data.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in data.shape])
            data = data.reshape(data.shape[0], data.shape[1], -1)
        writer.add_tensor(key, np.ascontiguousarray(data))
        dequantized[key] = t.float().contiguous()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(dequantized, dequantized_path)


GGUF_RUNS = [  # dequant_dtype float32 (Unet Loader (GGUF/Advanced)): the exact Q8_0 values, as gguf-py gives them
    dict(name="gguf_plain", model="gguf", guider="basic", dequant_dtype="float32"),
    dict(name="gguf_one_cfg3", model="gguf", portrait="one", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0),
    dict(name="deq_one_cfg3", model="deq", portrait="one", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0),
    dict(name="gguf_one_lora", model="gguf", portrait="one", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0,
         lora=("tiny.safetensors", 1.0)),
    dict(name="deq_one_lora", model="deq", portrait="one", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0,
         lora=("tiny.safetensors", 1.0)),
    # the plain Unet Loader (GGUF) (its default dequantisation rounds the Q8_0 scale product more coarsely)
    dict(name="gguf_default_one_cfg3", model="gguf_default", fresh=True, portrait="one", guider="fantasyportrait",
         cfg=3.0, portrait_cfg=4.0),
]


@pytest.mark.skipif(gguf_pack_dir() is None, reason="ComfyUI-GGUF not found (COMFYUI_DIR/custom_nodes/ComfyUI-GGUF or "
                                                    "COMFYUI_GGUF_DIR)")
def test_gguf_model_through_comfyui_gguf(setup):
    """A Q8_0 GGUF loaded by ComfyUI-GGUF's Unet Loader (GGUF): its quantised q / k / v / o layers
    dequantise inside the patched cross-attention (and take a LoRA there), giving the latent of the
    same dequantised weights loaded from safetensors, and of our sampler on them."""
    d, paths, cond, portraits = setup
    transformer = load_transformer(paths["checkpoint"], dtype=torch.float32)
    gguf_path, deq_path = str(d / "wan_i2v_tiny_Q8_0.gguf"), str(d / "wan_i2v_tiny_Q8_0_dequantized.safetensors")
    write_wan_gguf(transformer, gguf_path, deq_path)
    job = dict(comfy_dir=COMFYUI_DIR, checkpoint=paths["checkpoint"], checkpoints={"gguf": gguf_path, "gguf_default": gguf_path, "deq": deq_path},
               gguf_pack=gguf_pack_dir(), adapter=paths["adapter"], lora_dir=str(d / "loras"), conditioning=cond,
               latent_shape=(1, 16, F_LAT, LAT, LAT), portraits=portraits, sigmas=flow_sigmas(STEPS, SHIFT), seed=SEED,
               runs=GGUF_RUNS)
    out = run_native(job, d, "gguf_job")
    q8, deq = _result(out, "gguf_one_cfg3"), _result(out, "deq_one_cfg3")
    assert (q8 - deq).abs().max().item() < ATOL
    assert (q8 - _result(out, "gguf_plain")).abs().max().item() > 100 * ATOL
    lora = _result(out, "gguf_one_lora")
    assert (lora - _result(out, "deq_one_lora")).abs().max().item() < ATOL
    assert (lora - q8).abs().max().item() > 100 * ATOL
    # default dequantisation: the same result up to the coarser rounding of the weights (~5e-4 relative)
    assert (_result(out, "gguf_default_one_cfg3") - q8).abs().max().item() < 0.05
    ours = build_portrait_model(load_transformer(deq_path, dtype=torch.float32),
                                load_adapter(paths["adapter"], dtype=torch.float32), torch.float32)
    assert (_our_latent(ours, setup, "one", 3.0, 4.0) - q8).abs().max().item() < ATOL


def test_unpatching_is_clean(native):
    before = _result(native, "plain_before")
    assert torch.equal(_result(native, "plain_after"), before), "the patched MODEL's base sampled afterwards"
    assert torch.equal(_result(native, "plain_fresh"), before), "a freshly loaded, never patched MODEL"


@pytest.fixture(scope="module")
def wan22(setup):
    """Wan2.2-I2V-A14B (experimental): two tiny experts (no img_emb; ComfyUI types each WAN21_T2V with
    in_dim 36) sampled as ComfyUI's two-stage graph, Patch Model on the expert(s) with the adapter; sigmas
    [1, 0.909, 0.714, 0] (3 steps, shift 5): steps 0-1 at t >= 900 on the high-noise expert, step 2 on
    the low-noise one, i.e. the Wan2.2 I2V boundary 0.900 of our sampler."""
    d, paths, cond, portraits = setup
    high, low = W.tiny_native_wan22_experts(seed=1)
    files = {"high": W.write_wan_original(high, str(d / "wan2.2_i2v_high_noise_tiny.safetensors"), dtype=torch.float32),
             "low": W.write_wan_original(low, str(d / "wan2.2_i2v_low_noise_tiny.safetensors"), dtype=torch.float32)}
    c = dict(cond, clip=None)
    stages = lambda high_portrait, low_portrait: [dict(model="high", portrait=high_portrait, start=0, end=2),
                                                  dict(model="low", portrait=low_portrait, start=2, end=3)]
    runs = [dict(name="both", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0, stages=stages("two", "two")),
            dict(name="high_only", guider="fantasyportrait", cfg=3.0, portrait_cfg=4.0, stages=stages("two", None)),
            dict(name="plain", guider="cfg", cfg=3.0, stages=stages(None, None))]
    job = dict(comfy_dir=COMFYUI_DIR, checkpoint=files["high"], checkpoints=files, adapter=paths["adapter"],
               conditioning=c, latent_shape=(1, 16, F_LAT, LAT, LAT), portraits=portraits,
               sigmas=flow_sigmas(STEPS, SHIFT), seed=SEED, runs=runs)
    return files, c, run_native(job, d, "wan22_job")


def test_wan22_two_experts_native_equals_our_sampler(setup, wan22):
    from fantasyportrait_core.weights.experts import load_wan22_experts

    files, c, native_out = wan22
    _, paths, _, portraits = setup
    sig = flow_sigmas(STEPS, SHIFT)
    assert float(sig[1]) >= 0.9 > float(sig[2])  # the stage split is the boundary
    high, low = load_wan22_experts(files["high"], files["low"], dtype=torch.float32)
    adapter = load_adapter(paths["adapter"], dtype=torch.float32)
    model = build_portrait_model(high, adapter, torch.float32)
    model.low_noise = build_portrait_model(low, adapter, torch.float32)
    extra = {"concat_latent_image": c["concat_latent_image"], "concat_mask": c["concat_mask"]}
    p = portraits["two"]
    inputs = PortraitInputs(p["faces"], p["drivers"], p["ref_width"], p["ref_height"], 1.0, [None] * 2)
    ours = {}
    for on in ("both", "high"):
        out, info = FantasyPortraitSampler().sample(
            model, inputs, [[c["text_positive"], dict(extra)]], [[c["text_negative"], dict(extra)]],
            {"samples": torch.zeros(1, 16, F_LAT, LAT, LAT)}, SEED, steps=STEPS, cfg=3.0, portrait_cfg=4.0, shift=SHIFT,
            sigmas=sig, adapter_on=on)
        ours[on] = out["samples"]
    assert (_result(native_out, "both") - ours["both"]).abs().max().item() < ATOL
    assert (_result(native_out, "high_only") - ours["high"]).abs().max().item() < ATOL
    # the portrait acts on each expert: dropping it from the low-noise one, or from both, changes the result
    assert (_result(native_out, "both") - _result(native_out, "high_only")).abs().max().item() > 100 * ATOL
    assert (_result(native_out, "high_only") - _result(native_out, "plain")).abs().max().item() > 100 * ATOL
