"""Reading a Plan: a text summary for people, a dict for machines, a PNG for the eyes.

``summary(plan)`` answers, in order, the questions a reader has about a plan: where does it
run (cluster, mesh), what does each device hold (pipeline stages with their blocks and
ranks), how is each layer split (strategy per node, repeated blocks grouped:
``h.0..h.11: attn_c_attn colwise, attn_c_proj rowwise, ...``), does it fit (memory per
device against capacity) and how fast is it (predicted step time split into compute,
communication, bubble and offload).

Node-to-block mapping. A Plan stores node names, not the graph, so that it can be read
anywhere. When the captured :class:`~autopar.graph.Graph` is at hand, its ``NodeInfo.block``
is used; otherwise the block is read from the name: ``torch.fx`` names a ``call_module``
node after its module path with dots turned into underscores (``h.3.attn.c_proj`` ->
``h_3_attn_c_proj``), and a function node (``add_7``) sitting between two nodes of the same
block belongs to that block (stages are contiguous in topological order). Nodes that match
neither are listed as "outside blocks". The grouping only affects display.

``render_png(plan, path)`` draws the pipeline schedule (one row per stage, a box per
microbatch forward and backward) and the memory of every device against its capacity, with
matplotlib's Agg backend; matplotlib is the optional dependency ``autopar[plot]``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from autopar.plan import Plan

GiB = 1024**3
BAR_WIDTH = 20  # characters of the memory bar in the text summary
MAX_LISTED = 8  # named nodes listed one by one before the rest is summarised by strategy
#: Predicted.memory_peak_at, in words
_PEAK_AT = {"loss_backward": "peaks at the loss's backward, before gradients exist",
            "with_gradients": "peaks with gradients beside microbatches in flight",
            "optimizer_step": "peaks at the optimizer step"}


# ---------------------------------------------------------------------------------------
# small formatting helpers


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB for device memory)."""
    n = float(n)
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float) -> str:
    s = float(s)
    if s != s or s in (float("inf"), float("-inf")):
        return str(s)
    if abs(s) >= 1:
        return f"{s:.3g} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s == 0:
        return "0 s"
    return f"{s * 1e6:.3g} us"


def fmt_count(n: float) -> str:
    n = float(n)
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}"


def fmt_ranks(ranks: Iterable[int]) -> str:
    """``[0,1,2,3,8,9]`` -> ``"0-3,8-9"``."""
    rs = sorted(set(int(r) for r in ranks))
    if not rs:
        return "-"
    parts, start, prev = [], rs[0], rs[0]
    for r in rs[1:] + [None]:  # type: ignore[operator]
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def fmt_block_range(blocks: Sequence[str]) -> str:
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]}..{blocks[-1]}"


# ---------------------------------------------------------------------------------------
# node -> block mapping and layer grouping


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One planned node as displayed: its block (or None), a short local name, its strategy."""

    node: str
    block: str | None
    local: str  # name inside the block ("attn_c_proj"); the node name outside blocks
    named: bool  # a module node (linear, norm ...) rather than a function node (add, view ...)
    strategy: str


@dataclass(frozen=True, slots=True)
class LayerGroup:
    """Consecutive rows with one description: a run of identical blocks, or nodes outside blocks."""

    stage: int
    blocks: tuple[str, ...]  # () for nodes outside blocks
    rows: tuple[NodeRow, ...]  # the rows of the first block (or all outside rows)

    @property
    def label(self) -> str:
        return fmt_block_range(self.blocks) if self.blocks else "outside blocks"


_SUFFIX = re.compile(r"_\d+$")
_BLOCK_GUESS = re.compile(r"^((?:[A-Za-z][A-Za-z0-9]*_)*?[A-Za-z][A-Za-z0-9]*)_(\d+)(?:_|$)")


def _known_blocks(plan: Plan) -> list[str]:
    out: dict[str, None] = {}
    for s in plan.pipeline.stages:
        for b in s.blocks:
            out.setdefault(b, None)
    for bp in plan.blocks:
        if bp.block != "*":
            out.setdefault(bp.block, None)
    if out:
        return list(out)
    # No stage lists its blocks: guess them from fx names ("h_3_attn_c_proj" -> "h.3").
    seen: dict[str, set[str]] = {}
    for ns in plan.nodes:
        m = _BLOCK_GUESS.match(ns.node)
        if m and m.group(1) not in _FUNCTION_NAMES:
            seen.setdefault(m.group(1), set()).add(m.group(2))
    guessed = []
    for prefix, idx in seen.items():
        if len(idx) >= 2:  # a block repeats, by definition
            guessed += [f"{prefix.replace('_', '.')}.{i}" for i in sorted(idx, key=int)]
    return guessed


def _node_order(plan: Plan) -> list[tuple[int, str]]:
    """(stage index, node name) in execution order; stage 0 for plans without stages."""
    if plan.pipeline.stages:
        order = [(s.index, n) for s in plan.pipeline.stages for n in s.nodes]
        listed = {n for _, n in order}
        last = plan.pipeline.stages[-1].index
        return order + [(last, ns.node) for ns in plan.nodes if ns.node not in listed]
    return [(0, ns.node) for ns in plan.nodes]


def node_rows(plan: Plan, graph: Any = None) -> list[tuple[int, NodeRow]]:
    """Every planned node, in order, with its stage and block (see module docstring)."""
    strategies = {ns.node: ns.strategy for ns in plan.nodes}
    order = [(st, n) for st, n in _node_order(plan) if n in strategies]
    if graph is not None:
        out = []
        for st, n in order:
            info = graph.nodes.get(n)
            block = info.block if info is not None else None
            named = info is not None and getattr(info, "module_path", "") != "" and (
                info.module_path.replace(".", "_") == n or n.startswith(info.module_path.replace(".", "_"))
            )
            local = n
            if block and named:
                local = info.module_path[len(block) + 1:].replace(".", "_")  # "" = the block itself
            elif not named:
                local = _SUFFIX.sub("", n)
            out.append((st, NodeRow(n, block, local, named, strategies[n])))
        return out

    prefixes = sorted(((b.replace(".", "_"), b) for b in _known_blocks(plan)), key=lambda x: -len(x[0]))
    direct: list[str | None] = []
    for _, n in order:
        hit = None
        for p, b in prefixes:
            if n == p or n.startswith(p + "_"):
                hit = b
                break
        direct.append(hit)
    # A node that is not a block's module belongs to a block when it sits between two nodes
    # of that block (stages are contiguous in topological order), or when it looks like a
    # function node (add_7, view) following the block's nodes with no outside module between:
    # the residual add after h.0.mlp.c_proj is part of h.0, the add after wpe is outside.
    n_nodes = len(order)
    nxt: list[str | None] = [None] * n_nodes
    following: str | None = None
    for i in range(n_nodes - 1, -1, -1):
        nxt[i] = following
        if direct[i] is not None:
            following = direct[i]
    resolved: list[str | None] = []
    last: str | None = None  # block of the last block node
    cur: str | None = None  # same, but reset by an outside module node
    for (_, n), d, after in zip(order, direct, nxt):
        if d is not None:
            last = cur = d
            resolved.append(d)
            continue
        functional = _looks_functional(n)
        if not functional:
            cur = None
        if last is not None and last == after:
            resolved.append(last)
        elif functional and cur is not None:
            resolved.append(cur)
        else:
            resolved.append(None)
    out = []
    for (st, n), d, b in zip(order, direct, resolved):
        if d is not None:
            p = d.replace(".", "_")
            local = n[len(p) + 1:]  # "" = the block module itself
            out.append((st, NodeRow(n, b, local, True, strategies[n])))
        else:
            named = not _looks_functional(n)
            out.append((st, NodeRow(n, b, n if named else _SUFFIX.sub("", n), named, strategies[n])))
    return out


# fx names a function node after the function (``add``, then ``add_1`` ...): common ones.
_FUNCTION_NAMES = set(
    "add sub mul div truediv floordiv neg pow rsqrt sqrt exp log tanh sigmoid relu gelu silu dropout "
    "softmax log_softmax matmul bmm mm einsum scaled_dot_product_attention where masked_fill clamp "
    "sum mean amax max min var std norm cumsum view reshape transpose permute contiguous expand "
    "unsqueeze squeeze flatten unflatten chunk split getitem getattr size narrow slice cat stack "
    "repeat repeat_interleave arange zeros ones full type_as float to cos sin polar view_as_complex "
    "view_as_real triu tril cross_entropy mse_loss".split())


def _looks_functional(name: str) -> bool:
    """fx names function nodes after the function, numbered from the second one on (add, add_1)."""
    return _SUFFIX.sub("", name) in _FUNCTION_NAMES or bool(_SUFFIX.search(name))


def layer_groups(plan: Plan, graph: Any = None) -> list[LayerGroup]:
    """Runs of outside nodes, and runs of consecutive blocks with equal strategies (across stage
    boundaries: the Stages section says where each block runs)."""
    groups: list[LayerGroup] = []
    # Split into segments (stage, block) in order.
    segments: list[tuple[int, str | None, list[NodeRow]]] = []
    for st, row in node_rows(plan, graph):
        if segments and segments[-1][0] == st and segments[-1][1] == row.block:
            segments[-1][2].append(row)
        else:
            segments.append((st, row.block, [row]))
    for st, block, rows in segments:
        sig = tuple((r.local, r.strategy) for r in rows)
        last = groups[-1] if groups else None
        if (block is not None and last is not None and last.blocks
                and tuple((r.local, r.strategy) for r in last.rows) == sig):
            groups[-1] = LayerGroup(st, last.blocks + (block,), last.rows)
        else:
            groups.append(LayerGroup(st, (block,) if block is not None else (), tuple(rows)))
    return groups


def describe_rows(rows: Sequence[NodeRow]) -> str:
    """``"attn_c_attn colwise, attn_c_proj rowwise; 20 other ops: dp x12, replicate x8"``, or
    ``"wq, wk, wv and 20 other ops: replicate"`` when every node has the same strategy."""
    named = [r for r in rows if r.named]
    others = [r for r in rows if not r.named]
    parts = []
    strategies = {r.strategy for r in rows}
    if named and len(strategies) == 1 and all(r.local for r in named):
        (only,) = strategies
        names = ", ".join(r.local for r in named) if len(named) <= MAX_LISTED else f"{len(named)} layers"
        return f"{names}" + (f" and {len(others)} other ops" if others else "") + f": {only}"
    if len(named) <= MAX_LISTED:
        parts.append(", ".join(f"{r.local} {r.strategy}" if r.local else r.strategy for r in named))
    else:
        by = Counter(r.strategy for r in named)
        parts.append(f"{len(named)} layers: " + ", ".join(f"{s} x{c}" for s, c in by.most_common()))
    if others:
        by = Counter(r.strategy for r in others)
        if len(by) == 1:
            parts.append(f"{len(others)} other ops {next(iter(by))}")
        else:
            parts.append(f"{len(others)} other ops: " + ", ".join(f"{s} x{c}" for s, c in by.most_common()))
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------
# memory and time


@dataclass(frozen=True, slots=True)
class MemoryRow:
    label: str  # "stage 0" or "all"
    ranks: tuple[int, ...]
    device: str
    min_bytes: int
    max_bytes: int
    capacity_bytes: int


def _cluster_devices(plan: Plan) -> list[str]:
    """Device name per rank from the plan's cluster JSON ("" when it does not say)."""
    names: list[str] = []
    for g in plan.cluster.get("groups", []) or []:
        try:
            n = int(g["devices_per_node"]) * int(g["num_nodes"])
            names += [str(g["device"]["name"])] * n
        except (KeyError, TypeError, ValueError):
            return []
    return names


def _capacity_by_rank(plan: Plan, cap: int, mem: list[int]) -> list[int]:
    """Usable bytes per rank. ``memory_capacity_bytes`` is the fullest device's; on a mixed
    cluster each rank gets its own device's memory under the same reserve fraction."""
    sizes: list[int] = []
    for g in plan.cluster.get("groups", []) or []:
        try:
            sizes += [int(g["device"]["memory_bytes"])] * (int(g["devices_per_node"]) * int(g["num_nodes"]))
        except (KeyError, TypeError, ValueError):
            return [cap] * len(mem)
    if len(sizes) < len(mem) or len(set(sizes)) == 1:
        return [cap] * len(mem)
    ref = sizes[max(range(len(mem)), key=lambda r: mem[r])]
    return [int(s * cap / ref) if ref else cap for s in sizes[:len(mem)]]


def memory_rows(plan: Plan) -> list[MemoryRow]:
    mem = list(plan.predicted.memory_per_device_bytes)
    cap = int(plan.predicted.memory_capacity_bytes)
    caps = _capacity_by_rank(plan, cap, mem)
    devs = _cluster_devices(plan)
    if not mem:
        return []
    groups: list[tuple[str, tuple[int, ...], str]] = []
    if plan.pipeline.stages:
        for ranks_all, ss in _stages_by_ranks(plan):
            ranks = tuple(r for r in ranks_all if r < len(mem))
            label = f"stage {ss[0].index}" if len(ss) == 1 else "stages " + ",".join(str(s.index) for s in ss)
            if ranks:
                groups.append((label, ranks, ss[0].device))
        covered = {r for _, rs, _ in groups for r in rs}
        rest = tuple(r for r in range(len(mem)) if r not in covered)
        if rest:
            groups.append(("other", rest, devs[rest[0]] if len(devs) > rest[0] else ""))
    else:
        groups.append(("all", tuple(range(len(mem))), devs[0] if devs else ""))
    return [MemoryRow(label, ranks, dev, min(mem[r] for r in ranks), max(mem[r] for r in ranks), caps[ranks[0]])
            for label, ranks, dev in groups]


def _stages_by_ranks(plan: Plan) -> list[tuple[tuple[int, ...], list]]:
    """Stages grouped by the ranks that run them (interleaved 1F1B: v chunks per rank group)."""
    out: dict[tuple[int, ...], list] = {}
    for s in plan.pipeline.stages:
        out.setdefault(tuple(s.ranks), []).append(s)
    return list(out.items())


def _bar(frac: float) -> str:
    frac = max(0.0, frac)
    full = min(BAR_WIDTH, int(round(frac * BAR_WIDTH)))
    return "[" + "#" * full + "." * (BAR_WIDTH - full) + "]" + ("!" if frac > 1 else "")


def _peak_flops_per_device(plan: Plan) -> float | None:
    key = {"fp32": "fp32", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}[plan.training.precision]
    total, n = 0.0, 0
    for g in plan.cluster.get("groups", []) or []:
        try:
            k = int(g["devices_per_node"]) * int(g["num_nodes"])
            total += float(g["device"]["peak_flops"][key]) * k
            n += k
        except (KeyError, TypeError, ValueError):
            return None
    return total / n if n else None


# ---------------------------------------------------------------------------------------
# the summary


def _cluster_line(plan: Plan) -> str:
    c = plan.cluster
    name = c.get("name", "?")
    parts = []
    for g in c.get("groups", []) or []:
        try:
            parts.append(f"{g['num_nodes']} node{'s' if g['num_nodes'] != 1 else ''} x "
                         f"{g['devices_per_node']} {g['device']['name']} "
                         f"({fmt_bytes(g['device']['memory_bytes'])})")
        except (KeyError, TypeError):
            continue
    world = plan.world_size
    return f"{name}: {world} device{'s' if world != 1 else ''}" + (f" = {' + '.join(parts)}" if parts else "")


def summary(plan: Plan, graph: Any = None) -> str:
    """The readable text summary of a plan (what ``autopar show`` prints)."""
    p, t, pr, m = plan.predicted, plan.training, plan.pipeline, plan.mesh
    L: list[str] = []
    L.append(f"Plan for {plan.model.name}  ({fmt_count(plan.model.num_params)} parameters, "
             f"{plan.model.ir} graph {plan.model.fingerprint})")
    L.append(f"  cluster   {_cluster_line(plan)}")
    L.append(f"  mesh      pp={m['pp']} x dp={m['dp']} x tp={m['tp']}  (rank = (pp_i*dp + dp_i)*tp + tp_i)")
    L.append(f"  training  {t.precision}, {t.optimizer}, global batch {t.global_batch_size}")
    if pr.schedule != "none":
        v = f", {pr.virtual_stages} virtual stages per rank" if pr.virtual_stages > 1 else ""
        L.append(f"  pipeline  {pr.schedule}: {len(pr.stages)} stages, {pr.num_microbatches} microbatches "
                 f"of {pr.microbatch_size} per dp rank{v}")
    else:
        L.append(f"  pipeline  none ({pr.num_microbatches} microbatch{'es' if pr.num_microbatches != 1 else ''}"
                 f" of {pr.microbatch_size} per dp rank)")

    # stages
    if pr.stages:
        L.append("")
        L.append("Stages")
        for ranks, ss in _stages_by_ranks(plan):
            blocks = ", ".join(fmt_block_range(s.blocks) if s.blocks else "no blocks" for s in ss)
            nb = sum(len(s.blocks) for s in ss)
            nn = sum(len(s.nodes) for s in ss)
            label = f"stage {ss[0].index}" if len(ss) == 1 else "stages " + ",".join(str(s.index) for s in ss)
            each = "" if len(ss) == 1 else " each"
            L.append(f"  {label}: {blocks} ({nb} blocks, {nn} nodes)  ranks {fmt_ranks(ranks)}  {ss[0].device}  "
                     f"{fmt_seconds(max(s.compute_s for s in ss))}/microbatch{each}  "
                     f"{fmt_bytes(max(s.memory_bytes for s in ss))} peak")

    # layers
    groups = layer_groups(plan, graph)
    if groups:
        L.append("")
        L.append("Strategy per layer")
        for g in groups:
            L.append(f"  {g.label}: {describe_rows(g.rows)}")

    # params / blocks policies
    extra = _policy_lines(plan)
    if extra:
        L.append("")
        L.append("State and activations")
        L += ["  " + x for x in extra]

    # memory
    rows = memory_rows(plan)
    if rows:
        L.append("")
        cap = rows[0].capacity_bytes
        mixed = len({r.capacity_bytes for r in rows}) > 1
        L.append("Memory per device" + (" (capacity of each stage's device, usable)" if mixed else
                                        f" (capacity {fmt_bytes(cap)} usable)" if cap else ""))
        w = max(len(r.label) for r in rows)
        for r in rows:
            rng = fmt_bytes(r.max_bytes) if r.min_bytes == r.max_bytes else \
                f"{fmt_bytes(r.min_bytes)}..{fmt_bytes(r.max_bytes)}"
            cap = r.capacity_bytes
            if cap:
                frac = r.max_bytes / cap
                L.append(f"  {r.label:<{w}}  ranks {fmt_ranks(r.ranks):<10} {rng:>18} / {fmt_bytes(cap)}  "
                         f"{_bar(frac)} {100 * frac:.0f}%")
            else:
                L.append(f"  {r.label:<{w}}  ranks {fmt_ranks(r.ranks):<10} {rng:>18}")
        if p.memory_breakdown:
            total = sum(p.memory_breakdown.values()) or 1
            parts = ", ".join(f"{k} {fmt_bytes(v)} ({100 * v / total:.0f}%)"
                              for k, v in sorted(p.memory_breakdown.items(), key=lambda kv: -kv[1]))
            at = _PEAK_AT.get(p.memory_peak_at, "")
            L.append(f"  fullest device{f' ({at})' if at else ''}: {parts}")

    # time
    L.append("")
    L.append(f"Predicted step time {fmt_seconds(p.step_time_s)}")
    st = p.step_time_s if p.step_time_s > 0 else 1.0
    for label, v in (("compute", p.compute_s), ("communication", p.communication_s),
                     ("bubble", p.bubble_s), ("offload", p.offload_s)):
        L.append(f"  {label:<14} {fmt_seconds(v):>10}  {100 * v / st:5.1f}%")
    if p.communication_bytes:
        L.append(f"  communication volume {fmt_bytes(p.communication_bytes)} per device per step")
    if p.flops_per_step and p.step_time_s > 0:
        per_dev = p.flops_per_step / p.step_time_s / plan.world_size
        peak = _peak_flops_per_device(plan)
        mfu = f" = {100 * per_dev / peak:.1f}% of peak" if peak else ""
        L.append(f"  throughput {per_dev / 1e12:.3g} TFLOP/s per device{mfu} "
                 f"({p.flops_per_step:.3g} FLOP per step)")

    s = plan.solver
    L.append("")
    line = f"Solver    {s.status}"
    if s.status != "pinned":
        line += (f", objective {s.objective:.4g}, gap {100 * s.gap:.3g}%, {fmt_seconds(s.wall_s)}, "
                 f"{s.num_variables:,} variables, {s.num_constraints:,} constraints, "
                 f"{s.candidates} candidates")
    L.append(line)
    for sc in s.shortcuts:
        L.append(f"  shortcut: {sc}")
    return "\n".join(L)


def _policy_lines(plan: Plan) -> list[str]:
    out = []
    if plan.params:
        zs = Counter(p.zero_stage for p in plan.params)
        if set(zs) != {0}:
            out.append("ZeRO: " + ", ".join(f"stage {z}: {c} params" for z, c in sorted(zs.items())))
        off = Counter(c for p in plan.params for c in p.offload)
        if off:
            out.append("offloaded to host: " + ", ".join(f"{k} of {c} params" for k, c in sorted(off.items())))
    rec = [b.block for b in plan.blocks if b.recompute != "none"]
    if rec:
        out.append(f"recompute full: {_block_list(rec)}")
    act = [b.block for b in plan.blocks if b.offload_activations]
    if act:
        out.append(f"activations offloaded: {_block_list(act)}")
    return out


def _block_list(blocks: list[str]) -> str:
    if len(blocks) <= 3:
        return ", ".join(blocks)
    return f"{blocks[0]}..{blocks[-1]} ({len(blocks)} blocks)"


def summary_dict(plan: Plan, graph: Any = None) -> dict:
    """What ``autopar show --json`` prints: the summary's figures, machine-readable."""
    p = plan.predicted
    return {
        "model": plan.model.name,
        "num_params": plan.model.num_params,
        "cluster": plan.cluster.get("name"),
        "world_size": plan.world_size,
        "mesh": dict(plan.mesh),
        "training": {"precision": plan.training.precision, "optimizer": plan.training.optimizer,
                     "global_batch_size": plan.training.global_batch_size},
        "pipeline": {
            "schedule": plan.pipeline.schedule, "num_microbatches": plan.pipeline.num_microbatches,
            "microbatch_size": plan.pipeline.microbatch_size,
            "virtual_stages": plan.pipeline.virtual_stages,
            "stages": [{"index": s.index, "blocks": list(s.blocks), "num_nodes": len(s.nodes),
                        "ranks": list(s.ranks), "device": s.device, "compute_s": s.compute_s,
                        "memory_bytes": s.memory_bytes} for s in plan.pipeline.stages],
        },
        "layers": [{"stage": g.stage, "blocks": list(g.blocks),
                    "strategies": [{"node": r.local, "strategy": r.strategy, "named": r.named}
                                   for r in g.rows]} for g in layer_groups(plan, graph)],
        "memory": [{"label": r.label, "ranks": fmt_ranks(r.ranks), "device": r.device,
                    "min_bytes": r.min_bytes, "max_bytes": r.max_bytes,
                    "capacity_bytes": r.capacity_bytes} for r in memory_rows(plan)],
        "predicted": {"step_time_s": p.step_time_s, "compute_s": p.compute_s,
                      "communication_s": p.communication_s, "bubble_s": p.bubble_s,
                      "offload_s": p.offload_s, "max_memory_bytes": max(p.memory_per_device_bytes, default=0),
                      "memory_capacity_bytes": p.memory_capacity_bytes,
                      "memory_breakdown": dict(p.memory_breakdown), "memory_peak_at": p.memory_peak_at},
        "solver": {"status": plan.solver.status, "objective": plan.solver.objective,
                   "gap": plan.solver.gap, "wall_s": plan.solver.wall_s,
                   "shortcuts": list(plan.solver.shortcuts)},
    }


# ---------------------------------------------------------------------------------------
# pipeline schedule (for the picture)


@dataclass(frozen=True, slots=True)
class ScheduleBox:
    """One microbatch forward or backward of one (virtual) stage on one pipeline rank."""

    rank: int  # pipeline rank (row)
    chunk: int  # model chunk on that rank (virtual stage = chunk * pp + rank)
    microbatch: int
    kind: str  # "F" or "B"
    start: float
    end: float


def _rank_orders(schedule: str, p: int, m: int, v: int) -> list[list[tuple[str, int, int]]]:
    """Per pipeline rank, its (kind, chunk, microbatch) operations in execution order.

    gpipe: all forwards then all backwards. 1f1b (PipeDream-Flush): p-i-1 warm-up forwards,
    then one forward one backward, then the remaining backwards. interleaved_1f1b follows
    Megatron-LM's ordering: microbatches advance in groups of p through chunk 0..v-1, with
    (p-i-1)*2 + (v-1)*p warm-up forwards.
    """
    orders = []
    for i in range(p):
        if schedule in ("gpipe", "none"):
            ops = [("F", 0, k) for k in range(m)] + [("B", 0, k) for k in range(m)]
        elif schedule == "1f1b" or v == 1:
            warm = min(p - i - 1, m)
            fw = [("F", 0, k) for k in range(m)]
            bw = [("B", 0, k) for k in range(m)]
            ops = fw[:warm]
            fi, bi = warm, 0
            while fi < m:
                ops.append(fw[fi]); fi += 1
                ops.append(bw[bi]); bi += 1
            ops += bw[bi:]
        else:
            total = m * v

            def fwd(k: int) -> tuple[str, int, int]:
                return ("F", (k // p) % v, (k // (p * v)) * p + k % p)

            def bwd(k: int) -> tuple[str, int, int]:
                return ("B", v - 1 - (k // p) % v, (k // (p * v)) * p + k % p)

            warm = min((p - i - 1) * 2 + (v - 1) * p, total)
            ops = [fwd(k) for k in range(warm)]
            fi, bi = warm, 0
            while fi < total:
                ops.append(fwd(fi)); fi += 1
                ops.append(bwd(bi)); bi += 1
            ops += [bwd(k) for k in range(bi, total)]
        orders.append(ops)
    return orders


def simulate_schedule(plan: Plan, backward_ratio: float = 2.0) -> list[ScheduleBox]:
    """Start/end of every microbatch forward and backward, from the stages' predicted times.

    Stage.compute_s is forward+backward per microbatch; the backward is taken as
    ``backward_ratio`` times the forward (2x: a backward computes gradients for both inputs
    and weights, Narayanan et al. 2021 sec. 3.3). A forward of virtual stage j waits for the
    forward of j-1 on the same microbatch, a backward for the backward of j+1 and its own
    forward; each rank runs its operations in schedule order. Point-to-point transfer time
    is not drawn.
    """
    pr = plan.pipeline
    pp = max(1, plan.mesh["pp"])
    v = pr.virtual_stages
    m = pr.num_microbatches
    stages = pr.stages
    n_virtual = pp * v
    # Per virtual stage fwd time; stages are listed per virtual stage (chunk c of rank i = c*pp + i).
    t_stage = [stages[j].compute_s if j < len(stages) else 0.0 for j in range(n_virtual)]
    if not any(t_stage):
        t_stage = [1.0] * n_virtual  # no figures: draw the shape of the schedule, unit times
    fwd = [t / (1 + backward_ratio) for t in t_stage]
    bwd = [t * backward_ratio / (1 + backward_ratio) for t in t_stage]
    orders = _rank_orders(pr.schedule, pp, m, v)
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * pp
    free = [0.0] * pp
    boxes: list[ScheduleBox] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(pp):
            while pos[i] < len(orders[i]):
                kind, c, mb = orders[i][pos[i]]
                j = c * pp + i
                if kind == "F":
                    deps = [("F", j - 1, mb)] if j > 0 else []
                else:
                    deps = [("F", j, mb)] + ([("B", j + 1, mb)] if j < n_virtual - 1 else [])
                if any(d not in done for d in deps):
                    break
                start = max([free[i]] + [done[d] for d in deps])
                end = start + (fwd[j] if kind == "F" else bwd[j])
                done[(kind, j, mb)] = end
                free[i] = end
                boxes.append(ScheduleBox(i, c, mb, kind, start, end))
                pos[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"pipeline schedule {pr.schedule!r} with {pp} stages, {m} microbatches, "
                             f"{v} virtual stages deadlocks in simulation (microbatches should be a "
                             f"multiple of the stage count for interleaved_1f1b)")
    return boxes


# ---------------------------------------------------------------------------------------
# the picture


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def render_png(plan: Plan, path: str, dpi: int = 120) -> str:
    """Draw the pipeline schedule and per-device memory to ``path`` (PNG); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise PlotUnavailable("drawing a plan needs matplotlib, which is not installed; install it with "
                              "`pip install 'autopar[plot]'` (or `pip install matplotlib`)") from None

    fig, (ax_s, ax_m) = plt.subplots(2, 1, figsize=(12, 7.5), gridspec_kw={"height_ratios": [1.2, 1]})
    m = plan.mesh
    fig.suptitle(f"{plan.model.name} on {plan.cluster.get('name', '?')}   mesh pp={m['pp']} dp={m['dp']} "
                 f"tp={m['tp']}   predicted step {fmt_seconds(plan.predicted.step_time_s)}", fontsize=12)

    # schedule
    pr = plan.pipeline
    pp = max(1, m["pp"])
    boxes = simulate_schedule(plan)
    cmap = plt.get_cmap("tab20")
    label_boxes = pr.num_microbatches * pr.virtual_stages <= 32
    for b in boxes:
        base = cmap((b.microbatch % 10) * 2 + (1 if b.kind == "B" else 0))
        ax_s.barh(b.rank, b.end - b.start, left=b.start, height=0.8, color=base,
                  edgecolor="black", linewidth=0.4, hatch="//" if b.kind == "B" else None)
        if label_boxes:
            txt = f"{b.kind}{b.microbatch}" + (f".{b.chunk}" if pr.virtual_stages > 1 else "")
            ax_s.text((b.start + b.end) / 2, b.rank, txt, ha="center", va="center", fontsize=7)
    ax_s.set_yticks(range(pp))
    ax_s.set_yticklabels([f"stage {i}" if pr.virtual_stages == 1 else f"rank {i}" for i in range(pp)])
    ax_s.invert_yaxis()
    real_times = any(s.compute_s for s in pr.stages)
    ax_s.set_xlabel("time in one step (s)" if real_times else "time (unit per stage: no predicted stage times)")
    end = max((b.end for b in boxes), default=1.0)
    busy = sum(b.end - b.start for b in boxes) / (pp * end) if end else 1.0
    ax_s.set_title(f"pipeline: {pr.schedule}, {pr.num_microbatches} microbatches"
                   + (f", {pr.virtual_stages} chunks per rank" if pr.virtual_stages > 1 else "")
                   + f"  (simulated idle {100 * (1 - busy):.0f}%; F = forward, hatched B = backward)",
                   fontsize=10)
    ax_s.legend(handles=[Patch(facecolor="white", edgecolor="black", label="forward"),
                         Patch(facecolor="white", edgecolor="black", hatch="//", label="backward")],
                loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)

    # memory: a bar per device, or per stage (min..max whisker) when there are too many devices
    mem = list(plan.predicted.memory_per_device_bytes)
    cap = plan.predicted.memory_capacity_bytes
    stage_of = {}
    for s in pr.stages:
        for r in s.ranks:
            stage_of[r] = s.index % pp
    per_device = len(mem) <= 64
    if mem and per_device:
        xs = list(range(len(mem)))
        colors = [cmap((stage_of.get(r, 0) % 10) * 2) for r in xs]
        ax_m.bar(xs, [b / GiB for b in mem], width=0.8, color=colors, edgecolor="black", linewidth=0.3)
        ax_m.set_xlim(-0.5, len(mem) - 0.5)
        ax_m.set_xlabel("rank")
    elif mem:
        rows = memory_rows(plan)
        xs = list(range(len(rows)))
        hi = [r.max_bytes / GiB for r in rows]
        lo = [r.min_bytes / GiB for r in rows]
        ax_m.bar(xs, hi, width=0.6, color=[cmap((i % 10) * 2) for i in xs], edgecolor="black", linewidth=0.5)
        ax_m.errorbar(xs, hi, yerr=[[h - l for h, l in zip(hi, lo)], [0] * len(hi)], fmt="none", ecolor="black",
                      capsize=4)
        ax_m.set_xlim(-1, len(rows))
        ax_m.set_xticks(xs)
        ax_m.set_xticklabels([f"{r.label}\nranks {fmt_ranks(r.ranks)}" for r in rows], fontsize=8)
        ax_m.set_xlabel(f"{len(mem)} devices, grouped by pipeline stage (bar = fullest device, whisker down to "
                        f"the emptiest)")
    if mem:
        if cap:
            ax_m.axhline(cap / GiB, color="red", linestyle="--", linewidth=1.2,
                         label=f"capacity {fmt_bytes(cap)}")
            ax_m.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        over = sum(1 for b in mem if cap and b > cap)
        bd = plan.predicted.memory_breakdown
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(bd.items(), key=lambda kv: -kv[1])[:4])
        ax_m.set_title("predicted peak memory per device" + (" (colour = pipeline stage)" if per_device else "")
                       + (f"; {over} devices over capacity" if over else "")
                       + (f"\nfullest device: {parts}" if parts else ""), fontsize=10)
    else:
        ax_m.text(0.5, 0.5, "the plan has no per-device memory prediction", ha="center", va="center",
                  transform=ax_m.transAxes)
        ax_m.set_xlabel("rank")
    ax_m.set_ylabel("GiB")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
