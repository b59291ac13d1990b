"""The scaffolding every kernel op shares: custom-op registration, the two routes to the
implementations, and the Triton launch loops.

An op module writes its math (a Triton kernel, a torch implementation) and calls
:func:`register_op` (or :func:`register_linear_op` / :func:`register_loss_op`) once;
everything else is here:

* the ``torch.library`` custom op ``fastdiff::<name>``, its schema read from the torch
  implementation's annotations (tensors first, then ``str``/``float`` constants);
* one implementation per op choosing the backend at each call (:func:`implementation`):
  the Triton launcher, or the torch implementation through :func:`cpu_fused`
  (torch.compile'd for large CPU tensors, eager below the threshold);
* the fake (shapes, dtypes and strides for torch.compile), the autograd formula;
* the lean eager route (:class:`KernelOp`): plain eager calls run the same implementation
  directly, through a small ``torch.autograd.Function`` with the custom op's own formula
  where a gradient is needed, because the custom op's dispatch and Python autograd
  formula cost more than the math of a small batch. A loss with a one-pass variant
  computes its loss and gradient together there. Tracing, fake tensors, dispatch modes
  and functorch transforms take the custom op.

Outputs are contiguous on every path, as the fakes say (a torch implementation fed
channels-last tensors would otherwise hand back channels-last ones, and a compiled graph
would then read them with the fake's strides).

Per-sample coefficients reach an op as one float32 tensor ``coef`` of shape ``(K, B)``
(coefficient ``j`` of sample ``r`` at ``coef[j, r]``): formed in float64, stacked and
rounded to float32 in one call on the host side (DESIGN §4). A loss keeps its per-sample
scale in row 0; its sum over rows is taken in float64 on every path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ._metrics import METRIC_CODES, huber_constexpr
from .dispatch import (
    BLOCK,
    backend_for,
    blocks_per_row,
    cpu_compiles,
    cpu_fused,
    intercepted,
    row_chunks,
)

# ---------------------------------------------------------------- routes
#: The lean eager route (see :class:`KernelOp`); ``FASTDIFF_KERNELS_EAGER=0`` at import, or
#: this flag at run time (tests), sends every call through the custom op instead.
EAGER_ROUTE: bool = os.environ.get("FASTDIFF_KERNELS_EAGER", "1") != "0"


def eager_route(first) -> bool:
    """Whether a call may take the lean route: a plain tensor (not a fake or a tensor
    subclass) and nothing tracing or intercepting the call (:func:`intercepted`).
    Everything else needs the custom op's schema, fake and autograd formula."""
    return EAGER_ROUTE and type(first) is Tensor and not intercepted()


class KernelOp:
    """A registered op, called like its torch implementation.

    Two routes to the same implementations (:func:`implementation`): the ``torch.library``
    custom op ``op`` (what torch.compile traces and opcheck checks) and, for plain eager
    calls (:func:`eager_route`), ``lean``, which calls them directly (or through a small
    ``torch.autograd.Function`` where a gradient is needed). The custom op's own dispatch
    and its Python autograd formula cost ~100 us per call on a CPU, more than the math of a
    (128, 1, 8, 8) batch; the lean route costs a few.
    """

    __slots__ = ("name", "op", "lean")

    def __init__(self, name: str, op, lean):
        self.name, self.op, self.lean = name, op, lean

    def __call__(self, *args):
        if eager_route(args[0]):
            return self.lean(*args)
        return self.op(*args)

    def __repr__(self) -> str:
        return f"KernelOp(fastdiff::{self.name})"


def implementation(torch_impl, triton_impl):
    """The function both routes run: the Triton launcher where :func:`backend_for` says so,
    else the torch implementation (through :func:`cpu_fused`: compiled for large CPU
    tensors), its tensor outputs contiguous as the fakes say (a torch implementation fed
    channels-last tensors would otherwise hand back channels-last ones)."""

    def run(*args):
        first = args[0]
        if first.device.type in ("cpu", "cuda") and backend_for(first) == "triton":
            return triton_impl(*args)
        out = cpu_fused(torch_impl, first)(*args)
        if isinstance(out, tuple):
            return tuple(x.contiguous() for x in out)
        return out.contiguous()

    run.__name__ = run.__qualname__ = f"run_{torch_impl.__name__}"
    return run


# ---------------------------------------------------------------- registration
def _like_first(first: Tensor, *rest) -> Tensor:
    return torch.empty_like(first, memory_format=torch.contiguous_format)


def _float32_scalar(first: Tensor, *rest) -> Tensor:
    return first.new_empty((), dtype=torch.float32)


def _custom_op(name: str, torch_impl, run, fake):
    schema = torch.library.infer_schema(torch_impl, mutates_args=())

    def default(*args):  # devices other than CPU and CUDA
        return torch_impl(*args).contiguous()

    op = torch.library.custom_op(f"fastdiff::{name}", default, mutates_args=(), schema=schema)
    op.register_kernel(("cpu", "cuda"))(run)
    op.register_fake(fake)
    return op


def register_op(name: str, torch_impl, triton_impl, *, fake=_like_first) -> KernelOp:
    """Register ``fastdiff::<name>`` (not differentiable) and return it as a
    :class:`KernelOp`, called like ``torch_impl``.

    ``torch_impl(*args)`` and ``triton_impl(*args)`` compute the same thing from the same
    arguments; the first argument decides the backend and the compiled CPU path. The schema
    is read from ``torch_impl``'s annotations (tensors first, then ``str``/``float``
    constants); ``fake``: shapes for torch.compile (default: an empty tensor like the first
    argument).
    """
    run = implementation(torch_impl, triton_impl)
    return KernelOp(name, _custom_op(name, torch_impl, run, fake), run)


def _function(name: str, forward, setup_context, backward):
    """A ``torch.autograd.Function`` subclass (the lean route's autograd node) running
    ``forward`` and then the custom op's ``setup_context`` on its inputs and output, so
    that it has the custom op's formula verbatim. Written in the classic style (ctx as
    forward's first argument): an ``apply`` of the setup_context style binds its arguments
    through ``inspect.signature`` on every call, several times the cost of this one."""

    def forward_with_context(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_with_context),
        "backward": staticmethod(backward),
    })


def register_linear_op(name: str, torch_impl, triton_impl) -> KernelOp:
    """An elementwise op ``(*data, coef) -> sum_i coef[i] * data[i]`` (per sample; ``coef``
    ``(K, B)`` with one row per data tensor), differentiable in each data tensor:
    ``grad_i = upstream * coef[i]``, in that tensor's dtype."""
    run = implementation(torch_impl, triton_impl)
    op = _custom_op(name, torch_impl, run, _like_first)

    def setup_context(ctx, inputs, output):
        *data, coef = inputs
        ctx.save_for_backward(coef)
        ctx.dtypes = tuple(x.dtype for x in data)

    def backward(ctx, grad):
        rows = per_sample(ctx.saved_tensors[0], grad)
        grads = tuple((grad * c).to(dtype) if needed else None
                      for c, dtype, needed in zip(rows, ctx.dtypes, ctx.needs_input_grad))
        return grads + (None,)

    op.register_autograd(backward, setup_context=setup_context)
    function = _function(f"{name}_function", run, setup_context, backward)

    def lean(*args):
        if torch.is_grad_enabled() and any(x.requires_grad for x in args[:-1]):
            return function.apply(*args)
        return run(*args)

    return KernelOp(name, op, lean)


def register_loss_op(name: str, torch_impl, triton_impl, backward_torch, backward_triton,
                     one_pass_torch=None, one_pass_triton=None) -> KernelOp:
    """A loss ``fastdiff::<name>(*tensors, metric, huber_c)`` -> float32 scalar,
    differentiable in its first tensor only, and its backward op
    ``fastdiff::<name>_backward(*tensors, upstream, metric, huber_c)`` -> the gradient wrt
    the first tensor (its shape and dtype), where ``upstream`` is the loss's incoming
    gradient (0-d; the kernels fold it into the per-sample scale). Both take the compiled
    CPU path for large tensors.

    ``one_pass_torch`` / ``one_pass_triton`` (optional): ``(*tensors, metric, huber_c) ->
    (loss, gradient at upstream 1)`` in one pass over the inputs. Where given, the lean
    route's forward runs it whenever a gradient is needed (students of ``ONE_PASS_DTYPES``)
    and keeps only the gradient (see :func:`scaled_saved_grad`): one read of each input
    instead of two. torch.compile traces the two-pass ops.
    """
    backward_op = register_op(f"{name}_backward", backward_torch, backward_triton)
    run = implementation(torch_impl, triton_impl)
    op = _custom_op(name, torch_impl, run, _float32_scalar)

    def setup_context(ctx, inputs, output):
        *tensors, metric, huber_c = inputs
        ctx.save_for_backward(*tensors)
        ctx.constants = (metric, huber_c)

    def backward(ctx, upstream):
        tensors = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = backward_op(*tensors, upstream, *ctx.constants)
        return (grad,) + (None,) * (len(tensors) + 1)

    op.register_autograd(backward, setup_context=setup_context)
    two_pass = _function(f"{name}_function", run, setup_context, backward)
    one_pass = None
    if one_pass_torch is not None:
        run_one_pass = implementation(one_pass_torch, one_pass_triton)

        def setup_one_pass(ctx, inputs, output):
            ctx.save_for_backward(output[1])
            ctx.mark_non_differentiable(output[1])
            # the gradient output is never differentiated: no zeros materialised for it
            ctx.set_materialize_grads(False)
            ctx.n_inputs = len(inputs)

        def backward_one_pass(ctx, upstream, _unused):
            grad = None
            if upstream is not None and ctx.needs_input_grad[0]:
                grad = scaled_saved_grad(ctx.saved_tensors[0], upstream)
            return (grad,) + (None,) * (ctx.n_inputs - 1)

        one_pass = _function(f"{name}_one_pass", run_one_pass, setup_one_pass,
                             backward_one_pass)

    def lean(*args):
        first = args[0]
        if not (first.requires_grad and torch.is_grad_enabled()):
            return run(*args)
        if one_pass is not None and ONE_PASS and one_pass_pays(first):
            return one_pass.apply(*args)[0]
        return two_pass.apply(*args)

    return KernelOp(name, op, lean)


#: Whether the lean route of a loss with a one-pass variant uses it (tests and benchmarks
#: compare both; ``FASTDIFF_KERNELS_ONE_PASS=0`` at import turns it off) ...
ONE_PASS: bool = os.environ.get("FASTDIFF_KERNELS_ONE_PASS", "1") != "0"
#: ... for students of these dtypes. float32 only, as measured (benchmarks/bench_kernels.py,
#: CPU, 1 thread: one pass 2.0-2.3x torch.compile at 1M and 1.9-2.0x at 16M against
#: 1.3-1.4x and 1.5x for two passes); bfloat16 through the compiled CPU path measured
#: slower in one pass (~0.7x the two passes at 1M and 16M); float16 never: its gradient
#: at upstream 1 would underflow where a loss scaler (the reason float16 training
#: multiplies the loss) needs it, so it is formed with the upstream folded in, by the
#: backward pass.
ONE_PASS_DTYPES = (torch.float32,)
#: ... and for these where the torch implementation runs eager (small CPU tensors) or on
#: Triton: there one pass is simply fewer calls and fewer bytes.
ONE_PASS_UNCOMPILED_DTYPES = (torch.bfloat16,)


def one_pass_pays(first: Tensor) -> bool:
    """Whether a loss's one-pass variant is the faster route for student ``first``."""
    if first.dtype in ONE_PASS_DTYPES:
        return True
    return first.dtype in ONE_PASS_UNCOMPILED_DTYPES and not (
        backend_for(first) == "torch" and cpu_compiles(first))


def scaled_saved_grad(grad: Tensor, upstream: Tensor) -> Tensor:
    """The saved gradient at upstream 1, scaled by the loss's incoming gradient.

    ``loss.backward()`` (and a sum of losses) hands in exactly 1: then the saved tensor is
    returned as it is, with no pass over memory. Autograd's saved-tensor version check
    guards it: a caller that modified it in place and runs backward again through a
    retained graph gets autograd's usual error, not a wrong gradient. The check reads the
    value, so it is made only for CPU upstreams (on a GPU it would sync every call).
    """
    if upstream.device.type == "cpu" and upstream.item() == 1.0:
        return grad
    return grad * upstream


def per_sample(coef: Tensor, like: Tensor) -> tuple[Tensor, ...]:
    """The ``K`` rows of a ``(K, B)`` coefficient tensor, each shaped ``(B, 1, ..., 1)`` to
    broadcast against ``like`` (torch implementations)."""
    return coef.view((coef.shape[0], like.shape[0]) + (1,) * (like.dim() - 1)).unbind(0)


# ---------------------------------------------------------------- Triton launches
# Kernel signatures: the data pointers, the coefficient pointer, [upstream pointer,]
# the output pointer, then (n_per_sample, batch, row_start) and the constexprs; the grid
# is (blocks of one sample's elements, samples), in chunks of rows (row_chunks).
def _contiguous(data) -> tuple[list, int, int]:
    data = [x.contiguous() for x in data]
    batch = data[0].shape[0]
    return data, batch, data[0].numel() // batch if batch else 0


def launch_elementwise(kernel, data, coef: Tensor) -> Tensor:
    """A new tensor like ``data[0]`` (contiguous) written by ``kernel``."""
    data, batch, n = _contiguous(data)
    out = torch.empty_like(data[0])
    if n == 0:
        return out
    for start, rows in row_chunks(batch):
        kernel[(blocks_per_row(n), rows)](*data, coef, out, n, batch, start, BLOCK=BLOCK)
    return out


def launch_loss(kernel, data, coef: Tensor, metric: str, huber_c: float) -> Tensor:
    """Float32 scalar: the sum of ``kernel``'s per-program partial sums, added in float64
    in a fixed order (deterministic, no atomics)."""
    data, batch, n = _contiguous(data)
    n_blocks = blocks_per_row(n)
    partial = torch.empty(batch * n_blocks, dtype=torch.float32, device=data[0].device)
    for start, rows in row_chunks(batch):
        kernel[(n_blocks, rows)](
            *data, coef, partial, n, batch, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return partial.sum(dtype=torch.float64).to(torch.float32)


def launch_loss_backward(kernel, data, coef: Tensor, upstream: Tensor, metric: str,
                         huber_c: float) -> Tensor:
    """The gradient wrt ``data[0]`` (its shape and dtype, contiguous) written by ``kernel``."""
    data, batch, n = _contiguous(data)
    grad = torch.empty_like(data[0])
    for start, rows in row_chunks(batch):
        kernel[(blocks_per_row(n), rows)](
            *data, coef, upstream, grad, n, batch, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return grad


def launch_loss_and_grad(kernel, data, coef: Tensor, metric: str,
                         huber_c: float) -> tuple[Tensor, Tensor]:
    """One-pass launches: the loss of :func:`launch_loss` (same partial sums, same order)
    and the gradient wrt ``data[0]`` at upstream 1, both written by ``kernel``."""
    data, batch, n = _contiguous(data)
    n_blocks = blocks_per_row(n)
    partial = torch.empty(batch * n_blocks, dtype=torch.float32, device=data[0].device)
    grad = torch.empty_like(data[0])
    for start, rows in row_chunks(batch):
        kernel[(n_blocks, rows)](
            *data, coef, partial, grad, n, batch, start,
            METRIC=METRIC_CODES[metric], HUBER_C=huber_constexpr(metric, huber_c), BLOCK=BLOCK,
        )
    return partial.sum(dtype=torch.float64).to(torch.float32), grad
