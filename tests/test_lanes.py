"""The two test lanes: `-m "not e2e"` (unit tests, while editing) and the full suite. A test that
uses a run fixture is `e2e` without being marked by hand; `slow` tests run only when `-m` names
`slow`, so the unit lane never runs them."""

import os
import tomllib

import pytest

from tests.conftest import RUN_FIXTURES
from tests.helpers import REPO

SUITE = """
import pytest

@pytest.fixture(scope="session")
def vae_run():
    return "trained"

@pytest.fixture
def built_on_a_run(vae_run):  # a run fixture used through another fixture, as ldm_run does
    return vae_run

def test_unit():
    pass

def test_uses_a_run(vae_run):
    pass

def test_uses_a_run_indirectly(built_on_a_run):
    pass

@pytest.mark.e2e
def test_marked_by_hand():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.slow
def test_slow_with_a_run(vae_run):
    pass
"""


def ini_options() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["pytest"]["ini_options"]


@pytest.fixture
def made_up_suite(pytester):
    options = ini_options()
    pytester.makeini("[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in options["markers"])
                     + f"addopts = {options.get('addopts', '')}\n")
    # The repository's hook, not a copy of it.
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def selected(pytester, *args) -> set[str]:
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider", "--strict-markers",
                                          *args)
    return {line.split("::")[-1] for line in result.outlines if "::" in line}


def test_markers_are_registered_and_addopts_selects_nothing():
    options = ini_options()
    assert {m.split(":")[0] for m in options["markers"]} >= {"slow", "e2e"}
    # A command-line -m replaces one in addopts: the slow rule lives in conftest.py instead.
    assert "-m" not in options.get("addopts", "").split()


@pytest.mark.parametrize("args, want", [
    ((), {"test_unit", "test_uses_a_run", "test_uses_a_run_indirectly", "test_marked_by_hand"}),
    (("-m", "not e2e"), {"test_unit"}),
    (("-m", "e2e"), {"test_uses_a_run", "test_uses_a_run_indirectly", "test_marked_by_hand"}),
    (("-m", "slow"), {"test_slow", "test_slow_with_a_run"}),
    (("-m", "slow and not e2e"), {"test_slow"}),
    (("-m", "not slow"), {"test_unit", "test_uses_a_run", "test_uses_a_run_indirectly", "test_marked_by_hand"}),
])
def test_lanes_select(made_up_suite, args, want):
    assert selected(made_up_suite, *args) == want


def test_every_test_of_this_session_that_uses_a_run_is_e2e(request):
    items = request.session.items
    with_runs = [item.nodeid for item in items if RUN_FIXTURES.intersection(item.fixturenames)]
    assert all(item.get_closest_marker("e2e") for item in items if item.nodeid in with_runs)
    if "not e2e" in request.config.getoption("markexpr"):
        assert not with_runs, with_runs
    assert not [item.nodeid for item in items if item.get_closest_marker("slow")
                and "slow" not in request.config.getoption("markexpr")]
