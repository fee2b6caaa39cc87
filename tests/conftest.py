"""Test-run settings: offline model hub, a private ONNX export cache, the shared fixtures (tests/fixtures.py),
and the markers.

CROSSMODAL_CACHE points at a temporary folder for the whole run (removed at the end), so no test reads or
writes the user's real export cache; child processes inherit it. CROSSMODAL_INT8=off keeps `index --precision
auto` on torch: where it would take the int8 tower depends on a speed measured on the machine
(retrieval/model/int8_auto.py), and test vectors must not; tests/test_int8_auto.py turns it back on. Tests
that need a fresh export, or damage one, get a cache of their own (fixtures `own_cache`, `linked_cache`).

Markers: `slow` (tens of seconds or more: CLI index runs, exports, crash loops), `browser` (a real Chromium),
`subprocess` (runs the CLI or Python in a child process). `pytest -m "not slow"` is the quick inner loop;
`make test` runs everything, twice over the CPU features (see the Makefile): CROSSMODAL_CPU_FLAGS fakes
what /proc/cpuinfo says, so the bf16 and the fp32 paths are both covered on any machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEST_CACHE = tempfile.mkdtemp(prefix="crossmodal-test-cache-")
os.environ["CROSSMODAL_CACHE"] = TEST_CACHE  # set, not defaulted: never the user's own cache
os.environ["CROSSMODAL_INT8"] = "off"  # auto precision never switches to int8 on a timing (test_int8_auto.py does)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(TEST_CACHE, ignore_errors=True)

pytest_plugins = ["tests.fixtures", "tests.lab_fixtures"]


def pytest_report_header(config: pytest.Config) -> str:
    from retrieval.hardware import CPU_FLAGS_ENV, cpu_has_fast_bf16

    fake = os.environ.get(CPU_FLAGS_ENV)
    where = f"{CPU_FLAGS_ENV}={fake!r}" if fake is not None else "/proc/cpuinfo"
    return f"crossmodal: CPU features from {where}: fast bf16 {'yes' if cpu_has_fast_bf16() else 'no'}"
