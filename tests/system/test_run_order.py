"""The dependency graph that decides which notebooks may start, checked by hand on the study's
own shape: 03 reuses 01's teacher, 07 reads 01-06, 08 reports on everything and still runs when
something upstream failed."""
import pytest

from cxrstudy.pipeline.order import DependencyCycleError, RunProgress, dependency_order

STUDY = ["00", "01", "02", "03", "04", "05", "06", "07", "08"]
DEPENDS_ON = {"03": ["01"], "07": ["01", "02", "03", "04", "05", "06"],
              "08": ["00", "01", "02", "03", "04", "05", "06", "07"]}


def study_schedule(names=STUDY):
    return RunProgress(names, DEPENDS_ON, runs_after_failed_upstream=["08"])


def simulate(schedule, workers, fail=()):
    """Start what is ready on free workers; the notebook started first finishes first.
    Returns the start order and the set of notebooks running beside each one at its start."""
    started, running, beside = [], [], {}
    while not schedule.done:
        for name in schedule.ready():
            if len(running) == workers:
                break
            schedule.start(name)
            if schedule.blocked_by(name):
                schedule.finish(name, ok=False)
                continue
            started.append(name)
            beside[name] = set(running)
            running.append(name)
        if not running:
            continue  # blocked ones finished: others may be ready now
        name = running.pop(0)
        schedule.finish(name, ok=name not in fail)
    return started, beside


def test_first_ready_are_the_notebooks_without_upstream():
    schedule = study_schedule()
    assert schedule.ready() == ["00", "01", "02", "04", "05", "06"]
    schedule.start("01")
    schedule.finish("01", ok=True)
    assert schedule.ready() == ["00", "02", "03", "04", "05", "06"]


def test_two_workers_run_in_study_order_and_07_08_wait_for_their_upstream():
    started, beside = simulate(study_schedule(), workers=2)
    # by hand: 00+01; 00 ends → 02; 01 ends → 03 (now ready, and first in study order);
    # 02 ends → 04; 03 → 05; 04 → 06; 05 ends, 07 still waits for 06; 06 → 07; 07 → 08
    assert started == STUDY
    assert beside["00"] == set() and beside["01"] == {"00"} and beside["03"] == {"02"}
    assert beside["07"] == set() and beside["08"] == set()  # each alone, at the end


def test_a_failed_upstream_blocks_only_its_dependents():
    schedule = study_schedule()
    for name in ["00", "01", "02"]:
        schedule.start(name)
    schedule.finish("01", ok=False)
    assert "03" in schedule.ready() and schedule.blocked_by("03") == ["01"]
    assert schedule.blocked_by("04") == []  # another branch carries on
    schedule.finish("02", ok=True)
    assert schedule.blocked_by("02") == []


def test_blocking_passes_down_the_graph_but_not_to_the_report():
    started, _ = simulate(study_schedule(), workers=3, fail={"01"})
    # 03 (needs 01) and 07 (needs 01 and 03) never start; 08 reports on what is there
    assert started == ["00", "01", "02", "04", "05", "06", "08"]


def test_upstream_outside_this_run_is_not_waited_for():
    schedule = study_schedule(["03", "08"])
    assert schedule.ready() == ["03"]  # 01 is not run now: its last result is used
    schedule.start("03")
    schedule.finish("03", ok=True)
    assert schedule.ready() == ["08"]


def test_dependency_order_pulls_upstream_forward_and_keeps_the_rest():
    assert dependency_order(["03", "02", "01"], DEPENDS_ON) == ["01", "03", "02"]
    assert dependency_order(["08", "03", "01"], DEPENDS_ON) == ["01", "03", "08"]
    assert dependency_order(STUDY, DEPENDS_ON) == STUDY


def test_a_cycle_is_named():
    with pytest.raises(DependencyCycleError, match="01 → 03 → 01"):
        dependency_order(["01", "03"], {"01": ["03"], "03": ["01"]})


def test_starting_too_early_or_finishing_twice_is_refused():
    schedule = study_schedule()
    with pytest.raises(ValueError, match="03 is not ready"):
        schedule.start("03")
    schedule.start("00")
    schedule.finish("00", ok=True)
    with pytest.raises(ValueError, match="00 was not started"):
        schedule.finish("00", ok=True)
