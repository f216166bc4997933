"""What the machine a figure came from is: CPU model, its int8 dot-product instructions, cores, memory limit.

Read from /proc/cpuinfo (Linux, x86 and ARM) and cgroups; the probe carries the same facts from a remote device.
An INT8 speed-up depends on these instructions (VNNI / AMX on x86, dot-product / i8mm on ARM), so every benchmark
names them.

>>> describe_int8_isa({"avx2", "avx512_vnni", "amx_int8"})
'AVX-512 VNNI, AMX-INT8'
"""

from __future__ import annotations

import os

# The facts live in the standalone probe child, which reports them from remote devices too (one implementation).
from edgepack.runtime.probe_child import INT8_ISA_FLAGS, cpu_flags, cpu_model, describe_int8_isa, device_facts

__all__ = ["INT8_ISA_FLAGS", "cpu_flags", "cpu_model", "describe_int8_isa", "device_facts", "host_line"]


def host_line() -> str:
    """'Intel Xeon ..., 2 cores, int8: AVX-512 VNNI, AMX-INT8': what a benchmark header names."""
    return f"{cpu_model()}, {os.cpu_count()} cores, int8 ISA: {describe_int8_isa(cpu_flags())}"
