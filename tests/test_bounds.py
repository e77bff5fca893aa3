"""One set of numeric bounds: the nodes' widgets accept exactly what the CLI and the job accept
(``runtime.job.BOUNDS``)."""

import pytest

from fantasyportrait_core.runtime.job import BOUNDS, check_bound
from fantasyportrait_core.validate import InputError
from nodes.native import FantasyPortraitGuider
from nodes.portrait import FantasyPortraitConditioning, FantasyPortraitEncodeExpression
from nodes.sampler import FantasyPortraitSampler

WIDGETS = [(FantasyPortraitSampler, name) for name in ("seed", "steps", "cfg", "portrait_cfg", "shift",
                                                          "context_frames")]
WIDGETS += [(FantasyPortraitGuider, "cfg"), (FantasyPortraitGuider, "portrait_cfg"),
            (FantasyPortraitConditioning, "portrait_scale"), (FantasyPortraitEncodeExpression, "smooth")]


def _widget(node, name):
    inputs = node.INPUT_TYPES()
    return {**inputs["required"], **inputs.get("optional", {})}[name][1]


@pytest.mark.parametrize("node, name", WIDGETS, ids=[f"{n.__name__}.{w}" for n, w in WIDGETS])
def test_widget_limits_are_the_job_bounds(node, name):
    lo, hi, lo_open, _ = BOUNDS[name]
    spec = _widget(node, name)
    assert spec["max"] == hi
    check_bound(name, spec["min"])  # the widget's smallest value is a valid job value
    check_bound(name, spec["max"])
    check_bound(name, spec["default"])
    if lo_open:
        assert lo < spec["min"] <= lo + spec.get("step", 0.01)
        with pytest.raises(InputError):
            check_bound(name, lo)
    else:
        assert spec["min"] == lo
    with pytest.raises(InputError):
        check_bound(name, hi + 1)
