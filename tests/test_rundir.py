"""`RunDir`: the one owner of the run directory's layout."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import torch

import thermo
from thermo.rundir import RunDir
from thermo.store import StepRecord

ROOT = Path(thermo.__file__).parent


def test_no_module_but_rundir_spells_a_run_file_name():
    found = []
    for path in ROOT.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RunDir.file_names():
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.arguments):  # "checkpoints" is also a JSON key: only defaults
                found += [f"{path.relative_to(ROOT)}:{d.lineno} {d.value!r}" for d in node.defaults + node.kw_defaults
                          if isinstance(d, ast.Constant) and d.value == RunDir.CHECKPOINTS]
    assert not found, "run-directory file names spelt outside thermo/rundir.py: " + ", ".join(found)


def test_a_rundir_is_a_path_everywhere_and_opens_what_it_holds(tmp_path):
    real = tmp_path / "disk" / "exp 1#a"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)  # a run directory reached through a symlink
    run = RunDir(tmp_path / "link")
    assert os.fspath(run) == str(tmp_path / "link") and RunDir(run) == run
    assert not run.holds_run()
    with run.store() as store:
        store.write([StepRecord(step=0, scalars={"loss": 2.0})])
    run.load_blacklist().add([3, 4], reason="test", source="user")
    ckpts = run.checkpoints(thermo.CheckpointConfig(good_after=0))
    model = torch.nn.Linear(2, 2)
    ckpts.save(1, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert run.holds_run()
    assert {p.name for p in real.iterdir()} >= {RunDir.DB, RunDir.MANIFEST, RunDir.BLACKLIST, RunDir.CHECKPOINTS}
    assert run.read().scalars["loss"].tolist() == [2.0]
    assert sorted(RunDir(real).load_blacklist()) == [3, 4]
    assert [e.step for e in RunDir(real).checkpoints().entries] == [1]
