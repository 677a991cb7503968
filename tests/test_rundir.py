import pytest

from branchspec.errors import BranchspecError
from branchspec.rundir import RunDir


def test_check_same_run_compares_nested_settings_and_skips_free_keys(tmp_path):
    run = RunDir(tmp_path / "r")
    run.check_same_run({"a": 1})  # nothing stored yet: any config starts a run
    run.write_config({"a": 1, "device": "cpu", "recipe": {"lr": 0.1, "precision": "32-true"}})
    free = {"device", "precision"}
    run.check_same_run({"a": 1, "device": "cuda", "recipe": {"lr": 0.1, "precision": "bf16-mixed"}}, free)
    with pytest.raises(BranchspecError, match=r"differs in recipe\.lr\)"):
        run.check_same_run({"a": 1, "device": "cpu", "recipe": {"lr": 0.2, "precision": "32-true"}}, free)
    with pytest.raises(BranchspecError, match=r"differs in b, device\)"):
        run.check_same_run({"a": 1, "b": 2, "device": "cuda", "recipe": {"lr": 0.1, "precision": "32-true"}})
