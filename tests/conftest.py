"""Shared test setup: quiet MindSpore logs, keep compile-failure dumps out of the work tree."""
import os
import tempfile

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), "tc2-ms-om"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir():
    """$TC2_SHARED (the project's ../shared); tests needing real TeleChat2 files skip without it."""
    path = os.environ.get("TC2_SHARED")
    if not path:
        pytest.skip("TC2_SHARED is not set: the real TeleChat2 tokenizer/config/data are not available")
    return path
