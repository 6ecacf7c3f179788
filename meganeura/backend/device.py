"""The GPU: adapter choice, feature and limit probing, and the opened wgpu device.

A discrete GPU is preferred, then an integrated one, then anything else (Mesa's lavapipe on machines with
no GPU). `MEGANEURA_DEVICE` (or `--device`) picks an adapter by index or by a substring of its name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .polling import pollers

# The optional features a device is opened with (where the adapter has them and they are not withheld), and
# the ones `list_adapters` reports.
REQUESTED_FEATURES = ("shader-f16", "subgroup", "timestamp-query", "texture-adapter-specific-format-features")
OPTIONAL_FEATURES = (*REQUESTED_FEATURES, "immediates")
PREFERENCE = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
LIMITS = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
          "max-compute-invocations-per-workgroup", "max-compute-workgroups-per-dimension",
          "max-storage-buffers-per-shader-stage", "max-storage-textures-per-shader-stage",
          "min-storage-buffer-offset-alignment")


class DeviceError(RuntimeError):
    """No usable GPU adapter."""


@dataclass
class Device:
    wgpu_device: object
    name: str
    backend: str
    adapter_type: str
    features: frozenset
    limits: dict
    max_binding: int                    # bytes one storage binding may cover (may be forced lower)
    layout: str = "gpu"                 # "cpu": lanes are SIMD lanes of a CPU core (lavapipe), see kernels
    pipelines: dict = field(default_factory=dict)    # (source, entry) -> compute pipeline, for every runner
    layouts: dict = field(default_factory=dict)      # bind group layouts by their entries
    measured_subgroup_size: int | None = None

    @property
    def has_f16(self) -> bool:
        return "shader-f16" in self.features

    @property
    def has_subgroups(self) -> bool:
        return "subgroup" in self.features

    @property
    def read_write_textures(self) -> bool:
        """rgba32uint storage textures may be read and written in one binding (as the adapter's formats
        allow, where WebGPU alone allows only write-only or read-only)."""
        return "texture-adapter-specific-format-features" in self.features

    @property
    def subgroup_size(self) -> int:
        """Invocations per subgroup as this device's shaders run them (0 without subgroups): measured once,
        as wgpu reports only a range."""
        if not self.has_subgroups:
            return 0
        if self.measured_subgroup_size is None:
            self.measured_subgroup_size = _measure_subgroup_size(self.wgpu_device)
        return self.measured_subgroup_size

    @property
    def textures(self) -> bool:
        """Weights, streamed activations and KV caches are read through textures (the CPU layout: lavapipe
        fetches texels with vector loads but reads storage buffers one lane at a time); a KV cache is then
        held twice, as a buffer and as the texture attention reads, and its writes go to both."""
        return self.layout == "cpu"

    def awake(self):
        """Called before a submit: on a CPU device, keep its idle cores polling while the submit runs."""
        if self.adapter_type == "CPU" and (spinners := pollers()) is not None:
            spinners.kick()


def _measure_subgroup_size(gpu) -> int:
    import wgpu

    out = gpu.create_buffer(size=16, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
    module = gpu.create_shader_module(code="@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n"
                                           "@compute @workgroup_size(64) fn main(@builtin(subgroup_size) n: u32, "
                                           "@builtin(local_invocation_index) li: u32) { if (li == 0u) { out[0] = n; } }")
    pipe = gpu.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
    group = gpu.create_bind_group(layout=pipe.get_bind_group_layout(0),
                                  entries=[{"binding": 0, "resource": {"buffer": out, "offset": 0, "size": 16}}])
    enc = gpu.create_command_encoder()
    cp = enc.begin_compute_pass()
    cp.set_pipeline(pipe)
    cp.set_bind_group(0, group)
    cp.dispatch_workgroups(1)
    cp.end()
    gpu.queue.submit([enc.finish()])
    return int(np.frombuffer(gpu.queue.read_buffer(out, 0, 4), np.uint32)[0])


def _adapters():
    import wgpu

    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")     # silences lavapipe's warning on headless machines
    try:
        adapters = wgpu.gpu.enumerate_adapters_sync()
    except Exception as e:      # wgpu raises its own error types when no Vulkan/Metal/DX12 driver loads
        raise DeviceError(f"no GPU adapter could be enumerated ({e}); on Linux without a GPU install "
                          f"mesa-vulkan-drivers for lavapipe") from None
    # Of adapters of one type, OpenGL last: it has no subgroups (lavapipe's Vulkan does; llvmpipe's GL not).
    ranked = sorted(adapters, key=lambda a: (PREFERENCE.get(a.info.get("adapter_type", ""), 9),
                                             a.info.get("backend_type") == "OpenGL"))
    if not ranked:
        raise DeviceError("no GPU adapter found; on Linux without a GPU install mesa-vulkan-drivers (lavapipe)")
    return ranked


def list_adapters() -> list[dict]:
    """Every adapter, in preference order, with its backend, type, optional features and limits."""
    out = []
    for i, a in enumerate(_adapters()):
        out.append({"index": i, "name": a.info.get("device", "?"), "backend": a.info.get("backend_type", "?"),
                    "type": a.info.get("adapter_type", "?"),
                    "features": sorted(f for f in OPTIONAL_FEATURES if f in a.features),
                    "limits": {k: a.limits[k] for k in LIMITS if k in a.limits}})
    return out


def backend_note(dev: Device) -> str | None:
    """A line for people where the device's wgpu backend is OpenGL: it runs, but slower (no subgroups), and
    usually means the Vulkan driver is missing."""
    if dev.backend != "OpenGL":
        return None
    return (f"note: wgpu runs {dev.name} through OpenGL, without subgroups and slower; for Vulkan (lavapipe "
            f"on a machine without a GPU) install mesa-vulkan-drivers")


_OPEN: dict = {}


def open_device(choice: str | None = None, max_binding: int | None = None,
                disable: tuple[str, ...] | None = None, layout: str | None = None) -> Device:
    """The chosen adapter's device (opened once per process and choice). `max_binding` lowers the
    storage-binding limit, `disable` withholds optional features and `layout` ("cpu" or "gpu") overrides
    the kernel layout the adapter type implies: all exercise other paths on one device
    (also set by MEGANEURA_MAX_BINDING, MEGANEURA_DISABLE=shader-f16,subgroup and MEGANEURA_LAYOUT)."""
    choice = choice if choice is not None else os.environ.get("MEGANEURA_DEVICE")
    if max_binding is None and os.environ.get("MEGANEURA_MAX_BINDING"):
        max_binding = int(os.environ["MEGANEURA_MAX_BINDING"])
    if disable is None:
        disable = tuple(f for f in os.environ.get("MEGANEURA_DISABLE", "").split(",") if f)
    layout = layout or os.environ.get("MEGANEURA_LAYOUT") or None
    if layout not in (None, "cpu", "gpu"):
        raise DeviceError(f"layout must be 'cpu' or 'gpu', got {layout!r}")
    key = (choice, max_binding, tuple(sorted(disable)), layout)
    if key in _OPEN:
        return _OPEN[key]
    adapters = _adapters()
    if choice is None:
        adapter = adapters[0]
    elif choice.isdigit():
        if int(choice) >= len(adapters):
            raise DeviceError(f"device index {choice} out of range: {len(adapters)} adapters")
        adapter = adapters[int(choice)]
    else:
        matches = [a for a in adapters if choice.lower() in a.info.get("device", "").lower()]
        if not matches:
            names = ", ".join(a.info.get("device", "?") for a in adapters)
            raise DeviceError(f"no adapter matches {choice!r}; available: {names}")
        adapter = matches[0]
    features = [f for f in REQUESTED_FEATURES if f in adapter.features and f not in disable]
    limits = {k: adapter.limits[k] for k in LIMITS if k.startswith("max-") and k in adapter.limits}
    dev = adapter.request_device_sync(required_features=features, required_limits=limits)
    binding = min(limits["max-storage-buffer-binding-size"], limits["max-buffer-size"])
    device = Device(dev, adapter.info.get("device", "?"), adapter.info.get("backend_type", "?"),
                    adapter.info.get("adapter_type", "?"), frozenset(features), dict(adapter.limits),
                    min(binding, max_binding) if max_binding else binding,
                    layout or ("cpu" if adapter.info.get("adapter_type") == "CPU" else "gpu"))
    _OPEN[key] = device
    return device
