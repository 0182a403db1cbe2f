"""Kernel launches that cost a fraction of ``kernel[grid](...)``'s host time.

Without CUDA graphs (prefill, ``generate()`` with a dynamic cache) every fused op's Python
runs before its kernels start. On the H100 host an eager ``quantize_rows`` call (one autotuned
launch) took 99.8 us where our own host work measured 17.4 us on a CPU, so most of it was
Triton's launch path (``benchmarks/results/gpu_h100_2026-11-27.md``); the W4A8 prefill left
its GPU idle a third of the time. Much of a launch is work that gives the same answer on
every call at a call site:

* ``Autotuner.run`` builds the tuning key (a dict of every argument, ``str`` of each dtype)
  and the config's keyword dict;
* ``JITFunction.run`` reads environment knobs, formats its compile options into the cache
  key, re-checks the kernel's global values and asks for launch metadata.

:func:`launch` keeps Triton's own binder, which classifies each argument (dtype, 16-byte
alignment of pointers, integers equal to 1 or divisible by 16) exactly as the compile did,
and keys the compiled kernel on that classification: a call whose arguments would compile a
different specialization never reuses a kernel built for another. The first call of each
tuning key goes through the autotuner (which times its configs) and the first of each
specialization through ``JITFunction.run`` (which compiles); later ones call the compiled
kernel's launcher directly, with the same arguments Triton would pass it.

Triton's own path is taken whenever launch hooks are installed (profilers such as Proton
read launch metadata through them) and for interpreted kernels (``TRITON_INTERPRET=1``);
without hooks the launcher gets None for the metadata and the hooks, which it would only
have passed to the hooks. Compile options from the environment (``TRITON_DEBUG``) are read
at each first call, as Triton reads them when it compiles: changing them later in the
process does not recompile kernels already launched here. :data:`FAST` off restores
``kernel[grid](...)`` everywhere (benchmarks compare both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor
from triton import knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

__all__ = ["FAST", "Prepared", "clear", "int_class", "launch", "prepare", "prepare_call",
           "record_second_call", "recording"]

#: Launch through :func:`launch`'s cache (False: ``kernel[grid](...)`` at every call).
FAST = True

# Keys hold ids; each value holds the object itself too, so that an id stays taken (no other
# kernel can reuse it) while its entries exist.
# (id(autotuner), key values, dtypes) -> (autotuner, config, its keyword arguments)
_CONFIGS: dict[tuple, tuple[Any, Any, dict[str, Any]]] = {}
# (id(jit function), device, specialization, options) -> (jit function, compiled kernel)
_COMPILED: dict[tuple, tuple[Any, Any]] = {}
# id(autotuner) -> (autotuner, positions of its key arguments, their names)
_KEY_POS: dict[int, tuple[Any, tuple[int, ...], tuple[str, ...]]] = {}
# Where :func:`launch` appends ``(kernel, grid, args, kwargs)`` of each call (recording()).
_RECORD: list[tuple] | None = None


def clear() -> None:
    """Forget every cached config and compiled kernel (tests; a reloaded kernel module)."""
    _CONFIGS.clear()
    _COMPILED.clear()
    _KEY_POS.clear()


def _hooked(hook: Any) -> bool:
    """Whether a launch hook would do anything: Triton >= 3.5 keeps an (empty) chain of hooks
    where older releases kept None. With no hook to call, Triton's launcher does nothing with
    the launch metadata, so :func:`launch` passes None for it and the hooks."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _tune_key(tuner: Autotuner, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What ``Autotuner.run`` keys its choice on: the named key arguments' values and the
    dtypes of the tensor arguments (here as dtype objects, not strings)."""
    pos = _KEY_POS.get(id(tuner))
    if pos is None:
        names = tuple(tuner.arg_names)
        keys = tuple(k for k in tuner.keys if k in names)
        pos = (tuner, tuple(names.index(k) for k in keys), keys)
        _KEY_POS[id(tuner)] = pos
    n = len(args)
    vals = tuple([args[i] if i < n else kwargs.get(name)
                  for i, name in zip(pos[1], pos[2], strict=True)])
    dtypes = tuple([a.dtype for a in args if isinstance(a, Tensor)])
    kw_dtypes = tuple([v.dtype for v in kwargs.values() if isinstance(v, Tensor)])
    return id(tuner), vals, dtypes, kw_dtypes


def _bind(jit: JITFunction, args: tuple, kwargs: dict[str, Any]) -> tuple[int, dict, Any]:
    """(device, bound arguments, cache key) of a call: Triton's binder classifies the
    arguments as its compile would; the key is None where a constexpr is unhashable."""
    device = driver.active.get_current_device()
    bound, spec, options = jit.device_caches[device][4](*args, **kwargs)
    try:
        ckey = (id(jit), device, tuple(spec), tuple(options.items()))
        hash(ckey)
    except TypeError:
        ckey = None
    return device, bound, ckey


def _remember(jit: JITFunction, compiled: Any, ckey: Any) -> None:
    """Cache the kernel Triton's path compiled or found for a call of key ``ckey`` (not an
    unfinished asynchronous compile; nothing for an unhashable key)."""
    if ckey is not None and compiled is not None and not hasattr(compiled, "result"):
        _COMPILED[ckey] = (jit, compiled)


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)`` with less host work once a call site has run.

    Args:
        kernel: A ``@triton.jit`` function or a ``triton.autotune`` autotuner around one.
        grid: The launch grid: a tuple, or a function of the bound arguments (with the
            autotuner's config in them), as for ``kernel[grid]``.
        *args: The kernel's arguments, as for ``kernel[grid]``.
        **kwargs: Its keyword arguments (constexprs, ``num_warps``, ...).

    Returns:
        What ``kernel[grid](...)`` returns (the compiled kernel).
    """
    if _RECORD is not None:
        _RECORD.append((kernel, grid, args, kwargs))
    # Interpreted kernels (TRITON_INTERPRET=1) are not JITFunctions: Triton's path.
    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if not FAST or not isinstance(jit, JITFunction) or _hooked(knobs.runtime.launch_enter_hook) \
            or _hooked(knobs.runtime.launch_exit_hook):
        return kernel[grid](*args, **kwargs)
    if jit is not kernel:
        tkey = _tune_key(kernel, args, kwargs)
        hit = _CONFIGS.get(tkey)
        if hit is None:
            out = kernel[grid](*args, **kwargs)  # tunes, or finds its own cached choice
            cfg = kernel.best_config
            _CONFIGS[tkey] = (kernel, cfg, cfg.all_kwargs())
            if cfg.pre_hook is None:
                _remember(jit, out, _bind(jit, args, {**kwargs, **cfg.all_kwargs()})[2])
            return out
        _, cfg, cfg_kwargs = hit
        if cfg.pre_hook is not None:
            return kernel[grid](*args, **kwargs)  # a hook that runs at every launch
        kernel.best_config = cfg  # as Autotuner.run leaves it: wrappers read it
        kwargs = {**kwargs, **cfg_kwargs}
    device, bound, ckey = _bind(jit, args, kwargs)
    hit = _COMPILED.get(ckey) if ckey is not None else None
    if hit is None:
        compiled = jit.run(*args, grid=grid, warmup=False, **kwargs)
        _remember(jit, compiled, ckey)
        return compiled
    compiled = hit[1]
    if callable(grid):
        grid = grid(bound)
    size = len(grid)
    compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1,
                 driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *bound.values())
    return compiled


class Prepared:
    """A launch fixed at one call site: kernel, config, grid and arguments, apart from tensor
    arguments that :meth:`__call__` replaces. Made by :func:`prepare`."""

    __slots__ = ("kernel", "grid", "args", "kwargs", "config", "compiled", "device", "values",
                 "grid3", "slots", "varying", "ints", "positions")

    def __init__(self, kernel, grid, args, kwargs, config, compiled, device, bound,
                 grid3) -> None:
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs
        self.config = config  # the autotuner's, or None
        self.compiled, self.device, self.grid3 = compiled, device, grid3
        self.values = list(bound.values())
        # name -> (position in the launcher's arguments, dtype, 16-byte aligned)
        self.slots = {n: (i, v.dtype, v.data_ptr() % 16 == 0)
                      for i, (n, v) in enumerate(bound.items()) if isinstance(v, Tensor)}
        self.positions = {n: i for i, n in enumerate(bound)}
        # name -> (position, specialization class) of the integer arguments each call passes
        self.ints: dict[str, tuple[int, tuple]] = {}
        self.varying: frozenset[str] = frozenset()

    def vary(self, *names: str) -> Prepared:
        """Let go of the tensor arguments ``names`` (keeping their dtype and alignment): every
        call passes them. A prepared launch kept for reuse must not hold one call's output
        alive. Integer arguments among ``names`` (sizes, strides) are passed by every call
        too, and taken where they fall in the prepared value's specialization class
        (:func:`int_class`). Returns ``self``."""
        arg_names = self._arg_names()
        args = list(self.args)
        for name in names:
            if name not in self.slots:
                pos = self.positions[name]
                value = self.values[pos]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(f"{name} is neither a tensor nor an integer argument")
                self.ints[name] = (pos, int_class(value))
                self.varying = self.varying | {name}
                continue
            self.values[self.slots[name][0]] = None
            i = arg_names.index(name)
            if i < len(args):
                args[i] = None
            else:
                self.kwargs = {**self.kwargs, name: None}
        self.args = tuple(args)
        self.varying = self.varying | frozenset(names)
        return self

    def __call__(self, **tensors: Tensor) -> Any:
        """Launch with the named tensor arguments replaced; returns the compiled kernel.

        A replacement of another dtype or 16-byte alignment than the prepared call's (which
        Triton would specialize differently), or launch hooks installed since, take
        :func:`launch` with the same arguments instead.

        Raises:
            TypeError: A varying argument (:meth:`vary`) not given.
        """
        if not self.varying <= tensors.keys():
            raise TypeError(f"this prepared launch needs {sorted(self.varying)}, got "
                            f"{sorted(tensors)}")
        if driver.active.get_current_device() != self.device:
            return self._relaunch(tensors)
        values = self.values.copy()
        ints = self.ints
        for name, t in tensors.items():
            if name in ints:
                pos, cls = ints[name]
                if int_class(t) != cls:
                    return self._relaunch(tensors)  # another specialization: Triton's binder
                values[pos] = t
                continue
            pos, dtype, aligned = self.slots[name]
            if t.dtype is not dtype or (t.data_ptr() % 16 == 0) is not aligned:
                return self._relaunch(tensors)
            values[pos] = t
        if not FAST or _hooked(knobs.runtime.launch_enter_hook) \
                or _hooked(knobs.runtime.launch_exit_hook):
            return self._relaunch(tensors)
        if self.config is not None:
            self.kernel.best_config = self.config  # as launch leaves it: wrappers read it
        c = self.compiled
        gx, gy, gz = self.grid3
        c.run(gx, gy, gz, driver.active.get_current_stream(self.device), c.function,
              c.packed_metadata, None, None, None, *values)
        return c

    def _arg_names(self) -> list[str]:
        return self.kernel.fn.arg_names if isinstance(self.kernel, Autotuner) \
            else self.kernel.arg_names

    def _relaunch(self, tensors: dict[str, Tensor]) -> Any:
        names = self._arg_names()
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for name, t in tensors.items():
            i = names.index(name)
            if i < len(args):
                args[i] = t
            else:
                kwargs[name] = t
        return launch(self.kernel, self.grid, *args, **kwargs)


def int_class(value: int) -> tuple[bool, bool, bool, bool]:
    """What Triton specializes an integer argument on: equal to 1 (compiled in as a constant),
    divisible by 16, and whether it fits int32 or int64 (its type in the kernel). Two values
    of one class run the same compiled kernel (``tests/test_triton_launch.py`` checks this
    against Triton's own specialization)."""
    return value == 1, value % 16 == 0, -2**31 <= value < 2**31, -2**63 <= value < 2**63


def prepare(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> Prepared | None:
    """The launch :func:`launch` would make for these arguments, fixed for relaunching, or
    None where it cannot be fixed: Triton's own path (interpreted kernels, launch hooks,
    :data:`FAST` off), a tuning key or specialization not launched before (the first call
    tunes and compiles through :func:`launch`), a config with a pre-hook, an unhashable
    constexpr.

    A relaunch skips the autotuner's key, the binder and the grid function: the same
    compiled kernel gets the same argument values, with the current stream, as long as the
    replaced tensors keep dtype and alignment and the current device is the prepared one
    (:meth:`Prepared.__call__`).
    """
    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if not FAST or not isinstance(jit, JITFunction) or _hooked(knobs.runtime.launch_enter_hook) \
            or _hooked(knobs.runtime.launch_exit_hook):
        return None
    full, config = kwargs, None
    if jit is not kernel:
        hit = _CONFIGS.get(_tune_key(kernel, args, kwargs))
        if hit is None or hit[1].pre_hook is not None:
            return None
        full, config = {**kwargs, **hit[2]}, hit[1]
    device, bound, ckey = _bind(jit, args, full)
    hit = _COMPILED.get(ckey) if ckey is not None else None
    if hit is None:
        return None
    g = grid(bound) if callable(grid) else grid
    grid3 = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
    return Prepared(kernel, grid, args, kwargs, config, hit[1], device, bound, grid3)



def prepare_call(call: tuple) -> Prepared | None:
    """:func:`prepare` of a ``(kernel, grid, args, kwargs)`` launch description (as
    ``fp8_gemm.mm_call`` and ``w4a8_dequant.shift_call`` return, and :func:`recording`
    collects)."""
    fn, grid, args, kwargs = call
    return prepare(fn, grid, *args, **kwargs)

def record_second_call(table: dict, key: Any, limit: int, tries: int,
                       full: Callable[[], Any], build: Callable[[list[tuple], Any], Any],
                       capturing: bool) -> Any:
    """``full()`` for a ``key`` of ``table`` that has no prepared launch yet, recording its
    launches at the key's second call for ``build(calls, result)`` to prepare (the plans of
    :mod:`~qcompile.backends.triton.gemv_plan` and
    :mod:`~qcompile.backends.triton.attention_plan`).

    The first call is not recorded: it tunes (autotuners, timed path choices), and the timed
    candidates' launches would be recorded too. ``table[key]`` counts the calls so far until
    ``build`` returns something, which then takes the count's place; after ``tries``
    recordings that build nothing, and while a CUDA graph is being ``capturing``, the key
    keeps the full path without recording. The key moves to the end of ``table``, and the
    oldest keys go past ``limit``."""
    seen = table.get(key) or 0
    if seen == 0 or seen > tries or capturing:
        if seen == 0:
            _keep(table, key, 1, limit)
        return full()
    with recording() as calls:
        out = full()
    _keep(table, key, build(calls, out) or seen + 1, limit)
    return out


def _keep(table: dict, key: Any, value: Any, limit: int) -> None:
    table.pop(key, None)
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]


@contextmanager
def recording() -> Iterator[list[tuple]]:
    """Collect what :func:`launch` is asked to launch in this block, as ``(kernel, grid,
    args, kwargs)`` per call, for a caller that prepares a wrapper's launch without knowing
    its arguments (:mod:`qcompile.backends.triton.rows_plan`). Not nested: an inner block
    collects its own launches only. Kernels launched without :func:`launch` (the
    interpreter's fixed configs) are not seen; launches from other threads during the block
    are (a caller that expects one launch then sees two)."""
    global _RECORD
    outer, calls = _RECORD, []
    _RECORD = calls
    try:
        yield calls
    finally:
        _RECORD = outer
