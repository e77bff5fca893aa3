import json
import os

import pytest
import torch

from fantasyportrait_core.model.adapter import EXPRESSION_DIM, TOKENS_PER_FRAME, PortraitAdapter, window_indices, window_tokens
from fantasyportrait_core.model.geometry import floor_to_4k1, latent_frames
from fantasyportrait_core.model.build import TINY_ADAPTER, TINY_TRANSFORMER, build_adapter

from .conftest import REFERENCE


def reference_windows(tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Literal re-statement of the reference's split_audio_adapter_sequence +
    split_tensor_with_padding(expand_length=0), loops and all, as an independent oracle."""
    length = tokens.shape[1]
    per_frame = length / num_frames
    per_latent = per_frame * 4
    half = per_latent / 2
    pos = []
    for i in range(int((num_frames - 1) / 4) + 1):
        if i == 0:
            pos.append(0)
        else:
            begin = per_frame * ((i - 1) * 4 + 1)
            end = per_frame * (i * 4 + 1)
            pos.append(int((begin + end) / 2) - 1)
    ranges = [[p - int(half), p + int(half)] for p in pos]
    ranges[0] = [-(int(half) * 2 - ranges[1][0]), ranges[1][0]]
    subs = []
    for start, end in ranges:
        pad_front, pad_back = max(-start, 0), max(end - (length - 1), 0)
        part = tokens[:, max(start, 0): min(end, length - 1) + 1]
        subs.append(torch.nn.functional.pad(part, (0, 0, 0, pad_back + pad_front)))
    return torch.stack(subs, dim=1)


@pytest.mark.parametrize("num_frames", [5, 9, 21, 81])
def test_windows_match_reference_split(num_frames):
    tokens = torch.randn(2, num_frames * TOKENS_PER_FRAME, 8)
    ours = window_tokens(tokens, num_frames)
    ref = reference_windows(tokens, num_frames)
    assert ours.shape == ref.shape == (2, latent_frames(num_frames), 97, 8)
    assert torch.equal(ours, ref)


def test_window_layout_at_81_frames():
    idx = window_indices(81)
    assert idx.shape == (21, 97)
    # latent frame 0: pixel frame 0's 24 tokens, then 73 zero pads at the back
    assert idx[0, :24].tolist() == list(range(24)) and (idx[0, 24:] == -1).all()
    # latent frame 1: last token of frame 0, then frames 1..4
    assert idx[1].tolist() == list(range(23, 120))
    # last latent frame ends on the last token of frame 80
    assert idx[-1, -1].item() == 81 * 24 - 1


def test_frame_count_rules():
    assert [floor_to_4k1(n) for n in (1, 4, 5, 59, 81, 218)] == [1, 1, 5, 57, 81, 217]
    assert latent_frames(81) == 21
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_frames(80)
    with pytest.raises(ValueError, match="do not match"):
        window_tokens(torch.zeros(1, 10, 4), 5)


def test_expression_token_shapes_and_order():
    adapter = build_adapter(TINY_TRANSFORMER, **TINY_ADAPTER).eval()
    feats = torch.randn(2, 9, EXPRESSION_DIM)
    tokens = adapter.expression_tokens(feats)
    assert tokens.shape == (2, 9 * 24, TINY_ADAPTER["proj_dim"])
    # tokens of frame f depend on frame f's features only, in [proj 4 | mouth 16 | emotion 4] order
    feats2 = feats.clone()
    feats2[:, 3, 42:] += 1.0  # mouth features of frame 3
    diff = (adapter.expression_tokens(feats2) - tokens).abs().sum(-1)[0].view(9, 24)
    assert diff[[0, 1, 2, 4, 5, 6, 7, 8]].max() == 0
    assert (diff[3, 3] > 0) and (diff[3, 4:20] > 0).all()  # mouth projection token + 16 mouth tokens
    assert diff[3, :3].max() == 0 and diff[3, 20:].max() == 0  # headpose/eye/emotion tokens untouched
    with pytest.raises(ValueError, match="554"):
        adapter.expression_tokens(torch.zeros(1, 3, 500))


def test_fresh_adapter_kv_is_zero():
    adapter = build_adapter(TINY_TRANSFORMER, **TINY_ADAPTER)
    k, v = adapter.kv_projections(1)
    assert k.weight.abs().sum() == 0 and v.weight.abs().sum() == 0 and k.bias is None


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="shared reference manifests not present")
def test_state_dict_matches_published_keys():
    with open(os.path.join(REFERENCE, "fp_repacked_keys.json")) as f:
        published = {k: v for k, v in json.load(f).items() if not k.startswith("_") and not k.startswith("pd_fpg.")}
    with torch.device("meta"):
        adapter = PortraitAdapter(dim=5120, num_layers=40)
    ours = {k: list(v.shape) for k, v in adapter.state_dict().items()}
    assert ours == published
