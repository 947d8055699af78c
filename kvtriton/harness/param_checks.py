"""Checks of a config against the library before anything runs: the ``*.params`` against the signatures and
own checks of the generator, the policy's constructor and the replay, and the pool against the workload's
largest request."""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections import OrderedDict
from typing import Mapping

from omegaconf import DictConfig

from .config import ConfigError, device_knobs, plain
from .names import canonical_policy, model_presets, policy_class
from .replays import device_replay_config
from .workload import _lead_name, _workload_key, _workload_kwargs
from kvtriton.checks import is_int
from kvtriton.workloads.paths import MOONCAKE_FILES


# Arguments the harness passes itself, with the config key that sets each.
_WORKLOAD_OWN = {"trace": {"path": "workload.trace_path", "traces_dir": "workload.traces_dir",
                           "limit": "replay.max_requests"},
                 "synthetic": {"seed": "workload.seed"}}
_POLICY_OWN = {"capacity": "pool.capacity_blocks", "future": "the fast replay, from the workload"}
_FAST_OWN = {"policy_kwargs": "policy.params", "requests": None, "policy": "policy.name",
             "capacity_blocks": "pool.capacity_blocks", "progress": "replay.progress"}


def _arg_names(fn) -> tuple[list[str], list[str]] | None:
    """(keyword arguments, required ones) of ``fn``; None where it takes ``**kwargs`` (any name)."""
    sig = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    names = [n for n, p in sig.parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
             and not n.startswith("_")]
    required = [n for n in names if sig.parameters[n].default is inspect.Parameter.empty]
    return names, required


def _check_names(prefix: str, given: Mapping, valid: list[str], own: Mapping[str, str | None], what: str) -> None:
    """ConfigError for the first key of ``given`` that is not in ``valid`` (or is one the harness sets)."""
    for k in given:
        if k in own:
            where = own[k]
            hint = (f"set {where} instead" if where and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", where)
                    else f"it is set by {where or 'the harness'}")
            raise ConfigError(f"{prefix}.{k}", given[k], "", message=(
                f"config key {prefix}.{k} is not accepted: {hint} ({what} takes "
                f"{', '.join(valid) if valid else 'no parameters'} in {prefix})"))
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            raise ConfigError(f"{prefix}.{k}", given[k], "", message=(
                f"unknown config key {prefix}.{k}={given[k]!r}: {what} takes "
                + (f"{', '.join(valid)} in {prefix}" if valid else f"no parameters in {prefix}")
                + (f" (did you mean {prefix}.{close[0]}?)" if close else "")))


def check_params(cfg: DictConfig) -> None:
    """Check ``workload.params``, ``policy.params`` and ``replay.params`` against what the generator, the
    policy's constructor and the replay take (names from their signatures; values by the library's own
    checks where they cost nothing). Raise ``ConfigError`` naming the key and the valid ones."""
    # workload.params: names (the values are checked when the workload is built)
    from kvtriton.workloads import WORKLOADS

    wname = str(cfg.workload.name).lower().replace("-", "_")
    wparams = plain(cfg.workload.params) or {}
    if not isinstance(wparams, dict):
        raise ConfigError("workload.params", wparams, "a mapping of the generator's keyword arguments")
    fn = WORKLOADS.get(wname)
    own = _WORKLOAD_OWN["trace" if wname in MOONCAKE_FILES else "synthetic"]
    args = _arg_names(fn) if fn is not None else None
    if args is not None:
        names, required = args
        _check_names("workload.params", wparams, [n for n in names if n not in own], own,
                     f"workload {wname!r}" + ("" if wname in MOONCAKE_FILES else f" ({fn.__name__})"))
        missing = [n for n in required if n not in wparams and n not in own]
        if missing:
            raise ConfigError(f"workload.params.{missing[0]}", None, f"a value: workload {wname!r} needs "
                              f"{', '.join('workload.params.' + m for m in missing)}")

    # policy.params: names, then the constructor's own checks
    pname = canonical_policy(str(cfg.policy.name))
    pparams = plain(cfg.policy.params) or {}
    if not isinstance(pparams, dict):
        raise ConfigError("policy.params", pparams, "a mapping of the policy constructor's keyword arguments")
    if pname is not None:
        from kvtriton.policies import make_policy

        cls = policy_class(pname)
        args = _arg_names(cls)
        if args is not None:
            _check_names("policy.params", pparams, [n for n in args[0] if n not in _POLICY_OWN], _POLICY_OWN,
                         f"policy {pname!r} ({cls.__name__})")
        if pparams:
            cap = cfg.pool.capacity_blocks
            try:
                make_policy(pname, capacity=cap if isinstance(cap, int) and cap > 0 else None, **pparams)
            except (TypeError, ValueError) as e:
                arg = _lead_name(e, pparams)
                raise ConfigError(f"policy.params.{arg}" if arg else "policy.params",
                                  pparams.get(arg) if arg else pparams,
                                  f"a value policy {pname!r} accepts ({e})") from e

    # replay.params
    rparams = plain(cfg.replay.params) or {}
    if not isinstance(rparams, dict):
        raise ConfigError("replay.params", rparams, "a mapping of the replay's keyword arguments")
    if getattr(cfg.task, "value", cfg.task) != "replay":
        return
    if getattr(cfg.replay.mode, "value", cfg.replay.mode) == "fast":
        from kvtriton.replay import fast

        args = _arg_names(fast.simulate)
        if args is not None:
            _check_names("replay.params", rparams, [n for n in args[0] if n not in _FAST_OWN], _FAST_OWN,
                         "the fast replay (kvtriton.replay.fast.simulate)")
        if "order" in rparams and rparams["order"] not in fast.ORDERS:
            raise ConfigError("replay.params.order", rparams["order"], f"one of {', '.join(fast.ORDERS)}")
        every = rparams.get("sample_every")
        if every is not None and (not is_int(every) or every < 1):
            raise ConfigError("replay.params.sample_every", every, "a positive integer or null (about 200 points)")
    elif rparams:  # the device replay's knobs are keys of their own; its checks ran in validate()
        knobs = [f.name for f in device_knobs()]
        _check_names("replay.params", rparams, [], {k: f"replay.{k}" for k in knobs},
                     "the device replay (its knobs are replay.<field>: " + ", ".join(knobs) + ")")


def check_capacity(cfg: DictConfig, requests: list) -> None:
    """ConfigError where the pool cannot hold the workload's largest request (the replay would refuse
    it only after the run has started)."""
    if getattr(cfg.task, "value", cfg.task) != "replay" or not requests:
        return
    name = str(cfg.workload.name)
    if getattr(cfg.replay.mode, "value", cfg.replay.mode) == "fast":
        cap = cfg.pool.capacity_blocks
        biggest = max(requests, key=lambda r: len(r.hash_ids))
        need = max(1, len(biggest.hash_ids))
        if cap is not None and cap < need:
            raise ConfigError("pool.capacity_blocks", cap, (
                f"at least {need}: request_id={biggest.request_id} of workload {name!r} holds {need} blocks "
                f"(of {getattr(biggest, 'block_tokens', '?')} tokens), and a running request's blocks are pinned"))
        return
    for pool, need, block_bytes, why in _device_needs(cfg, requests):
        if cfg.pool.budget_mb is not None:
            budget = cfg.pool.budget_mb
            if need > int(float(budget) * 2**20) // block_bytes:
                raise ConfigError("pool.budget_mb", budget, f"at least {need * block_bytes / 2**20:.4g} (MB): {why}")
        elif cfg.pool.capacity_blocks is not None and need > cfg.pool.capacity_blocks:
            raise ConfigError("pool.capacity_blocks", cfg.pool.capacity_blocks, f"at least {need}: {why}")


_NEEDS: "OrderedDict[str, list]" = OrderedDict()  # a sweep over capacities and policies computes each once


def _model_mode_specs(dcfg):
    """``{name: spec}`` of the model the model mode serves (``replay.hf_model``), or None when its shape
    cannot be known without loading it."""
    from kvtriton.replay.model_replay import model_kv_spec

    spec = model_kv_spec(dcfg.hf_model, block_size=dcfg.block_size, dtype=dcfg.dtype, num_layers=dcfg.num_layers)
    return None if spec is None else {spec.name: spec}


def _device_needs(cfg: DictConfig, requests: list) -> list[tuple[str, int, int, str]]:
    """``(pool, blocks its largest request needs, bytes per block, explanation)`` for each model pool of
    the device replay, by the replay's own scale-down of the requests (nothing touches a device)."""
    from kvtriton.replay.sequences import largest_needs, prepare_sequences, resolve_models  # the replay's own

    name = str(cfg.workload.name)
    wname, kwargs = _workload_kwargs(cfg)
    model = None if cfg.model.preset == "per_request" else str(cfg.model.preset)
    compute_model = str(cfg.replay.compute) == "model"
    key = json.dumps([_workload_key(wname, kwargs, cfg.replay.max_requests), model, cfg.replay.num_layers,
                      cfg.replay.dtype, cfg.replay.block_size, cfg.replay.max_input_tokens,
                      cfg.replay.max_output_tokens, compute_model and str(cfg.replay.hf_model)], default=str)
    if key in _NEEDS:
        _NEEDS.move_to_end(key)
        return _NEEDS[key]
    try:
        dcfg = device_replay_config(cfg, "cpu")
        if compute_model:  # the engine serves the hf_model's shape, not the preset's
            specs = _model_mode_specs(dcfg)
            if specs is None:
                return []
            by_request = False
        elif model is None:
            names = {getattr(r, "model", None) for r in requests}
            if None in names or not names:
                raise ConfigError("model.preset", "per_request", (
                    f"a workload whose requests name their model (e.g. workload=design_mix), or one preset "
                    f"({', '.join(sorted(model_presets()))}): requests of workload {name!r} have no model"))
            specs, by_request = resolve_models({n: n for n in sorted(names, key=str)}, dcfg)
        elif not compute_model:
            specs, by_request = resolve_models(model, dcfg)
        seqs = prepare_sequences(requests, dcfg, specs, by_request)
    except AttributeError:  # pragma: no cover - the replay changed shape; it still refuses at run time
        return []
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError("workload", name, f"requests the device replay can serve ({e})") from e
    needs = []
    for pool, spec, big, need in largest_needs(seqs, specs):
        needs.append((pool, need, spec.bytes_per_block,
                      f"request_id={big.req.request_id} of workload {name!r} holds {big.max_tokens} tokens = "
                      f"{need} blocks of {spec.block_size} tokens ({spec.name}); or cap replay.max_input_tokens / "
                      f"replay.max_output_tokens"))
    _NEEDS[key] = needs
    while len(_NEEDS) > 8:
        _NEEDS.popitem(last=False)
    return needs
