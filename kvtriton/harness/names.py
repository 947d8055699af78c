"""The names the library registers, as the harness checks and maps them: model presets, eviction policies
(and their aliases), workload generators."""

from __future__ import annotations


def model_presets() -> dict:
    """The model presets by name (``kvtriton.spec.PRESETS``)."""
    from kvtriton.spec import PRESETS

    return PRESETS


def policy_names() -> list[str] | None:
    """Registered policy names and aliases (None while no policy is registered)."""
    from kvtriton.policies import available_policies

    return available_policies(include_aliases=True) or None


def canonical_policy(name: str) -> str | None:
    """The registered name of policy ``name`` (an alias maps to it), or None for an unknown name."""
    from kvtriton.policies import canonical_name

    try:
        return canonical_name(name)
    except ValueError:
        return None


def offline_policies() -> tuple[str, ...]:
    """Policies that need the trace's future (the fast replay only)."""
    from kvtriton.policies import offline_policies as offline

    return tuple(offline())


def workload_names() -> list[str]:
    """The registered workload generators' names."""
    from kvtriton import workloads

    return workloads.available_workloads()


def policy_class(name: str):
    """The class of policy ``name`` (an alias maps to its policy)."""
    from kvtriton.policies import make_policy

    return type(make_policy(canonical_policy(name) or name))
