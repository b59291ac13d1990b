"""The "auto" precision / compile policy for a round's frozen teacher and its student.

A distillation update costs about two teacher forwards plus one student forward and
backward (DESIGN §5). Which levers pay depends on the machine and on the round's length, so
they are decided, not assumed (issue 14 item 3):

* on CUDA from the device: bf16 autocast for both networks where the GPU has bf16,
  contiguous memory format, and torch.compile only when the round is long enough that the
  expected saving covers the compile time;
* on CPU from a short measurement on the real models at the round's batch: a few interleaved
  teacher forwards in fp32, bf16 autocast (only where the CPU has native bf16, or when
  asked) and channels_last, and student forward + backward the same way; a variant is taken
  only when it is faster than fp32 by a margin, its timing is not noisy (max/min < 1.3), and,
  for the teacher, its output stays within `bf16_tolerance` relative RMS of fp32's. A
  compile is chosen only when `updates x calls x (eager - expected compiled time)` exceeds
  its expected compile time: a ~25 s compile is never spent on a round that would save
  less.

Every choice can be forced (`Policy(teacher_bf16=False)`, or a dict of the same names).
`decide` returns the resolved `Policy` and a record (a JSON-able dict) of what was
measured and why each choice was made, for the run's history.

The compiled speed-ups cannot be measured without paying the compile, so they are priors
(`COMPILE_PRIORS`), recorded as such: on this project's CPU (AMD EPYC, torch 2.13) a frozen,
compiled demo U-Net forward is about 1.4x eager fp32 after 25-100 s of compiling
(`fastdiff.engine.inference`'s priors, which compiles the teacher), compiled bf16 0.94x
(0.78x eager bf16), and a compiled student step 1.04x after 51 s (DESIGN §5). Give
measured ones for another machine through `compile_speedup=` and `compile_s=`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from fastdiff.engine import inference
from fastdiff.engine.inference import frozen

FIELDS = ("teacher_compile", "teacher_bf16", "teacher_channels_last",
          "student_compile", "student_bf16", "student_channels_last")

#: expected compiled speed over eager of the same precision and layout, by device, role and
#: precision (priors: see the module docstring)
#: precision (priors: see the module docstring); the frozen teacher's fp32 figures are the
#: engine's own for a model compiled by `frozen` (`fastdiff.engine.inference`)
COMPILE_PRIORS = {
    "cpu": {"teacher": {"fp32": inference.SPEEDUP["cpu"], "bf16": 0.78},
            "student": {"fp32": 1.04, "bf16": 1.0}},
    "cuda": {"teacher": {"fp32": inference.SPEEDUP["cuda"], "bf16": inference.SPEEDUP["cuda"]},
             "student": {"fp32": 1.1, "bf16": 1.1}},
}
#: expected seconds to compile (first call), by device and role
COMPILE_SECONDS = {"cpu": {"teacher": inference.COMPILE_SECONDS["cpu"], "student": 51.0},
                   "cuda": {"teacher": inference.COMPILE_SECONDS["cuda"], "student": 90.0}}
#: expected seconds of a compile when this process already compiled a network of the same
#: role, architecture, variant, mode and input shapes (`compile_key`): the next round's
#: student (a copy of this round's), or its teacher compiled with shared code
#: (`frozen(freeze=False)`), passes the guards of Dynamo's cached code and no graph is built
#: again (on this project's CPU, demo U-Net: 0.5 s for a copied student's first compiled
#: forward + backward against 202 s cold; 0.04 s for a copied teacher's first call against
#: 37 s). A teacher frozen into its graph has no such reuse: its weights are constants there.
WARM_COMPILE_SECONDS = {"cpu": 2.0, "cuda": 5.0}
#: expected speed over eager fp32 of a teacher compiled with shared code, weights as graph
#: inputs (CPU: measured 1.33x, noisy, against 1.45x frozen; CUDA: unmeasured, not used)
SHARED_TEACHER_SPEEDUP = {"cpu": 1.3}
_COMPILED: dict = {"teacher": set(), "student": set()}   # compile_key of what was compiled


def forget_compiled() -> None:
    """Forget which networks this process compiled (every later compile is priced cold);
    for benchmarks that time cold starts after `torch._dynamo.reset()`."""
    for keys in _COMPILED.values():
        keys.clear()
NOISY_SPREAD = 1.3
MARGIN = 0.05          # a variant must be >= 5% faster than fp32 to be taken
BF16_TOLERANCE = 2e-2  # relative RMS of the bf16 teacher's output against fp32's


@dataclass(frozen=True)
class Policy:
    """Precision and compile choices for the teacher and the student. In a request, None
    means "decide"; `decide` returns one with every field a bool.

    teacher_compile: torch.compile the frozen teacher for inference (Inductor weight
        freezing); teacher_bf16: run its forwards under bf16 autocast (its outputs are cast
        back to z's dtype before the target, whose math stays float32/float64);
    teacher_channels_last: its weights and inputs in channels_last;
    student_compile / student_bf16 / student_channels_last: the same for the student's
        training forward and backward.
    """

    teacher_compile: bool | None = None
    teacher_bf16: bool | None = None
    teacher_channels_last: bool | None = None
    student_compile: bool | None = None
    student_bf16: bool | None = None
    student_channels_last: bool | None = None

    @classmethod
    def parse(cls, value) -> Policy:
        """None / "auto" (decide everything), "off" (every lever off: the plain eager fp32
        loop), a Policy, or a dict of some field names."""
        if value is None or value == "auto":
            return cls()
        if value == "off":
            return cls(**{f: False for f in FIELDS})
        if isinstance(value, Policy):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(FIELDS))
            if unknown:
                raise ValueError(f"unknown policy choices {unknown}; expected {list(FIELDS)}")
            for name, v in value.items():
                if v is not None and not isinstance(v, bool):
                    raise ValueError(f"policy choice {name} must be True, False or None "
                                     f"(decide), got {v!r}")
            return cls(**value)
        raise TypeError(f"policy must be None, 'auto', 'off', a Policy or a dict, got {value!r}")

    @property
    def resolved(self) -> bool:
        return all(getattr(self, f) is not None for f in FIELDS)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- timing
def wall_timer(name: str, fn: Callable[[], object]) -> float:
    """Seconds of one call of `fn` (the variant `name`), synchronising CUDA around it."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _summary(ts: list) -> dict:
    lo, hi = min(ts), max(ts)
    return {"min_s": lo, "median_s": statistics.median(ts), "max_s": hi,
            "spread": hi / lo if lo > 0 else math.inf, "reps": len(ts)}


def _interleaved(variants: dict, timer, reps: int, budget_s: float, clock) -> dict:
    """Time variants A B C A B C ... (after one untimed call each, done by the caller);
    stops after 3 rounds once `budget_s` of wall time (by `clock`) is spent."""
    times: dict = {name: [] for name in variants}
    t0 = clock()
    for r in range(reps):
        for name, fn in variants.items():
            times[name].append(float(timer(name, fn)))
        if r + 1 >= 3 and clock() - t0 > budget_s:
            break
    return {name: _summary(ts) for name, ts in times.items()}


def _trusted(fig: dict) -> bool:
    return fig["reps"] >= 3 and math.isfinite(fig["spread"]) and fig["spread"] < NOISY_SPREAD


# ---------------------------------------------------------------- device facts
def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA GPUs that report it; CPUs with AVX512-BF16 or AMX (oneDNN's
    check), where bf16 autocast does not emulate bf16 with fp32 conversions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def _autocast(device: torch.device, bf16: bool):
    """bf16 autocast on, or explicitly off (so that an autocast around the caller, e.g. the
    student's, does not reach a network decided to run in fp32)."""
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last) \
        if torch.is_tensor(x) and x.dim() == 4 else x


def _cl_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


# ---------------------------------------------------------------- running the choices
def teacher_forward(teacher: nn.Module, policy: Policy, device=None, *, shared: bool = False,
                    example: tuple | None = None) -> Callable:
    """The frozen teacher as `f(z, t, **cond) -> v` (z's dtype where autocast ran it in
    bf16, contiguous) under `policy`:
    no_grad, bf16 autocast, channels_last, torch.compile with weight freezing as chosen;
    `shared`: compiled with shared code instead (`frozen(freeze=False)`: weights as graph
    inputs, the code reused by a later teacher of the same architecture), remembered with
    its call's `example` (`compile_key`) for a later round's decision.

    no_grad rather than inference_mode: tensors made under inference_mode cannot be saved
    for the student's backward (the fused loss keeps its inputs), so the outputs would need a
    clone; the teacher's parameters already have requires_grad False either way.
    """
    device = torch.device(device) if device is not None else _device(teacher)
    teacher = teacher.eval().requires_grad_(False)
    if policy.teacher_channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    # compiled with Inductor weight freezing (and CUDA graphs on CUDA) by the engine's one
    # `frozen`, which also recompiles should the teacher's weights ever change
    net = frozen(teacher, freeze=not shared) if policy.teacher_compile else teacher
    if policy.teacher_compile and shared and example is not None:
        variant = _name(bool(policy.teacher_bf16), bool(policy.teacher_channels_last))
        _COMPILED["teacher"].add(compile_key(teacher, example, variant, None))

    def forward(z, t, **cond):
        with torch.no_grad(), _autocast(device, bool(policy.teacher_bf16)):
            out = net(_cl(z) if policy.teacher_channels_last else z, t, **cond)
        if out.dtype in (torch.bfloat16, torch.float16):   # autocast's: back to z's dtype
            out = out.to(z.dtype)
        return out.contiguous() if policy.teacher_channels_last else out

    forward.module = teacher
    return forward


def student_autocast(policy: Policy, device) -> contextlib.AbstractContextManager:
    """The autocast the student's training forward runs under."""
    return _autocast(torch.device(device), bool(policy.student_bf16))


def compile_key(model: nn.Module, example: tuple, variant: str, mode: str | None) -> tuple:
    """What decides whether a network's compiled code serves another, as far as the
    compile-cost prior goes: its class, its parameters' and buffers' names, shapes and
    dtypes, its device type, the variant (`"fp32"`, `"bf16+channels_last"`, ...), the compile
    mode and the shapes and dtypes of one call's tensors (`example` = (args, kwargs))."""
    def sig(x):
        return (tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) \
            else type(x).__name__

    args, kwargs = example
    return (type(model).__module__, type(model).__qualname__,
            tuple((n, tuple(v.shape), str(v.dtype)) for n, v in model.state_dict().items()),
            _device(model).type, variant, mode, tuple(sig(a) for a in args),
            tuple((k, sig(v)) for k, v in sorted(kwargs.items())))


def prepare_student(student: nn.Module, policy: Policy, mode: str | None = None,
                    example: tuple | None = None) -> nn.Module:
    """The student moved to channels_last and/or compiled (torch.compile `mode`) as chosen
    (the plain module keeps its parameters: optimizer, EMA and checkpoints use `student`
    itself). A compiled student with its call's `example` is remembered (`compile_key`), so
    that a later round's decision counts its compile as warm."""
    if policy.student_channels_last:
        student.to(memory_format=torch.channels_last)
    if not policy.student_compile:
        return student
    if example is not None:
        variant = _name(bool(policy.student_bf16), bool(policy.student_channels_last))
        _COMPILED["student"].add(compile_key(student, example, variant, mode))
    return torch.compile(student, mode=mode)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------- the decision
def decide(request=None, *, teacher: nn.Module, student: nn.Module | None = None,
           example: tuple, updates: int, device=None, teacher_calls: int = 2,
           timer: Callable[[str, Callable], float] | None = None,
           clock: Callable[[], float] = time.perf_counter, reps: int = 5,
           budget_s: float = 3.0, compile_s: dict | None = None,
           compile_speedup: dict | None = None, bf16_tolerance: float = BF16_TOLERANCE,
           margin: float = MARGIN, allow_emulated_bf16: bool = False,
           student_example: tuple | None = None, min_round_s: float | None = None,
           mode: str | None = None, horizon: int | None = None) -> tuple[Policy, dict]:
    """Resolve `request` (None/"auto", a Policy or a dict; forced fields are kept) for a
    round of `updates` updates, each calling the teacher `teacher_calls` times and the
    student once (forward and backward).

    example: `(args, kwargs)` of one teacher / student call at the round's batch, e.g.
        `((z_t, t), {"y": y})` on `device`.
    timer: `timer(name, fn) -> seconds of one call of fn`, name "<role> <variant>" such as
        "teacher bf16" or "student fp32+channels_last" (default `wall_timer`; tests give a
        fake one); clock: the wall clock of the measurement budget `budget_s`.
    compile_s, compile_speedup: {"teacher": ..., "student": ...} overriding the device's
        `COMPILE_SECONDS` and `COMPILE_PRIORS` (speed-ups by precision: {"fp32": x, "bf16": y}).
    allow_emulated_bf16: also measure bf16 on a CPU without native bf16.
    student_example: `(args, kwargs)` of one student call where it differs from the
        teacher's (a guidance-distilled student also takes w); default `example`.
    min_round_s: on CPU, first time one fp32 call of each network; when the whole round
        would take less than this many seconds eager, nothing is measured further and every
        undecided choice is off (no compile can pay back on such a round, and the
        measurement itself would be a visible share of it). None: always measure.
    mode: the student's torch.compile mode. A variant this process has compiled before
        (`prepare_student`, a shared `teacher_forward`; same `compile_key`) is expected to
        compile in `WARM_COMPILE_SECONDS` (recorded under "warm_compile").
    horizon: the updates networks of this architecture will run in this process from this
        round on, later rounds included (progressive distillation: the rounds left; default
        `updates`). On CPU a teacher may then be compiled with shared code
        (`record["teacher_compile_shared"]`), whose cold compile is charged to this round
        only for its share of the horizon, since the later rounds' teachers reuse it.

    Returns (policy with every field a bool, record).
    """
    t_start = clock()
    request = Policy.parse(request)
    device = torch.device(device) if device is not None else _device(teacher)
    kind = "cuda" if device.type == "cuda" else "cpu"
    timer = timer or wall_timer
    bf16_ok = native_bf16(device)
    seconds = {**COMPILE_SECONDS[kind], **(compile_s or {})}
    priors = {role: dict(COMPILE_PRIORS[kind][role], **((compile_speedup or {}).get(role) or {}))
              for role in ("teacher", "student")}
    record: dict = {"device": str(device), "native_bf16": bf16_ok, "updates": updates,
                    "teacher_calls_per_update": teacher_calls,
                    "torch_threads": torch.get_num_threads(),
                    "forced": {f: getattr(request, f) for f in FIELDS
                               if getattr(request, f) is not None},
                    "compile_seconds_prior": seconds, "compile_speedup_prior": priors,
                    "measured": {}, "reasons": {}}
    chosen = dict(request.as_dict())
    args, kwargs = example
    examples = {"teacher": example, "student": student_example or example}
    if kind == "cpu" and min_round_s is not None and not request.resolved:
        estimate = _eager_round_s(teacher, student, device, examples, updates,
                                  teacher_calls, timer)
        record["eager_round_estimate_s"] = estimate
        if estimate < min_round_s:
            record["reasons"]["all"] = (
                f"round expected to take {estimate:.1f} s eager (< {min_round_s:g} s): too "
                f"short for a compile to pay back; not measured further, undecided choices off")
            policy = Policy(**{k: bool(v) for k, v in chosen.items()})
            record["decided"] = policy.as_dict()
            record["measure_s"] = clock() - t_start
            return policy, record
    for role in ("teacher", "student"):
        keys = [f"{role}_{x}" for x in ("compile", "bf16", "channels_last")]
        if all(chosen[k] is not None for k in keys):
            record["reasons"][role] = "all forced"
            continue
        model = teacher if role == "teacher" else student
        if model is None:
            for k in keys:
                chosen[k] = bool(chosen[k])
            record["reasons"][role] = "no model given: off"
            continue
        calls = updates * (teacher_calls if role == "teacher" else 1)
        key_mode = mode if role == "student" else None
        warm = {n for n in VARIANTS if compile_key(model, examples[role], n, key_mode)
                in _COMPILED[role]}
        if warm:
            record.setdefault("warm_compile", {"seconds": WARM_COMPILE_SECONDS[kind]})[role] \
                = sorted(warm)
        compile_seconds = {n: seconds[role] for n in VARIANTS}
        shared = None
        if role == "teacher" and kind == "cpu":
            share = updates / max(horizon or updates, updates)
            shared = {"speedup": SHARED_TEACHER_SPEEDUP[kind], "share": share, "warm": warm,
                      "seconds": {n: WARM_COMPILE_SECONDS[kind] if n in warm
                                  else seconds[role] * share for n in VARIANTS}}
        elif role == "student":
            compile_seconds = {n: WARM_COMPILE_SECONDS[kind] if n in warm else seconds[role]
                               for n in VARIANTS}
        if kind == "cuda":
            _decide_cuda(role, chosen, record, bf16_ok, calls, compile_seconds, priors[role])
        else:
            r_args, r_kwargs = examples[role]
            variants, outputs = _variants(role, model, device, r_args, r_kwargs, chosen,
                                          bf16_ok or allow_emulated_bf16)
            figs = _interleaved({f"{role} {k}": fn for k, fn in variants.items()}, timer,
                                reps, budget_s / 2, clock)
            figs = {k.split(" ", 1)[1]: v for k, v in figs.items()}
            record["measured"][role] = figs
            errors = {}
            if role == "teacher":
                ref = outputs["fp32"]
                for name, out in outputs.items():
                    errors[name] = float((out - ref).float().norm() / ref.float().norm()
                                         .clamp_min(1e-30))
                record["measured"]["teacher_rel_rms_vs_fp32"] = errors
            _decide_cpu(role, chosen, record, figs, errors, calls, compile_seconds,
                        priors[role], bf16_tolerance, margin, shared)
    policy = Policy(**{k: bool(v) for k, v in chosen.items()})
    record["decided"] = policy.as_dict()
    record["measure_s"] = clock() - t_start
    return policy, record


def _eager_round_s(teacher, student, device, examples, updates, teacher_calls, timer) -> float:
    """Seconds the round would take eager fp32: one warm and one timed call of each network
    (the student's forward and backward on a private copy)."""
    total = 0.0
    for role, model, calls in (("teacher", teacher, teacher_calls), ("student", student, 1)):
        if model is None:
            continue
        args, kwargs = examples[role]
        fn = _variants(role, model, device, args, kwargs,
                       {f"{role}_bf16": False, f"{role}_channels_last": False}, False)[0]["fp32"]
        total += updates * calls * float(timer(f"{role} fp32", fn))
    return total


VARIANTS = ("fp32", "bf16", "fp32+channels_last", "bf16+channels_last")


def _name(bf16: bool, cl: bool) -> str:
    return ("bf16" if bf16 else "fp32") + ("+channels_last" if cl else "")


def _parts(name: str) -> tuple[bool, bool]:
    return name.startswith("bf16"), name.endswith("channels_last")


def _variants(role, model, device, args, kwargs, chosen, bf16_ok):
    """{name: fn} to time for `role`: fp32 contiguous (the reference) and every combination
    of the undecided precision / layout choices; and the teacher's outputs of each."""
    forced_bf16, forced_cl = chosen[f"{role}_bf16"], chosen[f"{role}_channels_last"]
    bf16s = [False, True] if forced_bf16 is None and bf16_ok else [bool(forced_bf16)]
    cls = [False, True] if forced_cl is None else [bool(forced_cl)]
    combos = [(False, False)] + [(b, c) for b in bf16s for c in cls if b or c]
    if role == "student":   # a private copy: the measured backward passes leave no trace
        model = copy.deepcopy(model).train().requires_grad_(True)
    cl_model = _cl_copy(model) if any(c for _, c in combos) else None
    variants, outputs = {}, {}
    for bf16, cl in combos:
        net, a = (cl_model, tuple(_cl(x) for x in args)) if cl else (model, args)
        if role == "teacher":
            def fn(net=net, a=a, bf16=bf16):
                with torch.no_grad(), _autocast(device, bf16):
                    return net(*a, **kwargs)
        else:
            def fn(net=net, a=a, bf16=bf16):
                with _autocast(device, bf16):
                    out = net(*a, **kwargs)
                out.float().square().mean().backward()
                for q in net.parameters():
                    q.grad = None
                return out.detach()
        out = fn()   # untimed warm-up (oneDNN primitive creation, allocator)
        if role == "teacher":
            outputs[_name(bf16, cl)] = out.float().contiguous()
        variants[_name(bf16, cl)] = fn
    return variants, outputs


def _decide_cpu(role, chosen, record, figs, errors, calls, compile_seconds, priors,
                tolerance, margin, shared=None) -> None:
    """`shared`: for a teacher, the shared-code compile's {"speedup", "seconds" by variant,
    "warm": variants compiled before} (`decide`'s horizon), planned beside the frozen one."""
    r, reasons = f"{role}_", record["reasons"]
    force = {k: chosen[r + k] for k in ("compile", "bf16", "channels_last")}
    if not all(_trusted(f) for f in figs.values()):
        noisy = {k: round(f["spread"], 2) for k, f in figs.items() if not _trusted(f)}
        reasons[role] = f"noisy measurement (spread {noisy}): undecided choices off"
        for k, v in force.items():
            chosen[r + k] = bool(v)
        if shared is not None and "fp32" in shared["warm"] and force["compile"] is not False \
                and not force["bf16"] and not force["channels_last"]:
            # an earlier round paid for this code on the bet that later rounds run it:
            # a noisy measurement now is no reason to drop what costs nothing more
            chosen[r + "compile"] = True
            record["teacher_compile_shared"] = True
            reasons[role] += ("; but the shared compiled code of an earlier round's teacher "
                              "is reused (already paid for)")
        return

    def fits(name: str) -> bool:
        bf16, cl = _parts(name)
        return all(force[k] is None or v == force[k]
                   for k, v in (("bf16", bf16), ("channels_last", cl)))

    def t(name: str) -> float:
        return figs[name]["median_s"]

    ok = [n for n in figs if fits(n) and errors.get(n, 0.0) <= tolerance]
    for n in figs:
        if fits(n) and errors.get(n, 0.0) > tolerance:
            reasons[f"{role} {n}"] = (f"output {errors[n]:.2e} relative RMS from fp32 > "
                                      f"{tolerance:g}")
    ok = ok or [n for n in figs if fits(n)]       # a forced variant is honoured regardless
    best = min(ok, key=t)
    if "fp32" in ok and t(best) >= (1 - margin) * t("fp32"):
        best = "fp32"                             # not faster by the margin: stay exact
    plans = {}
    if force["compile"] is not True:
        plans[f"eager {best}"] = calls * t(best)
    if force["compile"] is not False:
        for n in ok:   # compiled layouts other than the forced one are not modelled
            if _parts(n)[1] and force["channels_last"] is not True:
                continue
            speed = priors.get("bf16" if _parts(n)[0] else "fp32", 1.0)
            plans[f"compile {n}"] = compile_seconds[n] + calls * t(n) / speed
            if shared is not None and not _parts(n)[0]:   # fp32 measured only
                plans[f"compile-shared {n}"] = (shared["seconds"][n]
                                                + calls * t(n) / shared["speedup"])
    pick = min(plans, key=plans.get)
    how, name = pick.split(" ", 1)
    bf16, cl = _parts(name)
    chosen.update({r + "compile": how != "eager", r + "bf16": bf16,
                   r + "channels_last": cl})
    if role == "teacher":
        record["teacher_compile_shared"] = how == "compile-shared"
    record.setdefault("expected_round_s", {})[role] = plans
    others = ", ".join(f"{k} {v:.1f} s" for k, v in plans.items() if k != pick)
    reasons[role] = (f"{pick}: expected {plans[pick]:.1f} s over {calls} calls (median "
                     f"{t(name) * 1e3:.2f} ms/call eager vs fp32 {t('fp32') * 1e3:.2f} ms; "
                     f"compile {compile_seconds[name]:.0f} s"
                     + (f", shared {shared['seconds'][name]:.0f} s" if shared else "")
                     + ")" + (f"; rather than {others}" if others else ""))


def _decide_cuda(role, chosen, record, bf16_ok, calls, compile_seconds, priors) -> None:
    """From the device: bf16 where the GPU has it, contiguous, compile by the priors and an
    eager-time guess of 5 ms per call (unmeasured on CUDA; force it to be sure)."""
    if chosen[f"{role}_bf16"] is None:
        chosen[f"{role}_bf16"] = bf16_ok
    if chosen[f"{role}_channels_last"] is None:
        chosen[f"{role}_channels_last"] = False
    if chosen[f"{role}_compile"] is None:
        guess = 5e-3
        p = "bf16" if chosen[f"{role}_bf16"] else "fp32"
        cost = compile_seconds[_name(bool(chosen[f"{role}_bf16"]),
                                     bool(chosen[f"{role}_channels_last"]))]
        saving = calls * guess * (1 - 1 / priors.get(p, 1.0))
        chosen[f"{role}_compile"] = saving > cost
        record["reasons"][role] = (f"CUDA: bf16={chosen[f'{role}_bf16']}, compile "
                                   f"{chosen[f'{role}_compile']} (expected saving {saving:.0f}"
                                   f" s vs {cost:.0f} s compile)")


def with_forced(policy: Policy, **forced) -> Policy:
    """`policy` with some choices forced (e.g. from CLI flags; None leaves one as it is)."""
    return replace(policy, **{k: v for k, v in forced.items() if v is not None})


@dataclass
class Applied:
    """A decided policy put to work: `teacher(z, t, **cond)` (outputs in z's dtype, no graph),
    `student` (what to train with: compiled or not; its parameters are the plain module's)
    and `student_autocast` (a fresh context manager per use: `with applied.student_autocast():`)."""

    teacher: Callable | None
    student: Callable | None
    student_autocast: Callable[[], contextlib.AbstractContextManager]


def apply(policy: Policy, *, teacher: nn.Module | None, student: nn.Module | None,
          device, mode: str | None = None, student_example: tuple | None = None,
          teacher_example: tuple | None = None, teacher_shared: bool = False) -> Applied:
    """`teacher_forward` (`teacher_shared`, its call `teacher_example`), `prepare_student`
    (torch.compile `mode`, the student's call `student_example`) and `student_autocast` of
    `policy` at once."""
    device = torch.device(device)
    return Applied(
        teacher=teacher_forward(teacher, policy, device, shared=teacher_shared,
                                example=teacher_example) if teacher is not None else None,
        student=prepare_student(student, policy, mode, student_example)
        if student is not None else None,
        student_autocast=lambda: student_autocast(policy, device))


def legacy_request(autocast=None, compile=False) -> dict:
    """The forced choices that RunConfig's older `autocast` / `compile` settings mean:
    autocast "bf16"/True or "fp32"/False forces both networks' precision (it wrapped the
    whole loss, teacher included); compile True (or a mode) forces the student's compile.
    None / False leave the choice to `decide`."""
    out: dict = {}
    if autocast is not None:
        if autocast not in (True, False, "bf16", "fp32", "none"):
            raise ValueError(f"autocast must be 'bf16', 'fp32' or None, got {autocast!r}")
        bf16 = autocast in (True, "bf16")
        out.update(teacher_bf16=bf16, student_bf16=bf16)
    if compile:
        out["student_compile"] = True
    return out


def describe(recorded: dict) -> str:
    """One line on a run's policy (`history.policy`), e.g. "teacher eager fp32, student
    eager fp32 (round expected to take 12.0 s eager ...)", for progress lines and reports."""
    decided = recorded.get("decided") or {}
    if not decided:
        return "policy not recorded"

    shared = (recorded.get("record") or {}).get("teacher_compile_shared")

    def role(r: str) -> str:
        how = "compiled" if decided.get(f"{r}_compile") else "eager"
        if how == "compiled" and r == "teacher" and shared:
            how = "compiled (shared code)"
        what = "bf16" if decided.get(f"{r}_bf16") else "fp32"
        return f"{r} {how} {what}" + ("+channels_last" if decided.get(f"{r}_channels_last")
                                      else "")

    reasons = (recorded.get("record") or {}).get("reasons") or {}
    why = reasons.get("all") or "; ".join(f"{k}: {v}" for k, v in reasons.items()
                                          if k in ("teacher", "student"))
    return f"{role('teacher')}, {role('student')}" + (f" ({why})" if why else "")

