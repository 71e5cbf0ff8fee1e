"""pytest's setup for the notebooks it executes (nbmake, tests/test_browser.py's JupyterLab).

1. Every kernel started from this test run loads kernel_wakeup.py as an IPython startup file, through a private
   IPYTHONDIR (students' own IPython settings are not touched): it takes a request that zmq failed to announce
   off the shell socket within 0.5 s, where the kernel would otherwise wait forever (see that file).
2. A notebook that fails is run once more (pytest-rerunfailures), so that a kernel that stalls for a reason
   not covered by 1 costs one rerun, not the run; a notebook that fails twice fails the run.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_ipython_dir = Path(tempfile.mkdtemp(prefix="minillama-ipython-"))
atexit.register(shutil.rmtree, _ipython_dir, ignore_errors=True)
(_ipython_dir / "profile_default" / "startup").mkdir(parents=True)
shutil.copy(Path(__file__).with_name("kernel_wakeup.py"), _ipython_dir / "profile_default" / "startup" / "00_wakeup.py")
os.environ["IPYTHONDIR"] = str(_ipython_dir)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.flaky(reruns=1))
