"""The scaffolding every kernel op shares: custom-op registration and dispatch, and the
Triton launch loops.

An op module writes its math (a Triton kernel, a torch implementation) and calls
:func:`register_op` (or :func:`register_loss_op` for a loss and its backward op) once;
everything else is here:

* the ``torch.library`` custom op ``fastdiff::<name>``, its schema read from the torch
  implementation's annotations (tensors first, then ``str``/``float`` constants);
* one CPU/CUDA kernel choosing the backend at each call (:func:`backend_for`):
  the Triton launcher, or the torch implementation through :func:`cpu_fused`
  (torch.compile'd for large CPU tensors, eager below the threshold);
  other devices get the torch implementation;
* the fake (shapes, dtypes and strides for torch.compile), the autograd formula.

Outputs are contiguous on every path, as the fakes say (a torch implementation fed
channels-last tensors would otherwise hand back channels-last ones, and a compiled graph
would then read them with the fake's strides).

Per-sample coefficients reach an op as one float32 tensor ``coef`` of shape ``(K, B)``
(coefficient ``j`` of sample ``r`` at ``coef[j, r]``): formed in float64, stacked and
rounded to float32 in one call on the host side (DESIGN §4). A loss keeps its per-sample
scale in row 0 (an aligned row: the torch path's final dot product then adds in the same
order as for a tensor of its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._metrics import METRIC_CODES, huber_constexpr
from .dispatch import BLOCK, backend_for, blocks_per_row, cpu_fused, row_chunks


# ---------------------------------------------------------------- registration
def _like_first(first: Tensor, *rest) -> Tensor:
    return torch.empty_like(first, memory_format=torch.contiguous_format)


def _float32_scalar(first: Tensor, *rest) -> Tensor:
    return first.new_empty((), dtype=torch.float32)


def register_op(name: str, torch_impl, triton_impl, *, fake=_like_first, backward=None,
                setup_context=None):
    """Register ``fastdiff::<name>`` and return the op (call it like ``torch_impl``).

    ``torch_impl(*args)`` and ``triton_impl(*args)`` compute the same thing from the same
    arguments; the first argument decides the backend and the compiled CPU path.
    ``fake``: shapes for torch.compile (default: an empty tensor like the first argument).
    ``backward`` / ``setup_context``: the autograd formula, as for
    ``torch.library.register_autograd`` (none: the op is not differentiable).
    """
    schema = torch.library.infer_schema(torch_impl, mutates_args=())

    def default(*args):  # devices other than CPU and CUDA
        return torch_impl(*args).contiguous()

    op = torch.library.custom_op(f"fastdiff::{name}", default, mutates_args=(), schema=schema)

    @op.register_kernel(("cpu", "cuda"))
    def _(*args):
        first = args[0]
        if backend_for(first) == "triton":
            return triton_impl(*args)
        return cpu_fused(torch_impl, first)(*args).contiguous()

    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def register_linear_op(name: str, torch_impl, triton_impl):
    """An elementwise op ``(*data, coef) -> sum_i coef[i] * data[i]`` (per sample; ``coef``
    ``(K, B)`` with one row per data tensor), differentiable in each data tensor:
    ``grad_i = upstream * coef[i]``, in that tensor's dtype."""

    def setup_context(ctx, inputs, output):
        *data, coef = inputs
        ctx.save_for_backward(coef)
        ctx.dtypes = tuple(x.dtype for x in data)

    def backward(ctx, grad):
        rows = per_sample(ctx.saved_tensors[0], grad)
        grads = tuple((grad * c).to(dtype) if needed else None
                      for c, dtype, needed in zip(rows, ctx.dtypes, ctx.needs_input_grad))
        return grads + (None,)

    return register_op(name, torch_impl, triton_impl, backward=backward,
                       setup_context=setup_context)


def register_loss_op(name: str, torch_impl, triton_impl, backward_torch, backward_triton):
    """A loss ``fastdiff::<name>(*tensors, metric, huber_c)`` -> float32 scalar,
    differentiable in its first tensor only, and its backward op
    ``fastdiff::<name>_backward(*tensors, upstream, metric, huber_c)`` -> the gradient wrt
    the first tensor (its shape and dtype), where ``upstream`` is the loss's incoming
    gradient (0-d; the kernels fold it into the per-sample scale). Both ops go through
    :func:`register_op`, so both take the compiled CPU path for large tensors."""
    backward_op = register_op(f"{name}_backward", backward_torch, backward_triton)

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

    return register_op(name, torch_impl, triton_impl, fake=_float32_scalar,
                       backward=backward, setup_context=setup_context)


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
