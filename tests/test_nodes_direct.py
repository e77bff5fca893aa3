"""Direct Expression / Save Performance / Load Performance nodes, run as ComfyUI runs them (no
ComfyUI needed): directions reach the sampler through Conditioning against the animated face's
baseline, s = 1 and a saved-and-loaded performance give the identical latent."""

import numpy as np
import pytest
import torch

from fantasyportrait_core.drive.direction import CHANNEL_SLICES, baseline_features
from fantasyportrait_core.drive.performance import load_performance
from fantasyportrait_core.validate import InputError
from nodes.direct import FantasyPortraitDirectExpression, DirectedExpression
from nodes.portrait import ReferenceFaces

from .test_direction import _driver
from .test_nodes import run
from .test_nodes_fast import _sample, setup  # noqa: F401  (module fixture: tiny model through the loader)


@pytest.fixture(scope="module")
def ref():
    """A 64×64 reference with one face (faces as Face Masks gives them)."""
    from fantasyportrait_core.faces.face import Face

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    face = Face(np.array([20.0, 16.0, 44.0, 44.0]), np.array([[27, 26], [37, 26], [32, 32], [28, 38], [36, 38]],
                                                             dtype=float), 0.99)
    return ReferenceFaces([face], 64, 64, image)


def _condition(faces, expression):
    portrait, _, _ = run("FantasyPortraitConditioning", faces=faces, expression=expression, portrait_scale=1.0,
                         assignment="left_to_right", face_order="")
    return portrait


def _direct(encoder, faces, expression, **kw):
    args = dict(expression=expression, expression_encoder=encoder, faces=faces, head_pose=1.0, eyes=1.0, emotion=1.0,
                mouth=1.0, motion="absolute", neutral_frame=0)
    args.update(kw)
    return run("FantasyPortraitDirectExpression", **args)


def test_direct_node_reaches_the_sampler_against_the_portraits_face(setup, ref, tiny, tmp_path):  # noqa: F811
    encoder = tiny[3]
    drivers = [_driver(5)]
    plain = _sample(setup, portrait=_condition(ref, drivers))
    (same, info) = _direct(encoder, ref, drivers, mouth_keys="", head_pose=1.0)
    assert same == drivers and "unchanged" in info
    assert torch.equal(_sample(setup, portrait=_condition(ref, same)), plain)

    directed, info = _direct(encoder, ref, drivers, head_pose=0.0, mouth_keys="0:1, 4:0.5")
    assert isinstance(directed[0], DirectedExpression) and "head_pose=0, mouth=0:1, 4:0.5" in info
    portrait = _condition(ref, directed)
    feats = portrait.drivers[0].features
    base = baseline_features(encoder, ref.image, ref.faces)[0]
    hp, m = CHANNEL_SLICES["head_pose"], CHANNEL_SLICES["mouth"]
    assert torch.equal(feats[:, hp], base[hp].expand(5, -1))  # the portrait's own head pose on every frame
    assert torch.equal(feats[0, m], drivers[0].features[0, m])  # mouth key 1 at frame 0
    torch.testing.assert_close(feats[4, m], base[m] + 0.5 * (drivers[0].features[4, m] - base[m]))
    assert torch.equal(feats[:, 6:42], drivers[0].features[:, 6:42])  # eyes, emotion untouched
    assert not torch.equal(_sample(setup, portrait=portrait), plain)

    # relative motion, chained after the first direction, on the same character
    (rel, _) = _direct(encoder, ref, directed, motion="relative", neutral_frame=2, character=0)
    assert len(rel[0].directions) == 2
    assert torch.equal(_condition(ref, rel).drivers[0].features[2], base)
    (kept, info) = run("FantasyPortraitSavePerformance", expression=rel, filename_prefix=str(tmp_path / "d"))
    assert kept == rel and "not saved" in info
    assert torch.equal(load_performance(str(tmp_path / "d_00001_.safetensors")).features, drivers[0].features)


def test_direct_node_bad_input(ref, tiny):
    encoder = tiny[3]
    assert "must increase" in FantasyPortraitDirectExpression.VALIDATE_INPUTS(mouth_keys="0:1, 40:0.3, 20:1")
    assert "between 0 and 2, got 2.5" in FantasyPortraitDirectExpression.VALIDATE_INPUTS(eyes_keys="0:1, 4:2.5")
    assert FantasyPortraitDirectExpression.VALIDATE_INPUTS(mouth_keys="0:1, 4:0.3") is True
    with pytest.raises(InputError, match="key at frame 40 is outside character 0's expression"):
        _direct(encoder, ref, [_driver(5)], mouth_keys="0:1, 40:0.3")
    with pytest.raises(InputError, match="character 3: this expression has 1"):
        _direct(encoder, ref, [_driver(5)], head_pose=0.0, character=3)
    directed, _ = _direct(encoder, ref, [_driver(5)], head_pose=0.0)
    other = ReferenceFaces([type(ref.faces[0])(ref.faces[0].box + 5, ref.faces[0].landmarks + 5, 0.9)], 64, 64,
                           ref.image)
    with pytest.raises(InputError, match="same Face Masks output"):
        _condition(other, directed)


def test_saved_and_loaded_performance_gives_the_identical_latent(setup, ref, tmp_path):  # noqa: F811
    drivers = [_driver(5)]
    plain = _sample(setup, portrait=_condition(ref, drivers))
    passed, info = run("FantasyPortraitSavePerformance", expression=drivers,
                       filename_prefix=str(tmp_path / "perf" / "take"))
    assert passed == drivers
    path = tmp_path / "perf" / "take_00001_.safetensors"
    assert path.is_file() and "take3.mp4 #1: 5 frames at 25 fps" in info
    run("FantasyPortraitSavePerformance", expression=drivers + drivers, filename_prefix=str(tmp_path / "perf" / "take"))
    assert sorted(p.name for p in (tmp_path / "perf").iterdir()) == [  # the next save counts on, per character
        "take_00001_.safetensors", "take_00002_.safetensors", "take_00002_1.safetensors"]
    (loaded, info) = run("FantasyPortraitLoadPerformance", performance=str(path), fps=25.0, speed=1.0, start_frame=0,
                         end_frame=0, frames=0, loop="none")
    assert torch.equal(loaded[0].features, drivers[0].features) and "1 without a face" in info
    assert torch.equal(_sample(setup, portrait=_condition(ref, loaded)), plain)
    # trimmed, twice as fast, looped
    (looped, info) = run("FantasyPortraitLoadPerformance", performance=str(path), fps=25.0, speed=2.0, start_frame=1,
                         end_frame=5, frames=5, loop="repeat")
    assert torch.equal(looped[0].features, drivers[0].features[[1, 3, 1, 3, 1]])
    with pytest.raises(InputError, match="has 2 frames .* but 5 were asked"):
        run("FantasyPortraitLoadPerformance", performance=str(path), fps=25.0, speed=2.0, start_frame=1, end_frame=5,
            frames=5, loop="none")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x" * 20)
    with pytest.raises(InputError, match="performance .* is not a saved FantasyPortrait performance"):
        run("FantasyPortraitLoadPerformance", performance=str(bad), fps=25.0, speed=1.0, start_frame=0, end_frame=0,
            frames=0, loop="none")


def test_directed_workflow_is_consistent_with_the_nodes():
    """The example graph: every widget list matches its node, the saved performance feeds Direct Expression
    (head pose 0, the mouth curve), which feeds Conditioning together with the same Face Masks."""
    import json
    import os

    from fantasyportrait_core.drive.direction import parse_keys

    from .conftest import ROOT
    from .test_nodes import MAPPINGS, NATIVE, _widget_count

    with open(os.path.join(ROOT, "workflows", "fantasyportrait_directed.json")) as f:
        wf = json.load(f)
    types = {n["type"] for n in wf["nodes"]}
    assert {"FantasyPortraitDirectExpression", "FantasyPortraitLoadPerformance",
            "FantasyPortraitSavePerformance"} <= types and types - set(MAPPINGS) <= NATIVE
    for n in wf["nodes"]:
        if n["type"] in MAPPINGS:
            assert len(n["widgets_values"]) == _widget_count(MAPPINGS[n["type"]].INPUT_TYPES()), n["type"]
    by_id = {n["id"]: n for n in wf["nodes"]}

    def source(node, name):
        slot = next(i for i, s in enumerate(node["inputs"]) if s["name"] == name)
        link = next(l for l in wf["links"] if l[3] == node["id"] and l[4] == slot)
        return by_id[link[1]]

    direct = next(n for n in wf["nodes"] if n["type"] == "FantasyPortraitDirectExpression")
    cond = next(n for n in wf["nodes"] if n["type"] == "FantasyPortraitConditioning")
    head_pose, mouth_keys = direct["widgets_values"][0], direct["widgets_values"][9]
    assert head_pose == 0.0 and len(parse_keys(mouth_keys).keys) == 3
    assert source(direct, "expression")["type"] == "FantasyPortraitLoadPerformance"
    assert source(cond, "expression") is direct
    assert source(direct, "faces") is source(cond, "faces")
