"""The coordinator's results file: start, refuse to overwrite, resume only with the same teacher."""

import pytest

from moma_core.report import write_json
from server.results import RunResults


def test_resume_refuses_another_teacher(tmp_path):
    results = RunResults(tmp_path)
    assert results.start({"run-name": "x"}, "a" * 64, resume=False) == 1
    write_json(results.path, results.data)
    with pytest.raises(ValueError, match="exists"):
        RunResults(tmp_path).start({}, "a" * 64, resume=False)
    with pytest.raises(ValueError, match="same teacher"):
        RunResults(tmp_path).start({}, "b" * 64, resume=True)
    assert RunResults(tmp_path).start({}, "a" * 64, resume=True) == 1
