import pytest

from ztt_cli.errors import LayoutError
from ztt_cli.model.layout import Layout
from ztt_cli.surgery.strategies import source_layers


@pytest.mark.parametrize(
    "n,given,expected",
    [
        (30, {}, (10, 5, 2, 10)),
        (24, {}, (8, 4, 2, 8)),
        (6, {}, (2, 1, 2, 2)),
        (5, {}, (2, 1, 2, 1)),
        (30, {"block": 11, "cycles": 2}, (4, 11, 2, 4)),
        (30, {"head": 4, "tail": 4}, (4, 11, 2, 4)),
        (30, {"head": 4, "tail": 4, "cycles": 1}, (4, 22, 1, 4)),
        (30, {"head": 0, "tail": 0, "block": 10, "cycles": 3}, (0, 10, 3, 0)),
        (30, {"head": 6, "block": 7}, (6, 7, 2, 10)),
        (30, {"head": 12}, (12, 3, 2, 12)),
    ],
)
def test_resolve(n, given, expected):
    lay = Layout.for_source(n, **given)
    assert (lay.head, lay.block, lay.cycles, lay.tail) == expected
    assert lay.depth == n


@pytest.mark.parametrize(
    "given,words",
    [
        ({"head": 15, "tail": 15}, "leaves no middle"),
        ({"head": 20, "tail": 12}, "leaves no middle"),
        ({"head": 10, "tail": 10, "block": 3, "cycles": 2}, "not divisible"),
        ({"head": 10, "tail": 9, "cycles": 2}, "not divisible"),
        ({"block": 0}, "at least 1"),
        ({"cycles": 0}, "at least 1"),
        ({"head": -1}, "negative"),
        ({"block": 20, "cycles": 2}, "needs more"),
    ],
)
def test_resolve_errors(given, words):
    with pytest.raises(LayoutError, match=words):
        Layout.for_source(30, **given)


def test_slots_and_bound():
    lay = Layout(4, 11, 2, 4)
    slots = lay.slots()
    assert len(slots) == 30 and [s.index for s in slots] == list(range(30))
    assert [s.unique for s in slots[4:15]] == [s.unique for s in slots[15:26]] == list(range(4, 15))
    assert {s.cycle for s in slots[4:15]} == {1} and {s.cycle for s in slots[15:26]} == {2}
    assert slots[0].cycle is None and slots[-1].unique == 18
    assert lay.speedup_bound == pytest.approx(30 / 19)
    assert str(lay) == "4/11×2/4"


def test_init_strategies_pick_documented_layers():
    lay = Layout(2, 3, 2, 1)  # 9 layers, middle span m = source layers 2..7
    assert source_layers(lay, 9, "lower")[2:5] == [[2], [3], [4]]
    assert source_layers(lay, 9, "upper")[2:5] == [[5], [6], [7]]
    assert source_layers(lay, 9, "stepwise")[2:5] == [[2], [4], [6]]
    assert source_layers(lay, 9, "average")[2:5] == [[2, 5], [3, 6], [4, 7]]
    assert source_layers(lay, 9, "lower")[:2] == [[0], [1]] and source_layers(lay, 9, "lower")[5:] == [[8]]


def test_parse_is_the_inverse_of_str():
    from ztt_cli.model.layout import Layout

    for layout in (Layout(4, 11, 2, 4), Layout(0, 15, 2, 0), Layout(10, 5, 2, 10)):
        assert Layout.parse(str(layout)) == layout
    assert Layout.parse("4/11x2/4").depth == 30


def test_a_layout_error_names_its_fields_for_the_reporter_to_spell():
    """The model code knows no command line: its hints name the sizes as fields, which the command
    line spells as flags and a recipe run as keys; left alone they read as the bare names."""
    with pytest.raises(LayoutError) as caught:
        Layout.for_source(30, block=20, cycles=2)
    e = caught.value
    assert e.fields == ("block", "cycles") and e.hint == "choose a smaller block or fewer cycles"
    assert e.spelled(lambda f: "--" + f)[1] == "choose a smaller --block or fewer --cycles"
    with pytest.raises(LayoutError) as caught:
        Layout.for_source(30, head=-1)
    assert caught.value.message == "head must not be negative (got -1)"
    assert caught.value.spelled(lambda f: f"convert.{f}")[0] == "convert.head must not be negative (got -1)"
