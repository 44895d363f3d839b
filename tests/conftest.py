"""Suite-wide reporting: a failure inside nested trio nurseries arrives as exception
groups nested deeper than the traceback printer's limit of 10, which then hides the
line that failed. Each failing test's report gets a section with the leaf exceptions."""

from __future__ import annotations

import traceback

import pytest


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and isinstance(call.excinfo.value, BaseExceptionGroup):
        leaves = leaf_exceptions(call.excinfo.value)
        text = "\n".join("".join(traceback.format_exception(leaf, limit=-8)) for leaf in leaves)
        report.sections.append(("leaf exceptions of the exception group", text))
    return report
