"""wagpt/schedules.py: golden multipliers for every schedule and cooldown shape, validation,
from_config.

The expected numbers are written out by hand (exact fractions, or cos/sqrt of simple angles given
to 16+ digits) rather than recomputed with the formulas under test.
"""

from types import SimpleNamespace

import pytest

from wagpt.schedules import COOLDOWN_SHAPES, SCHEDULES, LRSchedule, from_config, lr_at, plot

# All numbers below were worked out by hand (with a calculator for cos and sqrt), e.g.
# cos(pi/4) = sqrt(1/2) = 0.7071067811865475, cos(0.95 pi) = -cos(9 deg) = -0.9876883405951378,
# cos(0.99 pi) = -0.9995065603657316, sqrt(0.95) = 0.9746794344808963.


def check(schedule, expected):
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, abs=1e-12), f"step {step}"


def test_warmup_is_the_same_for_every_schedule():
    # (step + 1) / (warmup_iters + 1): step 0 is already non-zero, step warmup_iters is the peak
    for name in SCHEDULES:
        check(LRSchedule(name, max_iters=100, warmup_iters=4),
              {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8, 4: 1.0})
        check(LRSchedule(name, max_iters=100), {0: 1.0})  # no warmup: the peak from step 0


def test_constant():
    check(LRSchedule("constant", max_iters=100, warmup_iters=4),
          {0: 0.2, 3: 0.8, 4: 1.0, 50: 1.0, 99: 1.0, 100: 1.0, 10_000: 1.0})


def test_cosine():
    # warmup 4, decay over steps 4..104 (r = (step - 4) / 100), floor 0.1:
    # mult = 0.1 + 0.9 * (1 + cos(pi r)) / 2
    check(LRSchedule("cosine", max_iters=104, warmup_iters=4, min_lr_frac=0.1), {
        0: 0.2, 3: 0.8,
        4: 1.0,                                        # r = 0
        29: 0.8681980515339464,  # r = 1/4: 0.1 + 0.9 * (1 + 0.7071067811865475) / 2
        54: 0.55,                # r = 1/2: 0.1 + 0.9 / 2
        79: 0.2318019484660536,  # r = 3/4: 0.1 + 0.9 * (1 - 0.7071067811865475) / 2
        103: 0.1002220478354208,  # r = 99/100: 0.1 + 0.9 * (1 - 0.9995065603657316) / 2
        104: 0.1,                # r = 1: lr_decay_iters (= max_iters)
        105: 0.1, 1000: 0.1,     # past it: the floor
    })
    check(LRSchedule("cosine", max_iters=104, warmup_iters=4, min_lr_frac=0.0),
          {4: 1.0, 54: 0.5, 104: 0.0, 200: 0.0})


def test_cosine_lr_decay_iters_before_and_after_max_iters():
    # decay over steps 4..54, then hold the floor for the rest of the run
    check(LRSchedule("cosine", max_iters=104, warmup_iters=4, lr_decay_iters=54),
          {4: 1.0, 29: 0.55, 54: 0.1, 55: 0.1, 103: 0.1, 104: 0.1})
    # decay over steps 4..204: the run ends half way down the cosine
    check(LRSchedule("cosine", max_iters=104, warmup_iters=4, lr_decay_iters=204),
          {4: 1.0, 104: 0.55, 204: 0.1, 205: 0.1})


# f(x) at x = 1/4, 1/2, 19/20 for each shape
SHAPE_VALUES = {
    "linear": (0.75, 0.5, 0.05),
    # (1 + cos(pi/4)) / 2, (1 + 0) / 2, (1 - cos(pi/20)) / 2
    "cosine": (0.8535533905932738, 0.5, 0.006155829702431148),
    # 1 - sqrt(1/4), 1 - sqrt(1/2), 1 - sqrt(0.95)
    "1-sqrt": (0.5, 0.2928932188134525, 0.02532056551910361),
    # 1 - 1/16, 1 - 1/4, 1 - 0.9025 (Hägele et al.'s "square" cooldown)
    "square": (0.9375, 0.75, 0.0975),
}


def test_shape_table_covers_every_shape():
    assert set(SHAPE_VALUES) == set(COOLDOWN_SHAPES)


@pytest.mark.parametrize("shape", COOLDOWN_SHAPES)
def test_wsd_every_shape(shape):
    # max_iters 100, cooldown_frac 0.2: hold 1 on steps 4..79, cool down over 80..100
    quarter, half, last = SHAPE_VALUES[shape]
    schedule = LRSchedule("wsd", max_iters=100, warmup_iters=4, cooldown_frac=0.2,
                          cooldown_shape=shape)
    assert schedule.cooldown_begin == 80
    check(schedule, {
        0: 0.2, 3: 0.8, 4: 1.0, 50: 1.0, 79: 1.0,
        80: 1.0,        # start of the cooldown, x = 0: still the peak
        85: quarter,    # x = 1/4
        90: half,       # x = 1/2
        99: last,       # x = 19/20: the last step a 100-step run executes is not yet the end value
        100: 0.0,       # x = 1: end of the cooldown, final_lr_frac
        101: 0.0, 10_000: 0.0,
    })


@pytest.mark.parametrize("shape", COOLDOWN_SHAPES)
def test_wsd_final_lr_frac(shape):
    # mult = 0.1 + 0.9 * f(x)
    schedule = LRSchedule("wsd", max_iters=100, cooldown_shape=shape, final_lr_frac=0.1)
    # at x = 1/2: 0.1 + 0.9 * (0.5, 0.5, 1 - sqrt(1/2), 0.75)
    expected_half = {"linear": 0.55, "cosine": 0.55, "1-sqrt": 0.3636038969321072, "square": 0.775}
    check(schedule, {0: 1.0, 80: 1.0, 90: expected_half[shape], 100: 0.1, 150: 0.1})


def test_lr_used_at_step_s_is_peak_times_schedule_of_s():
    # linear cooldown from step 4 to step 8 of an 8-step run: steps 4..7 train at 1, .75, .5, .25;
    # step 8 (not executed) is the end value
    schedule = LRSchedule("wsd", max_iters=8, cooldown_start=4, cooldown_shape="linear")
    assert [schedule(s) for s in range(4, 9)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_at(s, 1e-2, schedule) for s in (4, 6)] == pytest.approx([1e-2, 5e-3], abs=1e-15)


@pytest.mark.parametrize("schedule", [
    LRSchedule("constant", max_iters=50, warmup_iters=5),
    LRSchedule("cosine", max_iters=50, warmup_iters=5),
    LRSchedule("cosine", max_iters=50, warmup_iters=5, lr_decay_iters=30, min_lr_frac=0.0),
    *[LRSchedule("wsd", max_iters=50, warmup_iters=5, cooldown_shape=shape, final_lr_frac=final)
      for shape in COOLDOWN_SHAPES for final in (0.0, 0.3)],
    *[LRSchedule("wsd", max_iters=50, warmup_iters=5, cooldown_start=5, cooldown_shape=shape)
      for shape in COOLDOWN_SHAPES],
], ids=lambda s: "-".join(map(str, (s.name, s.cooldown_shape, s.lr_decay_iters,
                                     s.final_lr_frac, s.cooldown_start))))
def test_warmup_rises_then_never_increases(schedule):
    values = [schedule(s) for s in range(schedule.max_iters + 10)]
    warmup, rest = values[:schedule.warmup_iters], values[schedule.warmup_iters:]
    assert all(0 < a < b <= 1 for a, b in zip(warmup, warmup[1:] + [rest[0]]))
    assert rest[0] == 1.0
    assert all(b <= a for a, b in zip(rest, rest[1:]))
    assert min(rest) >= 0


def test_explicit_cooldown_start_wins_over_cooldown_frac():
    schedule = LRSchedule("wsd", max_iters=100, cooldown_frac=0.5, cooldown_start=80,
                          cooldown_shape="linear")
    assert schedule.cooldown_begin == 80
    check(schedule, {50: 1.0, 60: 1.0, 79: 1.0, 80: 1.0, 90: 0.5, 100: 0.0})
    # without it, cooldown_frac 0.5 would already be at 0.8 at step 60
    check(LRSchedule("wsd", max_iters=100, cooldown_frac=0.5, cooldown_shape="linear"), {60: 0.8})


def test_cooldown_frac_truncates_to_whole_steps():
    # 0.36 * 10 = 3.6 -> 3 cooldown steps (the authors' int()): c = 7
    schedule = LRSchedule("wsd", max_iters=10, cooldown_frac=0.36, cooldown_shape="linear")
    assert schedule.cooldown_begin == 7
    check(schedule, {6: 1.0, 7: 1.0, 8: 2 / 3, 9: 1 / 3, 10: 0.0})
    # the example: 0.2 * 1003 = 200.6 -> 200 steps, c = 803 (round() gave 802)
    assert LRSchedule("wsd", max_iters=1003, cooldown_frac=0.2).cooldown_begin == 803
    # cooldown_frac 0: no cooldown, the end value only at max_iters
    check(LRSchedule("wsd", max_iters=10, cooldown_frac=0.0), {0: 1.0, 9: 1.0, 10: 0.0})


@pytest.mark.parametrize("warmup_iters", [0, 2, 4])
def test_branch_a_cooldown_at_the_loaded_step(warmup_iters):
    # a constant run saved at step 4, branched with --cooldown_start=4 --max_iters=8
    constant = LRSchedule("constant", max_iters=8, warmup_iters=warmup_iters)
    branch = LRSchedule("wsd", max_iters=8, warmup_iters=warmup_iters, cooldown_start=4,
                        cooldown_shape="linear")
    assert [branch(s) for s in range(4)] == [constant(s) for s in range(4)]  # same history
    assert [branch(s) for s in range(4, 9)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_cooldown_start_at_the_ends_of_its_range():
    # from the first step (no warmup): x = s / 8
    check(LRSchedule("wsd", max_iters=8, cooldown_start=0, cooldown_shape="linear"),
          {0: 1.0, 2: 0.75, 4: 0.5, 8: 0.0})
    # right after the warmup
    check(LRSchedule("wsd", max_iters=8, warmup_iters=4, cooldown_start=4, cooldown_shape="square"),
          {3: 0.8, 4: 1.0, 6: 0.75, 8: 0.0})
    # at max_iters: constant for the whole run
    check(LRSchedule("wsd", max_iters=8, cooldown_start=8), {0: 1.0, 7: 1.0, 8: 0.0})


@pytest.mark.parametrize("kwargs, field", [
    (dict(name="linear"), "name"),
    (dict(max_iters=0), "max_iters"),
    (dict(max_iters=-5), "max_iters"),
    (dict(max_iters=10.5), "max_iters"),
    (dict(warmup_iters=-1), "warmup_iters"),
    (dict(name="cosine", lr_decay_iters=-1), "lr_decay_iters"),
    (dict(name="cosine", warmup_iters=100), "warmup_iters"),          # warmup == decay end
    (dict(name="cosine", warmup_iters=20, lr_decay_iters=10), "lr_decay_iters"),
    (dict(min_lr_frac=1.5), "min_lr_frac"),
    (dict(min_lr_frac=-0.1), "min_lr_frac"),
    (dict(cooldown_frac=1.2), "cooldown_frac"),
    (dict(cooldown_frac=float("nan")), "cooldown_frac"),
    (dict(final_lr_frac=-0.1), "final_lr_frac"),
    (dict(final_lr_frac=2.0), "final_lr_frac"),
    (dict(cooldown_shape="sqrt"), "cooldown_shape"),
    (dict(cooldown_start=-1), "cooldown_start"),
    (dict(cooldown_start=101), "cooldown_start"),                      # past max_iters
    (dict(warmup_iters=10, cooldown_start=5), "cooldown_start"),       # inside the warmup
    (dict(warmup_iters=90, cooldown_frac=0.2), "cooldown_frac"),       # c = 80 inside the warmup
])
def test_invalid_values_name_the_field(kwargs, field):
    kwargs = {"name": "wsd", "max_iters": 100, **kwargs}
    with pytest.raises(ValueError, match=field):
        LRSchedule(**kwargs)


def test_errors_say_what_to_use_instead():
    with pytest.raises(ValueError, match=r"lr_schedule.*'constant', 'cosine', 'wsd'"):
        LRSchedule("linear", max_iters=10)
    with pytest.raises(ValueError, match=r"'linear', 'cosine', '1-sqrt', 'square'"):
        LRSchedule("wsd", max_iters=10, cooldown_shape="quadratic")
    with pytest.raises(ValueError, match=r"\[10, 100\]"):
        LRSchedule("wsd", max_iters=100, warmup_iters=10, cooldown_start=200)
    with pytest.raises(ValueError, match="step"):
        LRSchedule("constant", max_iters=10)(-1)


def make_cfg(**overrides):
    cfg = dict(lr_schedule="cosine", max_iters=104, warmup_iters=4, lr_decay_iters=None,
               learning_rate=1e-3, min_lr=1e-4, cooldown_frac=0.2, cooldown_start=None,
               cooldown_shape="1-sqrt", final_lr_frac=0.0)
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def test_from_config():
    cosine = from_config(make_cfg())
    assert (cosine.name, cosine.max_iters, cosine.warmup_iters) == ("cosine", 104, 4)
    assert cosine.min_lr_frac == pytest.approx(0.1)  # min_lr / learning_rate
    assert cosine(54) == pytest.approx(0.55) and cosine(104) == pytest.approx(0.1)
    assert lr_at(104, 1e-3, cosine) == pytest.approx(1e-4)  # min_lr

    wsd = from_config(make_cfg(lr_schedule="wsd", max_iters=100, cooldown_start=60,
                               cooldown_shape="square", final_lr_frac=0.5))
    assert (wsd.cooldown_start, wsd.cooldown_shape, wsd.final_lr_frac) == (60, "square", 0.5)
    check(wsd, {60: 1.0, 80: 0.875, 100: 0.5})  # 0.5 + 0.5 * (1 - 1/4)
    # min_lr matters to the cosine alone: a wsd run may use a peak below the default min_lr
    assert from_config(make_cfg(lr_schedule="wsd", learning_rate=5e-5))(0) == 0.2


@pytest.mark.parametrize("overrides, key", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(min_lr=2e-3), "min_lr"),                 # above the peak
    (dict(min_lr=-1e-4), "min_lr"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(lr_schedule="wsd", cooldown_shape="exp"), "cooldown_shape"),
    (dict(lr_schedule="wsd", cooldown_start=200), "cooldown_start"),
    (dict(lr_decay_iters=2), "lr_decay_iters"),
])
def test_from_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        from_config(make_cfg(**overrides))


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    plot({"cosine": LRSchedule("cosine", 20, warmup_iters=2),
          "wsd": LRSchedule("wsd", 20, warmup_iters=2)}, path)
    assert path.stat().st_size > 0
