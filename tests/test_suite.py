"""The test suite's own set-up: what `make test` relies on to finish in time on two cores."""

from __future__ import annotations

import pytest

GROUP = "suite"
pytestmark = pytest.mark.xdist_group(GROUP)


def test_grouped_modules_reach_one_worker(request: pytest.FixtureRequest) -> None:
    """Modules that share costly module fixtures (accuracy, parallel, gguf, tekken) mark their
    tests with an `xdist_group`; under `--dist loadgroup` pytest-xdist appends the group to each
    test's id, and its scheduler sends every test of one suffix to one worker. When the suffix is
    missing (pytest 9.2 with pytest-xdist 3.8), both workers build each of those fixtures, and
    the suite only runs longer, with nothing failing. `make test` runs under loadgroup."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup (make test does)")
    assert request.node.nodeid.endswith(f"@{GROUP}"), (
        f"pytest-xdist's group did not reach the scheduler: test id {request.node.nodeid!r} "
        f"(pytest {pytest.__version__}); see the pytest pin in pyproject.toml")
