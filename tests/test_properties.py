"""Property-based tests (hypothesis, bounded and derandomised so CI is fast and repeatable): damaged
checkpoints and odd face/mask inputs end in the project's own error types, never in a crash of
another kind and never in a silently wrong result."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nodes
from fantasyportrait_core.weights.files import CheckpointError
from fantasyportrait_core.weights.load import load_adapter, load_transformer
from fantasyportrait_core.faces.face import Face, FaceTrack
from fantasyportrait_core.drive.encode import DrivingExpression
from fantasyportrait_core.validate import InputError
from nodes.portrait import ReferenceFaces

from .checkpoint_writers import adapter_state_dict_official

BOUNDED = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------------------------
# Checkpoints

MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("rename"), st.integers(0, 10_000)),
    st.tuples(st.just("reshape"), st.integers(0, 10_000)),
    st.tuples(st.just("retype"), st.integers(0, 10_000),
              st.sampled_from([torch.int32, torch.int64, torch.bool, torch.uint8, torch.float16, torch.float64])),
    st.tuples(st.just("drop"), st.integers(0, 10_000)),
)


def _mutate(sd: dict, mutation) -> dict:
    sd = dict(sd)
    keys = sorted(sd)
    kind = mutation[0]
    if kind == "truncate":
        return sd
    k = keys[mutation[1] % len(keys)]
    if kind == "rename":
        sd[k.replace(".", "_", 1) + "_renamed"] = sd.pop(k)
    elif kind == "reshape":
        t = sd[k]
        sd[k] = torch.zeros(t.numel() + 1, dtype=t.dtype) if t.ndim <= 1 else t.flatten(1)[:, :-1].contiguous() \
            if t.shape[-1] > 1 else torch.zeros(*t.shape[:-1], 2, dtype=t.dtype)
    elif kind == "retype":
        dtype = mutation[2]
        t = sd[k].float()
        sd[k] = (t * 100).round().to(dtype) if not dtype.is_floating_point else t.to(dtype)
    elif kind == "drop":
        del sd[k]
    return sd


def _write(path: str, sd: dict, mutation, pickled=False) -> None:
    if pickled:
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        with open(path, "rb") as f:
            data = f.read()
    if mutation[0] == "truncate":
        data = data[: int(len(data) * mutation[1])]
    with open(path, "wb") as f:
        f.write(data)


def _loaded_equals_file(model: torch.nn.Module, stored: dict, rename=lambda k: k):
    """A load that succeeded must hold exactly the stored values (cast to the model's dtype)."""
    state = model.state_dict()
    for k, v in stored.items():
        target = state[rename(k)]
        torch.testing.assert_close(target.float(), v.to(target.dtype).float(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_props")


@BOUNDED
@given(mutation=MUTATIONS, pickled=st.booleans())
def test_damaged_adapter_checkpoints(tiny, ckpt_dir, mutation, pickled):
    adapter = tiny[1]
    path = str(ckpt_dir / ("adapter.ckpt" if pickled else "adapter.safetensors"))
    if pickled:  # official layout: nested groups, 'processor.' inside the ip_adapter keys
        nested = adapter_state_dict_official(adapter)
        flat = {f"{g}.{k}": v for g, d in nested.items() for k, v in d.items()}
        flat = _mutate(flat, mutation)
        groups = {}
        for k, v in flat.items():
            g, rest = k.split(".", 1)
            groups.setdefault(g, {})[rest] = v
        _write(path, groups, mutation, pickled=True)
    else:
        flat = _mutate(adapter.state_dict(), mutation)
        _write(path, flat, mutation)
    try:
        loaded = load_adapter(path, dtype=torch.float32)
    except CheckpointError:
        return
    assert mutation[0] == "retype" and mutation[2].is_floating_point, f"{mutation} loaded without an error"
    _loaded_equals_file(loaded, flat, rename=lambda k: k.replace(".cross_attn.processor.", ".cross_attn."))


@BOUNDED
@given(mutation=MUTATIONS)
def test_damaged_transformer_checkpoints(tiny, ckpt_dir, mutation):
    from fantasyportrait_core.weights.keys import transformer_state_dict_original, wan_original_to_diffusers

    sd = _mutate(transformer_state_dict_original(tiny[0]), mutation)
    path = str(ckpt_dir / "wan.safetensors")
    _write(path, sd, mutation)
    try:
        loaded = load_transformer(path, dtype=torch.float32)
    except CheckpointError:
        return
    # Sizes are read from the file, so a self-consistent change of a width may load: then the model
    # must be what the file says (another config, exactly the stored values), never a cast or a crop.
    if not (mutation[0] == "retype" and mutation[2].is_floating_point):
        assert mutation[0] == "reshape" and dict(loaded.config) != dict(tiny[0].config), f"{mutation} loaded silently"
    _loaded_equals_file(loaded, sd, rename=wan_original_to_diffusers)


@pytest.mark.parametrize("key", ["patch_embedding.weight", "text_embedding.0.weight", "img_emb.proj.1.weight"])
def test_reshaped_transformer_keys(tiny, tmp_path, key):
    """The cases a random search may not reach: a damaged patch embedding (once an IndexError) and a
    text projection of another width (loads as what the file says; the sampler then names the mismatch)."""
    from fantasyportrait_core.weights.keys import transformer_state_dict_original, wan_original_to_diffusers

    sd = transformer_state_dict_original(tiny[0])
    sd[key] = sd[key].flatten(1)[:, :-1].contiguous()
    path = str(tmp_path / "wan.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    try:
        loaded = load_transformer(path, dtype=torch.float32)
    except CheckpointError:
        return
    assert key == "text_embedding.0.weight" and loaded.config.text_dim == tiny[0].config.text_dim - 1
    _loaded_equals_file(loaded, sd, rename=wan_original_to_diffusers)


# ----------------------------------------------------------------------------------------------
# Face and mask inputs

FILLS = st.sampled_from(["random", "black", "0..255", "-1..1", "nan", "inf"])


def _image(b, h, w, c, fill, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, h, w, c, generator=g)
    if fill == "black":
        x = torch.zeros(b, h, w, c)
    elif fill == "0..255":
        x = x * 255
    elif fill == "-1..1":
        x = x * 2 - 1
    elif fill in ("nan", "inf") and x.numel():
        x.view(-1)[seed % x.numel()] = float(fill)
    return x


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(b=st.integers(0, 2), h=st.integers(1, 90), w=st.integers(1, 90), c=st.sampled_from([1, 2, 3, 4, 5]),
       fill=FILLS, seed=st.integers(0, 2**16))
def test_face_masks_node_on_odd_images(detector, b, h, w, c, fill, seed):
    image = _image(b, h, w, c, fill, seed)
    valid = b > 0 and min(h, w) >= 32 and c in (1, 3, 4) and fill in ("random", "black")
    cls = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitFaceMasks"]
    try:
        faces, masks, preview = cls().detect(detector, image)
    except InputError as e:
        assert valid == ("no face found" in str(e)), (str(e), valid)
        return
    assert valid, "an invalid image gave faces"
    n = len(faces.faces)
    assert n >= 1 and masks.shape == (n, h, w) and (faces.width, faces.height) == (w, h)
    for f, m in zip(faces.faces, masks):
        x1, y1, x2, y2 = np.round(f.box).astype(int)
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and m.sum() == (x2 - x1) * (y2 - y1)


def _static(box, n=5):
    box = np.asarray(box, float)
    return DrivingExpression(torch.zeros(n, 554),
                             FaceTrack(np.tile(box, (n, 1)), np.zeros((n, 5, 2)), np.ones(n, bool)))


REF = ReferenceFaces([Face(np.array([10.0, 10, 40, 40]), np.zeros((5, 2)), 1.0),
                      Face(np.array([80.0, 10, 110, 40]), np.zeros((5, 2)), 1.0)], 128, 64, None)
DRIVERS = [_static(f.box) for f in REF.faces]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(layout=st.sampled_from(["HW", "NHW", "N1HW", "N2HW", "W", "NHWC5"]), n=st.integers(0, 3),
       size=st.sampled_from([(64, 128), (32, 64), (16, 32), (64, 64), (65, 128), (1, 2), (0, 0), (128, 64)]),
       fill=st.sampled_from(["random", "empty", "nan", "2.0", "-0.5"]), seed=st.integers(0, 2**16))
def test_conditioning_masks_property(layout, n, size, fill, seed):
    h, w = size
    g = torch.Generator().manual_seed(seed)
    shape = {"HW": (h, w), "NHW": (n, h, w), "N1HW": (n, 1, h, w), "N2HW": (n, 2, h, w), "W": (w,),
             "NHWC5": (n, h, w, 1, 1)}[layout]
    m = torch.rand(shape, generator=g) if fill != "empty" else torch.zeros(shape)
    if fill == "nan" and m.numel():
        m.view(-1)[seed % m.numel()] = float("nan")
    elif fill in ("2.0", "-0.5") and m.numel():
        m.view(-1)[seed % m.numel()] = float(fill)
    count = 1 if layout == "HW" else n
    finite_in_range = fill in ("random", "empty") or m.numel() == 0
    valid = (layout in ("HW", "NHW", "N1HW") and count == 2 and h > 0 and w > 0 and finite_in_range
             and abs(w / h - 2.0) <= 0.02)
    cls = nodes.NODE_CLASS_MAPPINGS["FantasyPortraitConditioning"]
    try:
        portrait, _, _ = cls().condition(REF, DRIVERS[:1], 1.0, "left_to_right", "", m, expression_2=DRIVERS[1:])
    except InputError:
        assert not valid, "a valid mask was refused"
        return
    assert valid, f"an invalid mask {tuple(shape)} ({fill}) was accepted"
    flat = m.reshape(2, h, w)
    for given_mask, used in zip(flat, portrait.user_masks):
        if given_mask.max() > 0.5:
            torch.testing.assert_close(used, given_mask)
        else:
            assert used is None  # an empty mask keeps the automatic region


def test_text_to_video_transformer_is_named(tiny, tmp_path):
    """Wan2.1 T2V (no CLIP image branch) instead of I2V: a one-line error saying which model is needed."""
    from fantasyportrait_core.weights.keys import transformer_state_dict_original

    sd = {k: v for k, v in transformer_state_dict_original(tiny[0]).items() if "img" not in k}
    # T2V: 16 input channels (noise only)
    t2v = dict(sd, **{"patch_embedding.weight": sd["patch_embedding.weight"][:, :16]})
    path = str(tmp_path / "t2v.safetensors")
    save_file({k: v.contiguous() for k, v in t2v.items()}, path)
    with pytest.raises(CheckpointError, match="is not Wan2.1-I2V .*needs Wan2.1-I2V-14B 480P or 720P"):
        load_transformer(path)
    # 36 input channels without the image branch: one Wan2.2-I2V-A14B expert, named as such
    path = str(tmp_path / "expert.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with pytest.raises(CheckpointError, match="one Wan2.2-I2V-A14B expert .*or a Wan2.1-I2V-14B file"):
        load_transformer(path)
