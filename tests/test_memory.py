"""Memory model and plan against measured peaks; weights moved without RAM copies; weights put back
after an exception (whole-model residency and diffusers block offload); ComfyUI's model management
driving our resident model (real ComfyUI, when COMFYUI_DIR is set)."""

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from fantasyportrait_core.runtime.memory import (GIB, activation_bytes, choose_storage, measured_size, model_size,
                                         plan_memory, tokens_per_forward)
from fantasyportrait_core.model.build import WAN21_I2V_14B
from fantasyportrait_core.runtime.residency import WeightHome

from .conftest import ROOT


@pytest.fixture(scope="module")
def size14b():
    return model_size(WAN21_I2V_14B)


def _bare_forward_gib(size, storage, offload, tokens):
    """Prediction for the bare diffusers forward measured in ../shared/reference/README.md: no adapter,
    no portrait, no reserve (the measurement is torch's peak allocation)."""
    bare = dataclasses.replace(size, adapter_kv_bytes=0)
    # measured with diffusers' default streams (no record_stream): two blocks on the GPU at a time
    return (bare.weights(storage, offload, blocks_on_gpu=2) + activation_bytes(bare, tokens)) / GIB


# (storage, offload, width, height, measured peak GiB): NVIDIA H100 80GB, random bf16 weights, one
# forward at 81 frames (../shared/reference/README.md). fp8 = diffusers layerwise casting, the same
# bytes as our fp8 storage; block = diffusers group offload, one block per group, with streams.
H100 = [("bf16", "none", 512, 512, 32.9), ("bf16", "none", 832, 480, 34.1), ("bf16", "none", 1280, 720, 38.7),
        ("fp8", "none", 512, 512, 17.9), ("fp8", "none", 1280, 720, 23.6), ("fp8", "block", 512, 512, 3.5)]


@pytest.mark.parametrize("storage,offload,w,h,measured", H100)
def test_memory_model_matches_h100_peaks(size14b, storage, offload, w, h, measured):
    """Within 2 % of every H100 peak. The activation coefficients come from CPU allocator peaks
    (benchmarks/bench_memory.py), not from these figures, so all six rows are independent checks."""
    predicted = _bare_forward_gib(size14b, storage, offload, tokens_per_forward(w, h, 81))
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)


def test_14b_sizes(size14b):
    """The published sizes: 30.5 GiB bf16, 15.5 GiB with fp8 block linears; adapter K/V 839 M params."""
    assert abs((size14b.block_bytes["bf16"] + size14b.other_bytes) / GIB - 30.5) < 0.1
    assert abs((size14b.block_bytes["fp8"] + size14b.other_bytes) / GIB - 15.5) < 0.1
    assert size14b.adapter_kv_bytes == 838_860_800 * 2


@pytest.mark.parametrize("free_gib,size,passes,expected", [
    (80, (512, 512), 3, ("bf16", "none", 3)),   # H100/H200: everything fits, all passes in one forward
    (40, (512, 512), 3, ("bf16", "none", 2)),   # bf16 fits with two passes per forward, not three
    (32, (1280, 720), 2, ("fp8", "none", 1)),   # 32 GB card at 720p: fp8 resident, one pass per forward
    (24, (512, 512), 2, ("fp8", "none", 2)),    # 24 GB card at 512²: fp8 resident, batched
    (24, (1280, 720), 2, ("fp8", "block", 2)),  # 24 GB at 720p: blocks streamed, passes still batched
    (12, (1280, 720), 2, ("fp8", "block", 1)),  # the low-VRAM plan at 720p (target <= 12 GB)
    (6, (512, 512), 2, ("fp8", "block", 1)),    # the low-VRAM plan at 512² (target <= 6 GB)
])
def test_plan_picks_expected_mode(size14b, free_gib, size, passes, expected):
    tokens = tokens_per_forward(*size, 81)
    plan = plan_memory(size14b, tokens, free_gib * GIB, passes=passes, people=2)
    assert (plan.storage, plan.offload, plan.batch_passes) == expected, plan.describe()
    assert plan.fits and plan.peak_bytes <= free_gib * GIB


def test_plan_fixed_options_no_gpu_and_nothing_fits(size14b):
    tokens = tokens_per_forward(1280, 720, 81)
    plan = plan_memory(size14b, tokens, 24 * GIB, passes=3, storage="bf16", offload="auto")
    assert (plan.storage, plan.offload) == ("bf16", "block")
    cpu = plan_memory(size14b, tokens, None, passes=3, storage="fp8")
    assert (cpu.storage, cpu.offload, cpu.batch_passes, cpu.free_bytes) == ("fp8", "none", 3, None)
    tiny = plan_memory(size14b, tokens, 4 * GIB, passes=3)
    assert not tiny.fits and (tiny.storage, tiny.offload, tiny.batch_passes) == ("fp8", "block", 1)
    assert "NOT to fit" in tiny.describe()
    # frames beyond the context window do not grow a forward
    assert tokens_per_forward(1280, 720, 161, context_frames=81) == tokens
    with pytest.raises(ValueError, match="multiples of 16"):
        tokens_per_forward(1281, 720, 81)
    with pytest.raises(ValueError, match="storage"):
        plan_memory(size14b, tokens, None, storage="int8")


def test_storage_auto_at_load(size14b):
    assert choose_storage(size14b, 80 * GIB).storage == "bf16"
    assert choose_storage(size14b, 24 * GIB).storage == "fp8"
    assert choose_storage(size14b, None).storage == "bf16"


def test_measured_size_of_a_loaded_model(tiny):
    from fantasyportrait_core.model.fp8 import quantize_model_fp8

    transformer, adapter = copy.deepcopy(tiny[0]), tiny[1]
    before = measured_size(transformer, adapter)
    n = quantize_model_fp8(transformer)
    after = measured_size(transformer, adapter)
    assert n == 2 * 12  # 12 linears per block (self q k v o, cross q k v o + image k v, ffn 2)
    assert after.block_bytes["fp8"] == before.block_bytes["fp8"] < before.block_bytes["bf16"]
    assert before.adapter_kv_bytes == sum(p.numel() * 4 for i in range(2) for m in adapter.kv_projections(i)
                                          for p in m.parameters())


def test_block_offload_streams_the_adapter_kv_with_its_block(tiny):
    """With block offload the adapter's K/V of block i ride in block i's group (the same modules its
    processor calls), the output is unchanged, and the plan's byte counts do not double them."""
    from fantasyportrait_core.model.attention import PortraitCondition, attach_portrait_processors
    from fantasyportrait_core.runtime.residency import enable_block_offload

    model, adapter = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    state = attach_portrait_processors(model, adapter)
    state.condition = PortraitCondition(torch.randn(1, 2, 97, adapter.proj_dim))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 36, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 512, 32, generator=g))
    kw = dict(encoder_hidden_states_image=torch.randn(1, 257, 16, generator=g), return_dict=False)
    before = measured_size(model, adapter)
    with torch.no_grad():
        ref = model(*args, **kw)[0]
        assert enable_block_offload(model, torch.device("cpu"), None, adapter=adapter) is False  # RAM unknown: no pin
        out = model(*args, **kw)[0]
    k, v = adapter.kv_projections(1)
    assert model.blocks[1].portrait_kv[0] is k and model.blocks[1].portrait_kv[1] is v
    assert model.blocks[1].attn2.processor.k_proj is k
    torch.testing.assert_close(out, ref)
    assert measured_size(model, adapter) == before


def test_weights_return_to_the_tensors_they_were_loaded_as(tmp_path, tiny):
    """After the weights were on a device (simulated here by pointing them at copies), going home
    points every tensor at the very tensor it was loaded as (same data pointer: the loader's
    memory-mapped or assigned tensor, never a new RAM copy), where ``module.to("cpu")`` would copy.
    Tensors added later (e.g. LoRA layers) are tracked."""
    from fantasyportrait_core.weights.load import load_transformer

    from . import checkpoint_writers as W

    path = W.write_wan_original(tiny[0], str(tmp_path / "wan.safetensors"))
    model = load_transformer(path, dtype=torch.float32)
    home = WeightHome(model)
    loaded_as = {id(t): t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    for p in model.parameters():  # "on the device": each weight points at another tensor
        p.data = p.data.clone()
    model.blocks[0].extra = torch.nn.Linear(3, 3)  # added while away: its data is its home
    home.go_home()
    assert all(t.data_ptr() == loaded_as[id(t)] for t in (*model.parameters(), *model.buffers()) if id(t) in loaded_as)
    assert home.device is None and home.total_bytes() == sum(
        t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_guard_puts_weights_back_after_an_exception_in_block_offload(tiny, monkeypatch):
    """diffusers block offload (the loader's offload = block) moves a block's weights in before it
    runs and out after; an exception inside a block (OOM, Cancel) skips the 'out'. The guard points
    every weight back at the host tensor it had on entry. The GPU copy is simulated on the CPU by a
    clone (a different tensor), so the test sees where each weight points."""
    from diffusers.hooks.group_offloading import ModuleGroup

    model = copy.deepcopy(tiny[0])
    model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
    real_onload = ModuleGroup.onload_

    def onload_as_copy(group):
        real_onload(group)
        for m in group.modules:
            for p in m.parameters():
                p.data = p.data.clone()

    monkeypatch.setattr(ModuleGroup, "onload_", onload_as_copy)

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom

    monkeypatch.setattr(model.blocks[1].attn2, "processor", explode)
    entry = {id(p): p.data_ptr() for p in model.parameters()}
    args = (torch.randn(1, 36, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 512, 32))
    kw = dict(encoder_hidden_states_image=torch.randn(1, 257, 16), return_dict=False)

    with torch.no_grad(), pytest.raises(Boom):
        model(*args, **kw)  # unguarded: block 1's weights stay on the "device"
    stuck = [p for p in model.blocks[1].parameters() if p.data_ptr() != entry[id(p)]]
    assert stuck, "the simulated onload must leave block 1 on the device, or this test proves nothing"

    model2 = copy.deepcopy(tiny[0])
    model2.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
                                num_blocks_per_group=1)
    monkeypatch.setattr(model2.blocks[1].attn2, "processor", explode)
    home2 = WeightHome(model2)
    entry2 = {id(p): p.data_ptr() for p in model2.parameters()}
    with torch.no_grad(), pytest.raises(Boom), home2.guard():
        model2(*args, **kw)
    assert all(p.data_ptr() == entry2[id(p)] for p in model2.parameters())


COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


@pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to check against a real ComfyUI")
def test_comfy_model_management_loads_keeps_and_unloads_our_model():
    py = os.environ.get("COMFYUI_PYTHON") or sys.executable
    script = f"""
import sys
sys.argv = ["check", "--cpu"]
sys.path[:0] = [{ROOT!r}, {COMFYUI_DIR!r}]  # our nodes package before ComfyUI's nodes.py
import torch
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
from fantasyportrait_core.model.build import random_tiny_models
from fantasyportrait_core.runtime.residency import WeightHome
from nodes.residency import ComfyResident, load_resident, vram_available
tr, ad, _, _ = random_tiny_models(0)
home = WeightHome(tr, ad)
res = ComfyResident(tr, ad, home, torch.device("cpu"), torch.device("cpu"), torch.float32)
load_resident(res, torch.device("cpu"), 1000)
mm.load_models_gpu([res], memory_required=1000)  # through ComfyUI even on the CPU
assert res in mm.loaded_models(), "registered"
assert home.device is not None and home.device.type == "cpu"
mm.load_models_gpu([res])  # again: found in the list, not reloaded
assert sum(1 for m in mm.loaded_models() if m is res) == 1
assert vram_available(torch.device("cpu"), res) is None
mm.unload_all_models()
assert res not in mm.loaded_models() and home.device is None, "unloaded through detach()"
print("COMFY OK")
"""
    out = subprocess.run([py, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and "COMFY OK" in out.stdout, out.stderr[-3000:]
