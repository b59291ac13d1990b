"""Models prepared for many inference calls, and the rule that says when that pays.

    net = frozen(model)                  # eval, requires_grad False, compiled, weights frozen
    v = net(z, t, y=labels)              # same call as model(z, t, **cond); no gradients

`frozen(model, *, compile=True, mode=None, eval=True)` returns a `FrozenModel`: the model
compiled with torch.compile for calls without gradients, with Inductor weight freezing (the
weights are folded into the compiled graph as constants, so convolutions get prepacked
weights on CPU) and, on CUDA, `mode="reduce-overhead"` (CUDA graphs: a call replays one
recorded graph, no per-kernel launch or Python overhead). It is cached per module: a second
`frozen(model)` returns the same compiled graph while the weights are unchanged.

Memory: a frozen graph holds its own reference to the weights it was compiled with (from
C++; measured on CPU: moving the module to "meta" afterwards frees nothing), so a compiled
model's weights stay alive for the life of the process. Do not freeze a model whose memory
must come back.

Freezing bakes the weights in, so a graph compiled before the weights changed must never
run after: every call compares the weights' identity, storage and version counter (an
in-place update such as an optimizer step, `load_state_dict` or an EMA lerp bumps it) with
those at compile time (about 50 us for 150 tensors), and compiles afresh when they differ.
Not seen: writes through `param.data` (a tensor with a version counter of its own, so
nothing tells such a write apart from no write); after one, call `refreeze(model)`.

Two facts about torch 2.13 that shape the code (measured here):

* `torch.compile(m, options={"freezing": True})` does *not* freeze: Dynamo decides whether
  parameters become graph constants from the global `torch._inductor.config.freezing` at
  trace time, and `options` only reach Inductor later, so the parameters stay graph inputs
  (the generated code even re-lays out conv weights on every call). Here the global switch
  is set, with `torch._inductor.config.patch`, around each call of the compiled graph.
* Dynamo keeps its compiled code on the code object of the function it starts tracing
  (for `torch.compile(module)`, nn.Module's own call machinery, shared by every module),
  guarded by the parameters' identity: a frozen graph would be reused for the same module
  after an in-place weight update, even through a new `torch.compile` wrapper. So each
  compile here traces a function made fresh for it (its own code object); dropping it
  drops that compiled code, and no global `torch._dynamo.reset()` is needed.

The frozen graph is compiled whole (`fullgraph=True`); a model Dynamo cannot capture in one
graph is compiled without freezing instead (its parameters stay graph inputs, so updated
weights are read as they are), and a model that fails to compile at all runs eagerly, with
one warning. Either way the first call says which, in `FrozenModel.info`.

When compiling pays (`sample(compile=None)`, `use_compiled`): a compile costs a fixed
`COMPILE_SECONDS[device]` (a prior: 25-100 s for the demo U-Net on this project's CPU,
depending on load) and then saves `1 - 1/SPEEDUP[device]` of every network call. With the
seconds per call measured on the model's own eager calls, compile when

    expected further calls x seconds per call x (1 - 1/SPEEDUP) >= COMPILE_SECONDS,

where the expected further calls are what the caller announced (`repeat`), or else as many
as the model has made so far (the ski-rental rule: the time lost to compiling too early or
too late is at most the compile time once more).
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FrozenModel", "frozen", "refreeze", "weights_key", "usage", "use_compiled",
           "SPEEDUP", "COMPILE_SECONDS"]

#: expected eager / compiled seconds per network call (priors; measure and override for
#: another machine): this project's CPU (AMD EPYC, AVX2, torch 2.13, 1 thread) runs the
#: frozen, compiled demo U-Net about 1.4x eager; CUDA graphs remove the launch overhead that
#: dominates a small model's few-step loop on a GPU (not measured here: no GPU).
SPEEDUP = {"cpu": 1.4, "cuda": 1.5}
#: expected seconds of a first compile (priors, as above)
COMPILE_SECONDS = {"cpu": 40.0, "cuda": 60.0}


# ---------------------------------------------------------------- weights
def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def weights_key(module: nn.Module) -> tuple:
    """What must not change under a frozen graph: for each parameter and buffer its identity,
    storage address, version counter (bumped by every in-place update outside `.data`),
    dtype, device and shape; plus the module's training flag."""
    return (module.training,) + tuple(
        (id(p), p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
        for p in _tensors(module))


def module_device(module) -> torch.device | None:
    """The device of the module's first parameter or buffer; None without any."""
    for p in _tensors(module) if isinstance(module, nn.Module) else ():
        return p.device
    return None


# ---------------------------------------------------------------- compiled graphs
def _shared_entry(module, *args, **kwargs):
    """The one function every `freeze=False` compile traces: its code object, and so
    Dynamo's cache, is shared by all of them, and a module of an architecture compiled
    before passes the guards of that code instead of building a graph again."""
    return module(*args, **kwargs)


_SHARED_FNS: dict = {}   # torch.compile of `_shared_entry`, by mode


def _fresh_entry() -> Callable:
    """`entry(module, *args, **kwargs) -> module(*args, **kwargs)` with a code object of its
    own (compiled from source each time), so that Dynamo's cache for it is this compile's
    alone and dies with it (see the module docstring)."""
    namespace: dict = {}
    source = "def entry(module, *args, **kwargs):\n    return module(*args, **kwargs)\n"
    exec(compile(source, "<fastdiff.engine.inference.entry>", "exec"), namespace)  # noqa: S102
    return namespace["entry"]


class _Graph:
    """One compile of one module (held weakly, so that caching it keeps nothing alive):
    `run(module, *args, **kwargs)` under no_grad, with the freezing switch on while tracing.

    state: "new" (not called yet), "frozen" / "compiled" (graph without frozen weights, for
    a model Dynamo cannot capture whole) / "eager" (compiling failed)."""

    def __init__(self, module: nn.Module, mode: str, freezing: bool, shared: bool = False):
        self.mode, self.freezing, self.shared = mode, freezing, shared
        self.key = weights_key(module)
        self.state = "new"
        self.compile_s: float | None = None
        self.note = ""
        self.cudagraphs = mode == "reduce-overhead" and module_device(module) is not None \
            and module_device(module).type == "cuda"
        self._fn = self._build(fullgraph=freezing)

    def _build(self, fullgraph: bool):
        kwargs = {} if self.mode == "default" else {"mode": self.mode}
        if self.shared:
            if self.mode not in _SHARED_FNS:
                _SHARED_FNS[self.mode] = torch.compile(_shared_entry, **kwargs)
            return _SHARED_FNS[self.mode]
        return torch.compile(_fresh_entry(), fullgraph=fullgraph, **kwargs)

    def _call(self, module, args, kwargs):
        with torch.no_grad():
            if self.freezing:
                # Dynamo reads this global at trace time (module docstring); it must be on
                # at every call, since a new input shape re-traces
                with torch._inductor.config.patch(freezing=True):
                    out = self._fn(module, *args, **kwargs)
            else:
                out = self._fn(module, *args, **kwargs)
        # a CUDA-graph output lives in memory the next replay overwrites: hand out a copy
        # (one tensor copy per call), so a caller may keep v1 while computing v2
        return out.clone() if self.cudagraphs and torch.is_tensor(out) else out

    def run(self, module, *args, **kwargs):
        if self.state != "new":
            if self.state == "eager":
                with torch.no_grad():
                    return module(*args, **kwargs)
            return self._call(module, args, kwargs)
        t0 = time.perf_counter()
        try:
            out = self._call(module, args, kwargs)
            self.state = "frozen" if self.freezing else "compiled"
        except Exception as first:  # noqa: BLE001 - decided below, against an eager call
            with torch.no_grad():
                out = module(*args, **kwargs)   # the caller's own error is raised from here
            if self.freezing and isinstance(first, torch._dynamo.exc.Unsupported):
                # a graph break: compile without frozen weights (they stay graph inputs,
                # so a later in-place update is read, whatever Dynamo's cache reuses)
                self.freezing = False
                self._fn = self._build(fullgraph=False)
                self.note = f"not captured whole, compiled without freezing: {first}"[:300]
                try:
                    out = self._call(module, args, kwargs)
                    self.state = "compiled"
                except Exception as second:  # noqa: BLE001
                    self._give_up(second)
            else:
                self._give_up(first)
        self.compile_s = time.perf_counter() - t0
        return out

    def _give_up(self, error: Exception) -> None:
        self.state = "eager"
        self.note = f"compile failed, running eagerly: {type(error).__name__}: {error}"[:300]
        warnings.warn(f"fastdiff.frozen: {self.note}", RuntimeWarning, stacklevel=4)


class FrozenModel:
    """A module prepared for inference, called like it: `net(z, t, **cond) -> v̂`.

    z float (B, ...), t float32 (B,), cond as the module takes them; returns what the module
    returns (v̂ of z's shape and dtype for fastdiff models), computed without gradients (under
    no_grad; inside an inference_mode region, inference tensors). Checks the weights on every
    call and compiles again when they changed (module docstring).

    Attributes: `module` (the nn.Module), `compile` (bool), `mode` ("default",
    "reduce-overhead", ...), `info` (a dict: state "eager" / "new" (compiled on the next call)
    / "frozen" / "compiled" / compile failed → "eager", first-call seconds, number of
    compiles, notes).
    """

    def __init__(self, module: nn.Module, core: _Core):
        self.module = module        # the caller's handle keeps the module alive
        self._core = core

    @property
    def compile(self) -> bool:
        return self._core.compile

    @property
    def mode(self) -> str:
        return self._core.mode

    @property
    def info(self) -> dict:
        return self._core.info()

    def __call__(self, *args, **kwargs):
        return self._core.run(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"FrozenModel({type(self.module).__name__}, {self.info})"


class _Core:
    """What the cache keeps per module: the settings and the current graph (no reference to
    the module itself: a WeakKeyDictionary value that held its key would never let it go)."""

    def __init__(self, compile: bool, mode: str, freezing: bool):
        self.compile, self.mode, self.freezing = compile, mode, freezing
        self.graph: _Graph | None = None
        self.compiles = 0

    def current(self, module: nn.Module) -> _Graph | None:
        if not self.compile:
            return None
        if self.graph is not None and not self.freezing:   # weights are graph inputs
            return self.graph
        if self.graph is None or self.graph.key != weights_key(module):
            if self.compiles == 1:
                warnings.warn(f"fastdiff.frozen: the weights of this {type(module).__name__} "
                              "changed since it was compiled; compiling again (each change "
                              "costs a compile: do not freeze a model that is being trained)",
                              RuntimeWarning, stacklevel=4)
            self.graph = _Graph(module, self.mode, self.freezing, shared=not self.freezing)
            self.compiles += 1
        return self.graph

    def run(self, module, *args, **kwargs):
        graph = self.current(module)
        if graph is None:
            with torch.no_grad():
                return module(*args, **kwargs)
        return graph.run(module, *args, **kwargs)

    def info(self) -> dict:
        g = self.graph
        state = "eager" if not self.compile else ("new" if g is None else g.state)
        return {"compile": self.compile, "mode": self.mode, "state": state,
                "freezing": bool(g and g.freezing and state == "frozen"),
                "first_call_s": g.compile_s if g else None, "compiles": self.compiles,
                "note": g.note if g else ""}


_CORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def default_mode(module) -> str:
    """"reduce-overhead" (CUDA graphs) for a module on CUDA, else "default"."""
    device = module_device(module)
    return "reduce-overhead" if device is not None and device.type == "cuda" else "default"


def frozen(model: nn.Module, *, compile: bool = True, mode: str | None = None,
           eval: bool = True, freeze: bool = True) -> FrozenModel:
    """`model` prepared for many calls without gradients, as a `FrozenModel`.

    model: an nn.Module, called `model(*args, **kwargs)` (fastdiff: `(z, t, **cond) -> v̂`);
    compile: torch.compile it with Inductor weight freezing (False: eager, no_grad only);
    mode: torch.compile's mode; None = "reduce-overhead" (CUDA graphs; outputs are copied out
    of the graph's memory) for a model on CUDA, "default" elsewhere;
    eval: put `model` itself in eval mode with requires_grad False, in place (what a frozen
    teacher wants); False leaves its modes alone (what `sample` does, so that a student
    sampled between updates keeps training);
    freeze: fold the weights into the graph (the default). False: the weights stay graph
    inputs, and the compiled code is shared by every module compiled this way: a later
    module of the same architecture, dtypes and input shapes (the next distillation round's
    teacher) runs it with no compile at all (measured on this project's CPU: 0.04 s for the
    copy's first call against 37 s cold), at some of the speed (a noisy 1.33x eager against
    frozen's 1.45x, demo U-Net at batch 128, 1 thread). The weights may change in place.

    Compiling is lazy: the first call compiles (seconds to minutes, in `info["first_call_s"]`).
    Cached per module and settings: the same call again returns the same compiled graph
    while the weights are unchanged, and recompiles when they changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen needs an nn.Module, got {type(model).__name__}")
    if eval:
        model.eval().requires_grad_(False)
    mode = mode or default_mode(model)
    compile = bool(compile) and bool(_tensors(model))
    cores = _CORES.setdefault(model, {})
    key = (compile, mode, bool(freeze))
    if key not in cores:
        cores[key] = _Core(compile, mode, freezing=bool(freeze))
    return FrozenModel(model, cores[key])


def refreeze(model: nn.Module) -> None:
    """Forget `model`'s compiled graphs (after writing its weights through `.data`, which the
    version check cannot see); the next call compiles again."""
    _CORES.pop(model, None)
    _USAGE.pop(model, None)


# ---------------------------------------------------------------- when compiling pays
class _Usage:
    """A model's eager network calls made through `use_compiled` users (sample): count,
    seconds and examples since its weights last changed, and the latest decision."""

    def __init__(self, key):
        self.key = key
        self.calls = 0
        self.seconds = 0.0
        self.examples = 0
        self.compiled = False       # a compile was chosen for the current weights
        self.decision: dict = {}

    def per_example_s(self) -> float | None:
        return self.seconds / self.examples if self.examples else None


_USAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def usage(model) -> dict:
    """What `sample(compile=None)` has seen of `model` and decided last: {"calls",
    "eager_s", "compiled", "decision": {"compile", "reason", ...}} ({} if never sampled)."""
    try:
        u = _USAGE.get(model)
    except TypeError:
        u = None
    if u is None:
        return {}
    return {"calls": u.calls, "eager_s": u.seconds, "compiled": u.compiled,
            "decision": dict(u.decision)}


def _usage_of(model) -> _Usage:
    key = weights_key(model)
    u = _USAGE.get(model)
    if u is None or u.key != key:
        changed = u is not None and u.compiled
        u = _Usage(key)
        if changed:
            u.decision = {"compile": False, "reason": "weights changed since the last compile "
                          "(a model being trained is not recompiled automatically); counting "
                          "its calls again"}
        _USAGE[model] = u
    return u


def use_compiled(model, *, compile: bool | None, device: torch.device | None = None,
                 batch: int, calls: int, repeat: int | None = None) -> Callable:
    """`model` as the network of one sampling run of `calls` network calls at batch `batch`:
    the callable to use, eager or `frozen(model, eval=False)` (module docstring).

    compile True / False forces it; None decides: compile when the expected further calls
    (`repeat` x `calls` when the caller announces that it will make this run `repeat` times,
    else the model's calls so far, this run's included) times the measured seconds per call
    times (1 - 1/SPEEDUP) reaches COMPILE_SECONDS. Until a first eager call has been timed
    the answer is "eager, timed": the returned callable times its eager calls and switches to
    the compiled graph mid-run once the rule says so. Not compiled, whatever the numbers:
    callables that are not nn.Modules and modules without weights. `usage(model)` records
    the decision.
    """
    if not isinstance(model, nn.Module) or not _tensors(model):
        if compile:
            raise TypeError("compile=True needs an nn.Module with weights, got "
                            f"{type(model).__name__}")
        return model
    device = device or module_device(model)
    u = _usage_of(model)
    if compile is not None:
        u.compiled = bool(compile)
        u.decision = {"compile": bool(compile), "reason": "forced by compile=" + str(compile)}
        # forced eager: the model itself (no timing: on CUDA that would sync every call)
        return frozen(model, eval=False) if compile else model
    if u.compiled:
        u.decision = {"compile": True, "reason": "compiled earlier for these weights"}
        return frozen(model, eval=False)
    return _Timed(model, u, _Rule(device, batch, calls, repeat))


class _Rule:
    def __init__(self, device, batch, calls, repeat):
        self.kind = "cuda" if device is not None and device.type == "cuda" else "cpu"
        self.batch, self.calls, self.repeat = batch, calls, repeat
        self.done = 0   # network calls made in this run so far

    def decide(self, u: _Usage) -> dict:
        per_example = u.per_example_s()
        if per_example is None:
            return {"compile": False, "reason": "no eager call timed yet"}
        per_call = per_example * self.batch
        if self.repeat is not None:
            future = self.repeat * self.calls - self.done
            basis = f"repeat={self.repeat} x {self.calls} calls"
        else:
            future = u.calls + (self.calls - self.done)
            basis = f"{u.calls} calls so far (ski rental)"
        gain = future * per_call * (1 - 1 / SPEEDUP[self.kind])
        cost = COMPILE_SECONDS[self.kind]
        ok = gain >= cost
        return {"compile": ok, "expected_calls": future, "per_call_s": per_call,
                "expected_saving_s": gain, "compile_s_prior": cost, "device": self.kind,
                "reason": (f"{'compile' if ok else 'eager'}: {future} expected calls "
                           f"({basis}) x {per_call:.3g} s x (1 - 1/{SPEEDUP[self.kind]}) = "
                           f"{gain:.3g} s {'>=' if ok else '<'} {cost:.3g} s to compile")}


class _Timed:
    """The network of one sampling run under the rule: eager calls timed into the model's
    usage; switches to `frozen(model, eval=False)` when `rule` says so (never when None)."""

    def __init__(self, model, u: _Usage, rule: _Rule | None):
        self.model, self.u, self.rule = model, u, rule
        self.net = None
        self.cuda = module_device(model) is not None and module_device(model).type == "cuda"
        if rule is not None:
            u.decision = rule.decide(u)
            if u.decision["compile"]:
                self._switch()

    def _switch(self):
        self.u.compiled = True
        self.net = frozen(self.model, eval=False)

    def __call__(self, *args, **kwargs):
        if self.net is not None:
            return self.net(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.model(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.u.seconds += time.perf_counter() - t0
        self.u.calls += 1
        z = args[0] if args else None
        self.u.examples += z.shape[0] if torch.is_tensor(z) and z.ndim else 1
        if self.rule is not None:
            self.rule.done += 1
            self.u.decision = self.rule.decide(self.u)
            if self.u.decision["compile"]:
                # the rest of this run (if any) and the model's later runs: compiled
                self._switch()
        return out
