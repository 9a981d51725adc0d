"""``autopar validate``: is this file a plan autopar can run, and was it made for this cluster?

Three checks, each naming the field at fault: the JSON Schema shipped with autopar
(``autopar/schema/plan.schema.json``, via jsonschema when installed), the loader's own
validation (:meth:`Plan.from_dict`: schema_version, placements, mesh degrees, stage ranks),
and, given a cluster, that the plan's cluster has the same devices in the same node shapes
(an error: the rank layout and memory figures would not apply) and the same figures (a
warning: the plan runs, but its predicted times were made with other link/device numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autopar.plan import Plan


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """What ``validate_file`` found: errors make the plan unusable, warnings do not."""

    path: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    description: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "errors": list(self.errors), "warnings": list(self.warnings),
                "description": self.description}


def _cluster_shape(cluster_json: Any) -> list[tuple[str, int, int]]:
    out = []
    for g in (cluster_json or {}).get("groups", []) or []:
        try:
            out.append((str(g["device"]["name"]), int(g["devices_per_node"]), int(g["num_nodes"])))
        except (KeyError, TypeError, ValueError):
            out.append(("?", 0, 0))
    return out


def _shape_text(shape: list[tuple[str, int, int]]) -> str:
    return " + ".join(f"{n * k} x {d}" + (f" ({k} nodes of {n})" if k > 1 else "") for d, n, k in shape) or "?"


def check_plan_for_cluster(plan: Plan, cluster: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) for running ``plan`` on ``cluster`` (a cost_model Cluster).

    An error: another device count, other device kinds or node shapes (the plan's rank
    layout and memory figures do not apply). A warning: same devices, but other figures
    (links, measured profile): the plan runs, its predictions may not hold.
    """
    errors, warnings = [], []
    mine, theirs = _cluster_shape(plan.cluster), _cluster_shape(cluster.to_json())
    name = plan.cluster.get("name", "?")
    if plan.world_size != cluster.world_size:
        errors.append(f"the plan was made for {plan.world_size} devices (cluster {name!r}: {_shape_text(mine)}) "
                      f"but cluster {cluster.name!r} has {cluster.world_size} ({_shape_text(theirs)})")
    elif mine != theirs:
        errors.append(f"the plan was made for cluster {name!r} ({_shape_text(mine)}), not for "
                      f"{cluster.name!r} ({_shape_text(theirs)}): other devices or node shapes")
    elif dict(plan.cluster) != cluster.to_json():
        diff = sorted(k for k in set(plan.cluster) | set(cluster.to_json())
                      if plan.cluster.get(k) != cluster.to_json().get(k))
        warnings.append(f"cluster {cluster.name!r} has the same devices as the plan's {name!r} but other "
                        f"figures ({', '.join(diff)}): the plan runs, its predicted times may not hold")
    return errors, warnings


def validate_file(path: str, cluster: Any = None) -> ValidationReport:
    """Schema (jsonschema, when installed), then :meth:`Plan.from_json`, then the cluster."""
    import json
    import os

    from autopar.plan import PlanError, schema_path

    errors: list[str] = []
    warnings: list[str] = []
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        return ValidationReport(path, (f"cannot read {path}: {e.strerror}",), ())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return ValidationReport(path, (f"not JSON: {e.msg} at line {e.lineno} column {e.colno}",), ())
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
        warnings.append("jsonschema is not installed: schema check skipped (pip install jsonschema)")
    if jsonschema is not None:
        with open(schema_path()) as f:
            schema = json.load(f)
        v = jsonschema.Draft202012Validator(schema)
        found = sorted(v.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        for e in found[:5]:
            where = "plan" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
            errors.append(f"schema: {where}: {e.message}")
        if len(found) > 5:
            errors.append(f"schema: ... and {len(found) - 5} more")
    plan = None
    try:
        plan = Plan.from_dict(data)
    except PlanError as e:
        errors.append(str(e))
    desc = ""
    if plan is not None:
        desc = (f"(schema version {plan.schema_version}; {plan.model.name} on {plan.cluster.get('name', '?')}, "
                f"{plan.world_size} devices, mesh pp={plan.mesh['pp']} dp={plan.mesh['dp']} tp={plan.mesh['tp']})")
        if cluster is not None:
            e2, w2 = check_plan_for_cluster(plan, cluster)
            errors += e2
            warnings += w2
            if not e2:
                desc += f"; fits cluster {cluster.name!r}"
    return ValidationReport(os.fspath(path), tuple(errors), tuple(warnings), desc)
