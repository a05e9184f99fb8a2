"""Run in the lowest-versions environment: every dependency of shardprop has a lower and an upper
bound, and the version installed is its lower bound, so that .ci/lowest.txt tests what
pyproject.toml promises."""

import sys
from importlib.metadata import requires, version

from packaging.requirements import Requirement
from packaging.version import Version


def problems() -> list[str]:
    found = []
    for line in requires("shardprop") or []:
        requirement = Requirement(line)
        if requirement.marker is not None:  # an extra's (test) dependency
            continue
        bounds = {spec.operator: spec.version for spec in requirement.specifier}
        if ">=" not in bounds or "<" not in bounds:
            found.append(f"{requirement.name}: needs a lower (>=) and an upper (<) bound")
            continue
        installed = version(requirement.name)
        if Version(installed) != Version(bounds[">="]):
            found.append(
                f"{requirement.name}: {installed} installed, lower bound {bounds['>=']}"
                " (keep .ci/lowest.txt and pyproject.toml in step)"
            )
    return found


if __name__ == "__main__":
    found = problems()
    for problem in found:
        print(f"error: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
