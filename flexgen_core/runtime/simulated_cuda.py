"""A simulated CUDA device for CPU-only hosts: tensors that say `cuda:0`, hold real CPU values, obey
CUDA's device rules and count the bytes CUDA's allocator would hand out.

The engine's "simulated" device (storage.Devices) computes with these, so the parity suites run the
GPU host's code paths in CI with real numbers, and fail where a GPU would fail:

- a `SimulatedCudaTensor` is a wrapper tensor subclass (`__torch_dispatch__`): it reports device
  `cuda:0` and keeps its values in a CPU tensor. Every op on it runs on those values, after the
  device check CUDA makes: an op that mixes it with a CPU tensor raises CUDA's error (0-dim CPU
  tensors, copies between devices and advanced indexing with CPU indices are allowed, as on CUDA);
  a CPU random generator beside it raises too;
- `simulated_cuda()` is a torch-function mode that turns factory calls and moves to `cuda` (`torch.
  empty(..., device="cuda")`, `t.to("cuda")`, `t.cuda()`) into such tensors. Modes are per thread:
  every thread that makes device tensors enters it (the engine's I/O threads do);
- `MEMORY` counts the live bytes of every simulated tensor's storage (views share theirs), rounded to
  CUDA's 512-byte blocks, and their peak: what `torch.cuda.max_memory_allocated` would report. With
  a `capacity`, an allocation past it raises `torch.OutOfMemoryError` as CUDA does.
- attention (`scaled_dot_product_attention`) runs PyTorch's math path on simulated tensors, its
  (queries x keys) scores materialised and counted: the most any CUDA kernel choice can spend.

Not simulated: the caching allocator's reserved-but-unused memory (on CUDA the engine turns on its
expandable segments, storage._expandable_segments; the planner fills 95% of the GPU) and the kernels'
own scratch space.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SIMULATED_DEVICE = torch.device("cuda", 0)
ALLOCATION_BLOCK_BYTES = 512  # CUDA's caching allocator rounds every allocation up to this

# Ops that may take tensors of both devices on CUDA: copies, and advanced indexing with CPU indices.
_CROSS_DEVICE_OPS = {
    torch.ops.aten.copy_.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put_.default,
    torch.ops.aten.index_put.default,
    torch.ops.aten._index_put_impl_.default,
}

# Softmaxes that read float16/bfloat16 and write float32 in one CUDA kernel (`half_to_float`, what
# `softmax(x, dtype=torch.float32)` dispatches to on CUDA); the CPU kernel has no such mode, and upcasting
# first gives the same values.
_HALF_TO_FLOAT_OPS = {torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default}


class SimulatedMemory:
    """Live and peak bytes of the simulated device, as CUDA's allocator counts them (per storage,
    rounded up to its blocks), optionally capped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._storages: dict[int, list[int]] = {}  # storage key -> [wrappers alive, bytes]
        self.live_bytes = 0
        self.peak_bytes = 0
        self.capacity: int | None = None

    def track(self, wrapper: torch.Tensor, inner: torch.Tensor) -> None:
        storage = inner.untyped_storage()
        key, nbytes = storage._cdata, -(-storage.nbytes() // ALLOCATION_BLOCK_BYTES) * ALLOCATION_BLOCK_BYTES
        with self._lock:
            held = self._storages.get(key)
            if held is None:
                if self.capacity is not None and self.live_bytes + nbytes > self.capacity:
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory (simulated). Tried to allocate {nbytes / 2**20:.2f} MiB; "
                        f"{self.live_bytes / 2**30:.2f} GiB already allocated of a {self.capacity / 2**30:.2f} GiB "
                        "capacity")
                self._storages[key] = [1, nbytes]
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            else:
                held[0] += 1
        weakref.finalize(wrapper, self._release, key)

    def _release(self, key: int) -> None:
        with self._lock:
            held = self._storages[key]
            held[0] -= 1
            if held[0] == 0:
                del self._storages[key]
                self.live_bytes -= held[1]

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.live_bytes

    @contextmanager
    def limited(self, capacity: int | None) -> Iterator["SimulatedMemory"]:
        """Cap the device at `capacity` bytes for the duration (as set_per_process_memory_fraction)."""
        previous, self.capacity = self.capacity, capacity
        try:
            yield self
        finally:
            self.capacity = previous


MEMORY = SimulatedMemory()


def _device_error(func, devices: list[str]) -> RuntimeError:
    return RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                        f"{devices[0]} and {devices[1]}! (simulated CUDA, in {func})")


class SimulatedCudaTensor(torch.Tensor):
    """A tensor on the simulated `cuda:0`: values in a CPU tensor (`.elem`), device rules of CUDA."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu"
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=SIMULATED_DEVICE, requires_grad=False)
        wrapper.elem = elem
        MEMORY.track(wrapper, elem)
        return wrapper

    def __repr__(self) -> str:
        return f"SimulatedCudaTensor({self.elem!r})"

    # Pointers and storage as CUDA's would be: the buffer's own (comparing views of one buffer works).
    def data_ptr(self) -> int:
        return self.elem.data_ptr()

    def untyped_storage(self):
        return self.elem.untyped_storage()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._fused_sdp_choice.default:
            return int(SDPBackend.MATH)  # see the module docstring
        flat, _ = tree_flatten((args, kwargs))
        _check_devices(func, flat, kwargs)
        to_cpu = func in (torch.ops.aten._to_copy.default,) and _is_cpu(kwargs.get("device"))
        if "device" in kwargs and not _is_cpu(kwargs["device"]):
            kwargs = dict(kwargs, device=torch.device("cpu"))
        plain_inputs = {id(t) for t in flat if isinstance(t, torch.Tensor) and type(t) is torch.Tensor}
        if func in _HALF_TO_FLOAT_OPS and len(args) > 2 and args[2]:
            return SimulatedCudaTensor(func(_unwrap(args[0]).float(), args[1], False))
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if to_cpu:
            return out

        def wrap(t):
            if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and id(t) not in plain_inputs:
                return SimulatedCudaTensor(t)
            return t  # a CPU tensor written in place (a copy to the host) stays what it was
        return tree_map(wrap, out)


def _wrap_new(out):
    """Freshly made CPU tensors of a factory call, as tensors of the simulated device."""
    return tree_map(lambda t: SimulatedCudaTensor(t) if type(t) is torch.Tensor else t, out)


def _unwrap(t):
    return t.elem if isinstance(t, SimulatedCudaTensor) else t


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _check_devices(func, flat: list, kwargs: dict) -> None:
    generator = kwargs.get("generator")
    if generator is not None and generator.device.type == "cpu":
        raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu' (simulated CUDA)")
    if func in _CROSS_DEVICE_OPS:
        return
    for t in flat:
        if isinstance(t, torch.Tensor) and not isinstance(t, SimulatedCudaTensor) and t.device.type != "meta":
            if t.dim() > 0:  # CUDA takes 0-dim CPU tensors as scalars
                raise _device_error(func, [str(SIMULATED_DEVICE), str(t.device)])


def _is_cuda(device) -> bool:
    if device is None or isinstance(device, (int, bool)):
        return False
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def to_simulated(t: torch.Tensor) -> SimulatedCudaTensor:
    """A copy of a CPU tensor on the simulated device (a no-op for one already there)."""
    if isinstance(t, SimulatedCudaTensor):
        return t
    if t.device.type != "cpu":
        raise RuntimeError(f"cannot move a {t.device} tensor to the simulated CUDA device")
    return SimulatedCudaTensor(t.detach().clone())


# Python operators whose bindings need CUDA's runtime, and the ops they stand for.
_DUNDER_OPS = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or",
               "__xor__": "bitwise_xor", "__iand__": "bitwise_and_", "__ior__": "bitwise_or_"}


class _SimulatedCudaMode(TorchFunctionMode):
    """Factory calls and moves to `cuda` make simulated tensors (see the module docstring)."""

    _MOVES = {torch.Tensor.to, torch.Tensor.cuda}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # no page-locking without CUDA; the bytes are the same
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func in self._MOVES:
            return self._move(func, args, kwargs)
        if func is torch.Tensor.tolist and isinstance(args[0], SimulatedCudaTensor):
            return args[0].elem.tolist()  # a device-to-host copy, as on CUDA
        if func is torch.Tensor.contiguous and isinstance(args[0], SimulatedCudaTensor):
            # Its Python binding needs CUDA's runtime: go to the op itself.
            tensor = args[0]
            return tensor if tensor.is_contiguous() else torch.ops.aten.clone.default(
                tensor, memory_format=torch.contiguous_format)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], SimulatedCudaTensor):
            # PyTorch's indexing code takes a CUDA device guard, which a CPU-only build lacks: index the
            # values directly. CUDA accepts CPU index tensors and values here too.
            index = tree_map(_unwrap, args[1])
            if func is torch.Tensor.__getitem__:
                return SimulatedCudaTensor(args[0].elem[index])
            args[0].elem[index] = _unwrap(args[2])
            return None
        device = kwargs.get("device")
        if _is_cuda(device):
            kwargs["device"] = torch.device("cpu")
            return _wrap_new(func(*args, **kwargs))  # this mode is off inside its own handler
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            # Some Python bindings (copy_, ...) call into CUDA's runtime before dispatching: go to the op.
            name = getattr(func, "__name__", "")
            op = getattr(torch.ops.aten, _DUNDER_OPS.get(name, name), None)
            if "not linked with support for cuda" not in str(e) or op is None:
                raise
            return op(*args, **kwargs)

    @staticmethod
    def _move(func, args, kwargs):
        tensor, rest = args[0], list(args[1:])
        target = kwargs.pop("device", None)
        if func is torch.Tensor.cuda:
            target = "cuda"
            rest = []
        elif rest and (isinstance(rest[0], (str, torch.device)) or _is_cuda(rest[0])):
            target = rest.pop(0)
        if not _is_cuda(target):
            if target is not None:
                kwargs["device"] = target
            return func(tensor, *rest, **kwargs)
        kwargs.pop("non_blocking", None)
        kwargs.pop("copy", None)
        kwargs.pop("memory_format", None)
        dtype = kwargs.pop("dtype", rest[0] if rest and isinstance(rest[0], torch.dtype) else None)
        if isinstance(tensor, SimulatedCudaTensor):
            return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)
        moved = to_simulated(tensor)
        return moved if dtype is None or dtype == moved.dtype else moved.to(dtype)


class _SimulatedCudaFactories(TorchDispatchMode):
    """Tensors that PyTorch's own C++ code makes on `cuda` (inside composite ops) become simulated."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            out = func(*args, **dict(kwargs, device=torch.device("cpu"), pin_memory=None)
                       if "pin_memory" in kwargs else dict(kwargs, device=torch.device("cpu")))
            return _wrap_new(out)
        return func(*args, **kwargs)


_entered = threading.local()
_guard_set: list[bool] = []


def _cuda_device_guard() -> None:
    """PyTorch's Python bindings take a device guard of their tensors' device: without CUDA, use the
    no-op guard PyTorch provides for fake CUDA tensors."""
    if not _guard_set and not torch.cuda.is_available():
        torch._C._ensureCUDADeviceGuardSet()
        _guard_set.append(True)


@contextmanager
def simulated_cuda() -> Iterator[None]:
    """Make `cuda` mean the simulated device on this thread for the duration (re-entrant)."""
    _cuda_device_guard()
    depth = getattr(_entered, "depth", 0)
    if depth:
        _entered.depth = depth + 1
        try:
            yield
        finally:
            _entered.depth -= 1
        return
    _entered.depth = 1
    try:
        with _SimulatedCudaMode(), _SimulatedCudaFactories():
            yield
    finally:
        _entered.depth = 0


def enter_on_this_thread() -> None:
    """For a worker thread that makes simulated tensors for its whole life (an I/O thread)."""
    _cuda_device_guard()
    if getattr(_entered, "depth", 0):
        return
    _entered.depth = 1
    _SimulatedCudaMode().__enter__()
    _SimulatedCudaFactories().__enter__()
