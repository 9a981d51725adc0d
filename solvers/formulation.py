r"""The mixed-integer program for one candidate (mesh, microbatches, schedule, stage sizes).

Sets: units U (nodes the solver decides; one representative block B \subseteq U stands for
all L blocks), strategies S_u, edges E with cost matrices c_e, parameter groups G =
{block, outside} with state configs K (ZeRO stage x offloaded classes), pipeline ranks
i = 0..p-1 with k_i blocks, device d_i, in-flight microbatches f_i and capacity M_i.

Variables
    x[u,s]   in {0,1}   unit u runs strategy s                       sum_s x[u,s] = 1
    w[g,c]   in {0,1}   parameter group g uses state config c        sum_c w[g,c] = 1
    y[u,s,c] in [0,1]   x[u,s] AND w[g(u),c] for units owning params (integral given x, w)
                         sum_c y[u,s,c] = x[u,s],  sum_s y[u,s,c] = w[g,c]
    z[e,s,t] in [0,1]   edge e runs (s, t):  sum_t z[e,s,t] = x[src,s], sum_s z[e,s,t] = x[dst,t]
                         (exact for one-hot x, and a tight LP relaxation); c_e = inf fixes z = 0
    r_i, o_i in Z       blocks recomputed / with offloaded activations on rank i,
                         0 <= r_i + o_i <= k_i
    R[i,u,s], O[i,u,s]  = r_i x[u,s], o_i x[u,s]  (u in B), exact for one-hot x:
                         0 <= R[i,u,s] <= k_i x[u,s]  and  sum_s R[i,u,s] = r_i
                         (the x[u,s] = 0 terms vanish, so the remaining one equals r_i)
    t_i, t_max, a_i, g_i, w_i, Q >= 0    continuous

Objective (seconds per step; see :mod:`.evaluate` for the same model in plain Python)
    min  m t_max + (sum_i t_i - t_max)/v + 2 (v p - 1) P(x) + Q

Constraints, one family per function below:
    time_i      t_i >= sum_u mult_i(u) c_u x + sum_e mult_i(e) c_e z + sum F_us R[i,u,s]
                t_i >= sum 2 (A - C)_us O[i,u,s] / host_bw                  (_stage_time)
    t_max       t_max >= t_i                                             (_stage_time)
    memory_i,k  for each moment k the peak can sit at (evaluate.moments: the loss's
                backward, gradients beside later microbatches, the optimizer step), with
                f_ik microbatches of activations in flight then (f_i, min(f_i, m-1), 0):
                sum mult y state_mem_k + working y + w_i [+ u_i] + f_ik (sum mult act x
                  - sum (A - C)_us (R + O)[i,u,s]) + loss_ik <= M_i              (_memory)
                state_mem_k leaves the gradients out at the loss's backward and adds the
                foreach step temporaries at the optimizer step
                w_i >= gather_n y  for each parameter node n  (the largest transient gather)
                u_i >= step_n y  (the largest single-tensor step temporary; optimizer step)
    host_i      sum mult y state_host + f_i sum (A - C)_us O[i,u,s] <= H_i    (_memory)
    per-step    a_i >= overlap_i(y) - e m t_i;  g_i >= sync_i(x, y) - e beta t_i;
                a_i >= (1 - e) overlap_i(y);  g_i >= (1 - e) sync_i(x, y)  (e: overlap efficiency)
                Q >= a_i + g_i + step_i(y)                                (_objective)
    cutoff      objective <= the best plan of earlier candidates (optional)   (build)

Split pipelines (:func:`build_split`, used by :mod:`.hetero` on mixed clusters): stage k is a
costed graph of its own (own nodes, own device, one stage each); the families above are built
per stage on one solver, joined by

    T >= t_k,  T >= c_b,  Q >= a_k + g_k + step_k,   min (m - 1) T + sum_k t_k + sum_b c_b + Q

with c_b the fixed per-microbatch transfer time of boundary b (a pipeline stage of its own), and
strategies that would leave a crossing tensor Partial fixed to 0.

Units: time in milliseconds and memory in GiB inside the model (well-scaled coefficients);
the decoder re-evaluates the decision with :func:`.evaluate.evaluate` in seconds/bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ortools.linear_solver import pywraplp

from .costed import BACKWARD_SHARE, CostedGraph
from .evaluate import edge_mult, group_of, moments, param_holders, stage_mult

MS = 1e3  # seconds -> model time unit
GIB = float(2**30)  # bytes -> model memory unit


Terms = dict  # variable -> coefficient: a linear expression kept as a plain dict (fast to build)


def _add(terms: Terms, var, coef: float) -> None:
    if coef:
        terms[var] = terms.get(var, 0.0) + coef


def _constraint(solver, terms: Terms, lb: float, ub: float, name: str = ""):
    c = solver.Constraint(lb, ub, name)
    for v, k in terms.items():
        c.SetCoefficient(v, k)
    return c


@dataclass
class Model:
    """The pywraplp model plus the variables the decoder reads (no flat arrays)."""

    solver: pywraplp.Solver
    x: dict[str, list]  # unit -> per strategy var
    w: dict[str, list]  # group -> per config var
    r: list  # per stage: var, or the fixed int
    o: list
    t: list

    @property
    def num_variables(self) -> int:
        return self.solver.NumVariables()

    @property
    def num_constraints(self) -> int:
        return self.solver.NumConstraints()


def build(cg: CostedGraph, backend: str = "SCIP", fixed: Optional[dict] = None,
          cutoff_s: Optional[float] = None) -> Model:
    """The MIP for ``cg``. ``fixed`` pins parts: {"recompute": "none" | "full",
    "config_allowed": [config indices], "no_activation_offload": True,
    "activation_offload": "full"}. ``cutoff_s``: only
    plans faster than this are wanted (the best plan of other candidates), which lets the
    backend prove "nothing better here" from its bound."""
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise RuntimeError(f"OR-Tools backend {backend!r} is not available")
    fixed = fixed or {}
    x = _strategy_vars(solver, cg)
    w = _config_vars(solver, cg, fixed)
    y = _state_vars(solver, cg, x, w)
    z = _edge_vars(solver, cg, x)
    r, o, R, O = _block_policy_vars(solver, cg, x, fixed)
    t = _stage_time(solver, cg, x, z, R, O)
    _memory(solver, cg, x, y, R, O)
    obj = _objective(solver, cg, x, y, t)
    objective = solver.Objective()
    for v, k in obj.items():
        objective.SetCoefficient(v, k)
    objective.SetMinimization()
    if cutoff_s is not None and math.isfinite(cutoff_s):
        _constraint(solver, obj, -solver.infinity(), cutoff_s * MS, "cutoff")
    return Model(solver, x, w, r, o, t)


def _strategy_vars(solver, cg: CostedGraph) -> dict[str, list]:
    x = {}
    for n in cg.nodes:
        vs = [solver.BoolVar(f"x[{n.name},{k}]") for k in range(len(n.strategies))]
        _constraint(solver, {v: 1.0 for v in vs}, 1, 1, f"one_strategy[{n.name}]")
        x[n.name] = vs
    return x


def _config_vars(solver, cg: CostedGraph, fixed: dict) -> dict[str, list]:
    groups = sorted({group_of(n) for n in cg.nodes if n.state is not None})
    allowed = fixed.get("config_allowed")
    w = {}
    for g in groups:
        vs = [solver.BoolVar(f"w[{g},{c.label}]") for c in cg.configs]
        _constraint(solver, {v: 1.0 for v in vs}, 1, 1, f"one_config[{g}]")
        if allowed is not None:
            for k, v in enumerate(vs):
                if k not in allowed:
                    v.SetUb(0)
        w[g] = vs
    return w


def _state_vars(solver, cg: CostedGraph, x, w) -> dict[str, dict]:
    """y[u,s,c] = x[u,s] AND w[g,c] through both marginals (exact for one-hot x and w)."""
    y: dict[str, dict] = {}
    for n in cg.nodes:
        if n.state is None:
            continue
        g = group_of(n)
        ys = {}
        for s in range(len(n.strategies)):
            for c in range(len(cg.configs)):
                if not any(math.isinf(n.state[st.device][s][c].memory_bytes) for st in cg.stages):
                    ys[s, c] = solver.NumVar(0.0, 1.0, f"y[{n.name},{s},{c}]")
        for s in range(len(n.strategies)):
            terms = {v: 1.0 for (a, _), v in ys.items() if a == s}
            terms[x[n.name][s]] = -1.0
            _constraint(solver, terms, 0, 0)
        for c in range(len(cg.configs)):
            terms = {v: 1.0 for (_, b), v in ys.items() if b == c}
            terms[w[g][c]] = -1.0
            _constraint(solver, terms, 0, 0)
        y[n.name] = ys
    return y


def _pair_vars(solver, e, x) -> dict:
    """Indicators z[s, t] of one edge with both marginals (the tight form of Alpa's
    linearisation: sum_t z[s,t] = x[src,s], sum_s z[s,t] = x[dst,t]); infinite-cost pairs are
    fixed to 0."""
    zs = {}
    for a, row in enumerate(e.cost_s):
        for b, c in enumerate(row):
            zs[a, b] = solver.NumVar(0.0, 0.0 if math.isinf(c) else 1.0, "")
    for a in range(len(e.cost_s)):
        terms = {zs[a, b]: 1.0 for b in range(len(e.cost_s[a]))}
        terms[x[e.src][a]] = -1.0
        _constraint(solver, terms, 0, 0)
    for b in range(len(e.cost_s[0])):
        terms = {zs[a, b]: 1.0 for a in range(len(e.cost_s))}
        terms[x[e.dst][b]] = -1.0
        _constraint(solver, terms, 0, 0)
    return zs


def _edge_vars(solver, cg: CostedGraph, x) -> dict[int, dict]:
    """Per edge, its pair indicators (:func:`_pair_vars`) that carry a finite positive cost."""
    z = {}
    for ei, e in enumerate(cg.edges):
        zs = _pair_vars(solver, e, x)
        z[ei] = {k: v for k, v in zs.items() if not math.isinf(e.cost_s[k[0]][k[1]]) and e.cost_s[k[0]][k[1]] > 0}
    return z


def _block_policy_vars(solver, cg: CostedGraph, x, fixed: dict):
    """r_i, o_i and their exact products with the block strategies."""
    block = [n for n in cg.nodes if n.place == "block"]
    rec_ok = "recompute" in cg.allowed and bool(block)
    pin_r = fixed.get("recompute")  # None | "none" | "full"
    r, o, R, O = [], [], {}, {}
    for i, st in enumerate(cg.stages):
        K = st.num_blocks
        ri = solver.IntVar(0, K, f"r[{i}]") if (rec_ok and K > 0 and pin_r != "none") else 0
        if pin_r == "full" and not isinstance(ri, int):
            ri.SetLb(K)
        off_ok = ("offload" in cg.allowed and st.host_link and K > 0 and bool(block)
                  and not fixed.get("no_activation_offload"))
        oi = solver.IntVar(0, K, f"o[{i}]") if off_ok else 0
        if fixed.get("activation_offload") == "full" and not isinstance(oi, int):
            oi.SetLb(K)
        if not isinstance(ri, int) and not isinstance(oi, int):
            _constraint(solver, {ri: 1.0, oi: 1.0}, 0, K)
        r.append(ri)
        o.append(oi)
        F, AC = _block_sums(cg, i)
        for var, prod in ((ri, R), (oi, O)):
            if isinstance(var, int):
                continue
            for n in block:
                if not any(F[n.name, s] or AC[n.name, s] for s in range(len(n.strategies))):
                    continue  # the product never enters time or memory
                row: Terms = {var: -1.0}  # sum_s pv[s] = var (tightens the relaxation)
                for s in range(len(n.strategies)):
                    pv = solver.NumVar(0.0, K, "")
                    xs = x[n.name][s]
                    # pv <= K x; with sum_s pv = var below this pins pv = var x exactly (one-hot x)
                    _constraint(solver, {pv: 1.0, xs: -K}, -solver.infinity(), 0)
                    prod[i, n.name, s] = pv
                    row[pv] = 1.0
                _constraint(solver, row, 0, 0)
    return r, o, R, O


def _block_sums(cg: CostedGraph, i: int):
    """Per block unit and strategy: forward time F and (A - C) checkpoint saving."""
    dev = cg.stages[i].device
    F, AC = {}, {}
    for n in cg.nodes:
        if n.place != "block":
            continue
        for s in range(len(n.strategies)):
            F[n.name, s] = n.forward_s[dev][s]
            AC[n.name, s] = n.act_bytes[s] - (n.out_bytes[s] if n.name in cg.chain_outputs else 0.0)
    return F, AC


def _stage_time(solver, cg: CostedGraph, x, z, R, O) -> list:
    places = {n.name: n.place for n in cg.nodes}
    inf = solver.infinity()
    t = []
    t_max = solver.NumVar(0.0, inf, "t_max")
    for i, st in enumerate(cg.stages):
        dev = st.device
        ti = solver.NumVar(0.0, inf, f"t[{i}]")
        terms: Terms = {ti: 1.0}
        for n in cg.nodes:
            k = stage_mult(cg, n.place, i)
            if k:
                for c, v in zip(n.compute_s[dev], x[n.name]):
                    _add(terms, v, -k * MS * c)
        for ei, e in enumerate(cg.edges):
            k = edge_mult(cg, e, places[e.dst], i)
            if k:
                for (a, b), v in z[ei].items():
                    _add(terms, v, -k * MS * e.cost_s[a][b])
        F, AC = _block_sums(cg, i)
        for (j, u, s), v in R.items():
            if j == i:
                _add(terms, v, -MS * F[u, s])
        _constraint(solver, terms, 0, inf, f"time[{i}]")
        hb = cg.host_bw.get(dev, 0.0)
        if hb > 0:
            off: Terms = {ti: 1.0}
            for (j, u, s), v in O.items():
                if j == i:
                    _add(off, v, -MS * 2 * AC[u, s] / hb)
            if len(off) > 1:
                _constraint(solver, off, 0, inf, f"offload_time[{i}]")
        _constraint(solver, {t_max: 1.0, ti: -1.0}, 0, inf)
        t.append(ti)
    t.append(t_max)
    return t


def _held_states(cg: CostedGraph, y, n, i: int, dev: str):
    """(copies on stage i, state cost, indicator variable) for each (strategy, config) choice
    of node ``n``'s parameters held on stage ``i``; nothing for a node without parameters."""
    if n.state is None:
        return
    for j, kk in param_holders(cg, n):
        if j == i:
            for (s, c), v in y[n.name].items():
                yield kk, n.state[dev][s][c], v


def _memory(solver, cg: CostedGraph, x, y, R, O) -> None:
    """Per stage, its bytes at each moment the peak can sit (evaluate.moments) within its
    capacity: the loss's backward (activations, no gradients), gradients beside the
    microbatches still in flight, the optimizer step (gradients and its temporaries)."""
    m = cg.candidate.num_microbatches
    for i, st in enumerate(cg.stages):
        dev = st.device
        # the largest node's transient gather and (one tensor at a time) step temporaries:
        # w >= each node's chosen bytes
        maxvars = {}
        for kind, attr in (("gather", "gather_bytes"), ("step", "step_max_bytes")):
            rows = [[(getattr(sc, attr), v) for _, sc, v in _held_states(cg, y, n, i, dev)] for n in cg.nodes]
            rows = [row for row in rows if any(b > 0 for b, _ in row)]
            if rows:
                w = solver.NumVar(0.0, solver.infinity(), f"{kind}[{i}]")
                for row in rows:
                    _constraint(solver, {w: 1.0, **{v: -b / GIB for b, v in row if b > 0}}, 0, solver.infinity())
                maxvars[kind] = w
        _, AC = _block_sums(cg, i)
        for name, (acts, with_grads, with_step, extra) in moments(st, m, cg.loss_bytes if st.suffix else 0.0).items():
            terms: Terms = {}
            for n in cg.nodes:
                k = stage_mult(cg, n.place, i)
                if k and acts:
                    for a, v in zip(n.act_bytes, x[n.name]):
                        _add(terms, v, acts * k * a / GIB)
                for kk, sc, v in _held_states(cg, y, n, i, dev):
                    b = kk * (sc.memory_bytes + sc.working_bytes)
                    if not with_grads:
                        b -= kk * sc.grad_bytes
                    if with_step:
                        b += kk * sc.step_sum_bytes
                    _add(terms, v, b / GIB)
            if "gather" in maxvars:
                _add(terms, maxvars["gather"], 1.0)
            if with_step and "step" in maxvars:
                _add(terms, maxvars["step"], 1.0)
            if acts:
                for prod in (R, O):
                    for (j, u, s), v in prod.items():
                        if j == i:
                            _add(terms, v, -acts * AC[u, s] / GIB)
            _constraint(solver, terms, -solver.infinity(), (st.capacity_bytes - extra) / GIB, f"memory[{i}].{name}")
        host: Terms = {}
        for n in cg.nodes:
            for kk, sc, v in _held_states(cg, y, n, i, dev):
                _add(host, v, kk * sc.host_bytes / GIB)
        for (j, u, s), v in O.items():
            if j == i:
                _add(host, v, st.inflight * AC[u, s] / GIB)
        if host:
            _constraint(solver, host, -solver.infinity(), st.host_capacity_bytes / GIB, f"host_memory[{i}]")


def _objective(solver, cg: CostedGraph, x, y, t) -> Terms:
    cand = cg.candidate
    m, v, p = cand.num_microbatches, cand.virtual_stages, cand.pp
    inf = solver.infinity()
    t_stage, t_max = t[:-1], t[-1]
    obj: Terms = {}
    _add(obj, t_max, m - 1.0 / v)
    for ti in t_stage:
        _add(obj, ti, 1.0 / v)
    if p > 1:
        for j, u in enumerate(cg.chain_outputs):
            n = cg.node(u)
            lat = cg.p2p_latency_s if j == 0 else 0.0  # one message per boundary (sum_s x = 1)
            for b, xv in zip(n.out_bytes, x[u]):
                _add(obj, xv, 2 * (v * p - 1) * MS * (b * cg.p2p_s_per_byte + lat))
    Q = solver.NumVar(0.0, inf, "Q")
    _add(obj, Q, 1.0)
    _step_bound(solver, cg, x, y, t_stage, Q)
    return obj


def _step_bound(solver, cg: CostedGraph, x, y, t_stage: list, Q) -> None:
    """Q >= a_i + g_i + step_i for every stage of ``cg`` (exposed per-step communication)."""
    m = cg.candidate.num_microbatches
    inf = solver.infinity()
    for i, st in enumerate(cg.stages):
        dev = st.device
        e = cg.overlap_efficiency
        a = solver.NumVar(0.0, inf, f"a[{i}]")
        g = solver.NumVar(0.0, inf, f"g[{i}]")
        over: Terms = {a: 1.0, t_stage[i]: e * m}  # a >= overlap - e m t_i
        sync: Terms = {g: 1.0, t_stage[i]: e * BACKWARD_SHARE}  # g >= sync - e beta t_i
        over_min: Terms = {a: 1.0}  # a >= (1 - e) overlap: what never hides
        sync_min: Terms = {g: 1.0}  # g >= (1 - e) sync
        step: Terms = {Q: 1.0, a: -1.0, g: -1.0}  # Q >= a + g + step
        for n in cg.nodes:
            k = stage_mult(cg, n.place, i)
            if k:
                for c, xv in zip(n.tp_sync_s, x[n.name]):
                    _add(sync, xv, -k * MS * c)
                    if e < 1.0:
                        _add(sync_min, xv, -(1.0 - e) * k * MS * c)
            for kk, sc, yv in _held_states(cg, y, n, i, dev):
                _add(over, yv, -kk * MS * sc.overlap_s)
                _add(sync, yv, -kk * MS * sc.sync_s)
                _add(step, yv, -kk * MS * sc.step_s)
                if e < 1.0:
                    _add(over_min, yv, -(1.0 - e) * kk * MS * sc.overlap_s)
                    _add(sync_min, yv, -(1.0 - e) * kk * MS * sc.sync_s)
        _constraint(solver, over, 0, inf, f"overlap[{i}]")
        _constraint(solver, sync, 0, inf, f"sync[{i}]")
        if e < 1.0:
            _constraint(solver, over_min, 0, inf, f"overlap_min[{i}]")
            _constraint(solver, sync_min, 0, inf, f"sync_min[{i}]")
        _constraint(solver, step, 0, inf, f"step[{i}]")


class _Tagged:
    """A pywraplp solver whose new variables and constraints get a name prefix."""

    def __init__(self, solver, tag: str):
        self._s, self._tag = solver, tag

    def BoolVar(self, name):
        return self._s.BoolVar(self._tag + name if name else "")

    def NumVar(self, lb, ub, name):
        return self._s.NumVar(lb, ub, self._tag + name if name else "")

    def IntVar(self, lb, ub, name):
        return self._s.IntVar(lb, ub, self._tag + name if name else "")

    def Constraint(self, lb, ub, name=""):
        return self._s.Constraint(lb, ub, self._tag + name if name else "")

    def __getattr__(self, attr):
        return getattr(self._s, attr)


def build_split(cgs: list[CostedGraph], link_s: tuple[float, ...], backend: str = "CBC",
                cutoff_s: Optional[float] = None, forbid: Optional[dict] = None,
                fixed: Optional[list[dict]] = None) -> list[Model]:
    """One MIP for a split pipeline (:mod:`.hetero`): stage k is its own single-stage costed
    graph ``cgs[k]`` (own device, own nodes), all with m microbatches under 1F1B:

        min  m T + sum_k t_k + sum_b c_b - T + Q,   T >= t_k,  T >= c_b,  Q >= a_k + g_k + step_k

    with every family above built per stage, and c_b = ``link_s[b]`` the fixed seconds per
    microbatch of boundary b's activation and gradient transfers (a link is a pipeline stage of
    its own). ``forbid`` maps stage -> unit -> strategy indices fixed to 0 (a tensor crossing
    stages must not be left Partial); ``fixed`` per stage as in :func:`build`. Returns one
    Model per stage, sharing the solver."""
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise RuntimeError(f"OR-Tools backend {backend!r} is not available")
    inf = solver.infinity()
    m = cgs[0].candidate.num_microbatches
    T = solver.NumVar(max(link_s, default=0.0) * MS, inf, "T")
    Q = solver.NumVar(0.0, inf, "Q")
    obj: Terms = {T: m - 1.0, Q: 1.0}
    models = []
    root = solver
    for k, cg in enumerate(cgs):
        solver = _Tagged(root, f"s{k}.")  # OR-Tools wants unique names across the stages
        x = _strategy_vars(solver, cg)
        for u, idxs in (forbid or {}).get(k, {}).items():
            for s in idxs:
                x[u][s].SetUb(0)
        w = _config_vars(solver, cg, (fixed or [{}] * len(cgs))[k])
        y = _state_vars(solver, cg, x, w)
        z = _edge_vars(solver, cg, x)
        r, o, R, O = _block_policy_vars(solver, cg, x, {})
        t = _stage_time(solver, cg, x, z, R, O)
        _memory(solver, cg, x, y, R, O)
        _step_bound(solver, cg, x, y, t[:-1], Q)
        for ti in t[:-1]:
            _add(obj, ti, 1.0)
        _constraint(solver, {T: 1.0, t[-1]: -1.0}, 0, inf)
        models.append(Model(root, x, w, r, o, t))
    solver = root
    objective = solver.Objective()
    for v, c in obj.items():
        objective.SetCoefficient(v, c)
    objective.SetOffset(sum(link_s) * MS)
    objective.SetMinimization()
    if cutoff_s is not None and math.isfinite(cutoff_s):
        _constraint(solver, obj, -inf, (cutoff_s - sum(link_s)) * MS, "cutoff")
    return models


def build_relaxed(cg: CostedGraph, places: tuple[str, ...] = ("block", "prefix", "suffix"),
                  per_block: bool = False) -> tuple[pywraplp.Solver, dict]:
    """A lower bound on one microbatch's time through the units of ``places``, whatever the
    schedule, stage sizes, memory or state configs:

        S = min  sum_u mult(u) c_u x_u + sum_e mult(e) c_e z_e     over the LP relaxation

    with mult the total multiplicity over all stages (L for block units, L - 1 for chain
    edges), or 1 per block (chain edges left out) when ``per_block``; edges leaving
    ``places`` are left out (costs are >= 0, so this stays a bound). Solved as an LP (GLOP):
    a valid bound even when fractional."""
    solver = pywraplp.Solver.CreateSolver("GLOP")
    L = cg.num_blocks
    chosen = [n for n in cg.nodes if n.place in places]
    names = {n.name for n in chosen}
    x = {}
    for n in chosen:
        vs = [solver.NumVar(0.0, 1.0, "") for _ in n.strategies]
        _constraint(solver, {v: 1.0 for v in vs}, 1, 1)
        x[n.name] = vs
    obj: Terms = {}
    for n in chosen:
        # heterogeneous stages: the fastest device's time bounds every stage's
        fastest = [min(n.compute_s[st.device][s] for st in cg.stages) for s in range(len(n.strategies))]
        k = 1 if (n.place != "block" or per_block) else max(L, 1)
        for c, v in zip(fastest, x[n.name]):
            _add(obj, v, k * MS * c)
    for e in cg.edges:
        if e.src not in names or e.dst not in names:
            continue
        if e.kind == "chain":
            k = 0 if per_block else max(L - 1, 0)
        elif e.kind in ("intra", "fanin"):
            k = 1 if per_block else L
        else:
            k = 1
        if not k:
            continue
        zs = _pair_vars(solver, e, x)
        for (a, b), var in zs.items():
            c = e.cost_s[a][b]
            if not math.isinf(c):
                _add(obj, var, k * MS * c)
    objective = solver.Objective()
    for v, k in obj.items():
        objective.SetCoefficient(v, k)
    objective.SetMinimization()
    return solver, x


def _lp_value(solver) -> float:
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return 0.0  # a trivially valid bound
    return max(0.0, solver.Objective().Value() / MS * (1 - 1e-9))


def relaxed_bound(cg: CostedGraph) -> dict[str, float]:
    """Seconds per microbatch: "total" (all units, see :func:`build_relaxed`) and, for stage
    bounds, "block" (one block), "prefix" and "suffix" (each on its own)."""
    out = {"total": _lp_value(build_relaxed(cg)[0])}
    if cg.num_blocks:
        out["block"] = _lp_value(build_relaxed(cg, ("block",), per_block=True)[0])
        out["prefix"] = _lp_value(build_relaxed(cg, ("prefix",))[0])
        out["suffix"] = _lp_value(build_relaxed(cg, ("suffix",))[0])
    return out
