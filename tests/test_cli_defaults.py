"""One source of defaults: every option a command leaves at its default gives the config dataclass's default.

The CLI builds its configs from the parsed options (``cli/*.py``); this checks, command by command, that the
config built from a command line with only the required options equals the dataclass built with no argument,
field by field (nested recipes included). A field the CLI sets on purpose is listed with its reason.
"""

import dataclasses

import pytest

from branchspec.analysis.nad import SearchSettings
from branchspec.cli import build_parser, classify, decompose, hessian, nad, parts, toy
from branchspec.studies.classify import ClassifyConfig
from branchspec.studies.decompose import DecomposeConfig
from branchspec.studies.hessian import HessianConfig
from branchspec.studies.nad import EvalConfig, NADConfig
from branchspec.studies.parts import PartsConfig
from branchspec.studies.toy import ToyDynamicsConfig, ToySweepConfig


def parse(*argv):
    return build_parser().parse_args(list(argv))


def differences(made, default, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(default):
        a, b = getattr(made, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(b):
            out += differences(a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append(f"{prefix}{f.name}: CLI {a!r}, dataclass {b!r}")
    return out


CASES = [
    ("classify train", lambda: classify._config(parse("classify", "train", "--out", "x"), 16), ClassifyConfig(), {}),
    ("decompose train", lambda: decompose.train_config(parse("decompose", "train", "--out", "x")), DecomposeConfig(),
     {}),
    ("hessian", lambda: hessian.hessian_config(parse("hessian", "--run", "r")), HessianConfig(run="r"), {}),
    ("nad search", lambda: nad.search_config(parse("nad", "search", "--run", "r")), NADConfig(run="r"), {}),
    ("nad evaluate", lambda: nad.evaluate_config(parse("nad", "evaluate", "--run", "r")), EvalConfig(), {}),
    ("toy sweep", lambda: toy.sweep_config(parse("toy", "sweep", "--out", "x")), ToySweepConfig(), {}),
    ("toy dynamics", lambda: toy.dynamics_config(parse("toy", "dynamics", "--out", "x")), ToyDynamicsConfig(), {}),
]


@pytest.mark.parametrize("name, build, default, allowed", CASES, ids=[c[0] for c in CASES])
def test_cli_defaults_equal_the_dataclass_defaults(name, build, default, allowed):
    found = [d for d in differences(build(), default) if d.split(":")[0] not in allowed]
    assert not found, f"{name}: " + "; ".join(found)


def test_the_parts_command_defaults():
    args = parse("parts", "--model", "m.py:f", "--data", "d.pt", "--out", "x")
    default = PartsConfig()
    assert args.limit == default.limit and args.analyses == default.analyses and args.groups == default.groups
    assert SearchSettings().lr == parse("nad", "search", "--run", "r").lr  # spot check of a nested default
