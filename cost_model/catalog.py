"""Real devices and links with datasheet figures, each with its source.

Conventions
-----------
* ``peak_flops`` are dense figures (NVIDIA datasheets quote tensor-core figures "with
  sparsity"; those are halved here). CPU peaks are derived as
  ``cores x GHz x FLOP/cycle/core`` from the core's SIMD width, and the derivation is given.
* Bandwidths are bytes/s **per direction** (NVLink "900 GB/s" is 450 GB/s each way).
* Inter-node links are **per device**: DGX A100/H100/H200 have one 200/400 Gb/s NIC per GPU,
  so a ring over nodes runs at the per-NIC rate.
* Link latencies are NCCL's own per-ring-step latencies (``hwLat`` in
  NVIDIA/nccl ``src/graph/tuning.cc``, Ring/LL128 column: NVLink 1.9 us, PCI 2.5 us,
  NET 4.0 us); ethernet/loopback figures are labelled assumptions.
* Efficiency: ``eff_max`` is the measured "Maximum Achievable Matmul FLOPS" (bf16, stas00/
  ml-engineering, table cited below) divided by peak, applied to every dtype (an assumption
  for tf32/fp32, stated in notes). ``flops_half`` is set from a fixed per-kernel time
  ``t0`` (:data:`GPU_KERNEL_T0_S`): flops_half = t0 x peak x eff_max (see device.py).
  Figures that are assumptions say so in ``Provenance.notes``; ``autopar profile``
  replaces them with measurements on the machine at hand.
"""
from __future__ import annotations

from typing import Callable

from .cluster import LinkSpec
from .device import DTYPES, DeviceSpec, Provenance

GiB = 1024 ** 3
GB = 1e9

#: Sources used more than once.
_MAMF_URL = ("https://github.com/stas00/ml-engineering/blob/master/compute/accelerator/README.md"
             "#maximum-achievable-matmul-flops-comparison-table")
_NCCL_TUNING_URL = ("https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc "
                    "(hwLat table, Ring/LL128; read at commit 01afd20a)")
_H100_URL = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_A100_URL = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
             "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
_H200_URL = "https://www.nvidia.com/en-us/data-center/h200/"
_GH200_URL = "https://resources.nvidia.com/en-us-grace-cpu/grace-hopper-superchip"
_GRACE_URL = "https://resources.nvidia.com/en-us-grace-cpu/data-center-datasheet"
_DGX_H100_URL = "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html"
_DGX_A100_URL = "https://docs.nvidia.com/dgx/dgxa100-user-guide/introduction-to-dgxa100.html"

#: Fixed per-kernel time that sets flops_half for catalog GPUs: cuBLAS GEMM launch + tail
#: (wave quantisation) of a few microseconds. Assumption (order of magnitude of CUDA launch
#: latency); measured per machine by ``autopar profile``.
GPU_KERNEL_T0_S = 4e-6
#: Same for a whole CPU socket: fork/join of the BLAS thread pool plus packing, ~20 us.
CPU_KERNEL_T0_S = 20e-6
_ASSUMED_EFF_NOTE = ("eff_max from the bf16 MAMF measurement, applied to all dtypes (assumption); "
                     "flops_half = t0 x peak x eff_max with t0 = {t0:g} s (assumption)")


def _curve(peak: dict[str, float], eff: float, t0: float) -> tuple[dict, dict]:
    return ({d: eff for d in DTYPES}, {d: t0 * peak[d] * eff for d in DTYPES})


def _gpu(name: str, arch: str, peak: dict, mem: int, bw: float, host_link: str, host_bw: float,
         host_mem: int, eff: float, sms: int, prov: Provenance) -> DeviceSpec:
    eff_max, half = _curve(peak, eff, GPU_KERNEL_T0_S)
    return DeviceSpec(name=name, kind="gpu", arch=arch, peak_flops=peak, memory_bytes=mem,
                      memory_bandwidth=bw, host_link=host_link, host_link_bandwidth=host_bw,
                      host_memory_bytes=host_mem, matmul_eff_max=eff_max, matmul_flops_half=half,
                      # STREAM-like kernels reach ~90% of HBM peak (BabelStream on A100/H100 class
                      # parts); assumption, measured by `autopar profile`.
                      memory_bw_efficiency=0.9,
                      # CUDA launch (~2-4 us) + PyTorch eager dispatch; assumption.
                      op_overhead_s=5e-6, cores=sms, provenance=prov)


def _cpu(name: str, arch: str, cores: int, ghz: float, fp32_per_cycle: int, bf16_mult: float,
         fp16_mult: float, mem: int, bw: float, prov: Provenance) -> DeviceSpec:
    fp32 = cores * ghz * 1e9 * fp32_per_cycle
    peak = {"fp32": fp32, "tf32": fp32, "bf16": fp32 * bf16_mult, "fp16": fp32 * fp16_mult}
    # Large SGEMM in vendor BLAS (oneDNN / Arm PL) runs at ~80% of vector peak: assumption.
    eff_max, half = _curve(peak, 0.8, CPU_KERNEL_T0_S)
    return DeviceSpec(name=name, kind="cpu", arch=arch, peak_flops=peak, memory_bytes=mem,
                      memory_bandwidth=bw, host_link="none", host_link_bandwidth=0.0,
                      host_memory_bytes=0, matmul_eff_max=eff_max, matmul_flops_half=half,
                      # STREAM triad reaches ~75-85% of DDR peak on server sockets: assumption.
                      memory_bw_efficiency=0.8,
                      op_overhead_s=2e-6,  # PyTorch eager CPU dispatch, a few us: assumption
                      cores=cores, provenance=prov)


# ----------------------------------------------------------------------------- devices

def a100_80gb_sxm() -> DeviceSpec:
    """NVIDIA A100 80GB SXM4: 19.5 / 156 / 312 / 312 TFLOPS (fp32/tf32/bf16/fp16 dense),
    80 GB HBM2e at 2,039 GB/s, PCIe Gen4 x16; DGX A100: 2 TB host memory for 8 GPUs."""
    peak = {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}
    return _gpu("a100-80gb-sxm", "sm80", peak, 80 * GiB, 2039 * GB, "pcie4", 31.5 * GB,
                2048 * GiB // 8, eff=267.9 / 312, sms=108,
                prov=Provenance(source=_A100_URL, date="2021-06",
                                notes=f"MAMF 267.9 TFLOPS bf16 ({_MAMF_URL}); host memory: DGX A100 "
                                      f"2 TB / 8 GPUs ({_DGX_A100_URL}); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def h100_sxm() -> DeviceSpec:
    """NVIDIA H100 SXM5 80GB: 67 TFLOPS fp32, 494.7 tf32, 989.4 bf16/fp16 dense (datasheet
    1,979 with sparsity), 3.35 TB/s HBM3, PCIe Gen5 x16 (datasheet "128 GB/s" bidirectional; 63 GB/s/dir after 128b/130b coding)."""
    peak = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
    return _gpu("h100-sxm", "sm90", peak, 80 * GiB, 3350 * GB, "pcie5", 63 * GB,
                2048 * GiB // 8, eff=792.1 / 989.4, sms=132,
                prov=Provenance(source=_H100_URL, date="2023-07",
                                notes=f"MAMF 792.1 TFLOPS bf16 ({_MAMF_URL}); host memory: DGX H100 "
                                      f"2 TB / 8 GPUs ({_DGX_H100_URL}); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def h200() -> DeviceSpec:
    """NVIDIA H200 SXM: H100 compute, 141 GB HBM3e at 4.8 TB/s, PCIe Gen5."""
    peak = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
    return _gpu("h200", "sm90", peak, 141 * 10 ** 9, 4800 * GB, "pcie5", 63 * GB,
                2048 * GiB // 8, eff=794.5 / 989.4, sms=132,
                prov=Provenance(source=_H200_URL, date="2024-11",
                                notes=f"MAMF 794.5 TFLOPS bf16 for H100/H200 SXM ({_MAMF_URL}); host "
                                      "memory: DGX H200 2 TB / 8 GPUs; "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def gh200() -> DeviceSpec:
    """NVIDIA GH200 Grace Hopper (96 GB HBM3 version): H100 compute, 4 TB/s HBM3, Grace with
    480 GB LPDDR5X as host memory over NVLink-C2C at 900 GB/s total (450 GB/s/dir)."""
    peak = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
    return _gpu("gh200", "sm90", peak, 96 * 10 ** 9, 4000 * GB, "nvlink-c2c", 450 * GB,
                480 * 10 ** 9, eff=821.0 / 989.4, sms=132,
                prov=Provenance(source=_GH200_URL, date="2023-11",
                                notes=f"MAMF 821.0 TFLOPS bf16 for GH200 ({_MAMF_URL}); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def graviton3() -> DeviceSpec:
    """AWS Graviton3: 64 Neoverse V1 cores at 2.6 GHz, 2x256-bit SVE FMA pipes = 32 fp32
    FLOP/cycle/core -> 5.3 TFLOPS fp32; BFDOT/FP16 FMLA pack 2 products per fp32 lane -> 2x.
    8 channels DDR5-4800 = 307 GB/s. Socket memory: m7g.16xlarge, 256 GiB."""
    return _cpu("graviton3", "aarch64", 64, 2.6, 32, 2.0, 2.0, 256 * GiB, 307.2 * GB,
                Provenance(source="https://aws.amazon.com/ec2/instance-types/m7g/", date="2022-05",
                           notes="cores/clock/DDR5 from AWS Graviton3 launch material; V1 SIMD "
                                 "width from https://developer.arm.com/Processors/Neoverse%20V1; "
                                 "peak derived, eff_max=0.8 and t0=20us assumptions"))


def graviton4() -> DeviceSpec:
    """AWS Graviton4: 96 Neoverse V2 cores at 2.8 GHz, 4x128-bit SVE2 FMA pipes = 32 fp32
    FLOP/cycle/core -> 8.6 TFLOPS fp32; bf16/fp16 2x. 12 channels DDR5-5600 = 537.6 GB/s.
    Socket memory: m8g.24xlarge (one socket), 384 GiB."""
    return _cpu("graviton4", "aarch64", 96, 2.8, 32, 2.0, 2.0, 384 * GiB, 537.6 * GB,
                Provenance(source="https://aws.amazon.com/ec2/instance-types/m8g/", date="2024-07",
                           notes="V2 core layout: https://chipsandcheese.com/2024/07/22/"
                                 "arms-neoverse-v2-in-awss-graviton-4/; peak derived, eff_max=0.8 "
                                 "and t0=20us assumptions"))


def grace() -> DeviceSpec:
    """NVIDIA Grace CPU (one of the two in a Grace CPU Superchip): 72 Neoverse V2 cores; the
    superchip datasheet gives 7.1 TFLOPS FP64 for 144 cores -> 7.1 TFLOPS fp32 per Grace
    (2x FP64 rate); 480 GB LPDDR5X at up to 500 GB/s per Grace."""
    # 7.1e12 fp32 = 72 cores x 3.08 GHz x 32 FLOP/cycle.
    return _cpu("grace", "aarch64", 72, 3.08, 32, 2.0, 2.0, 480 * 10 ** 9, 500 * GB,
                Provenance(source=_GRACE_URL, date="2023-03",
                           notes="peak from datasheet FP64 figure x2; eff_max=0.8 and t0=20us "
                                 "assumptions"))


def x86_server() -> DeviceSpec:
    """Generic x86 server socket, modelled on AMD EPYC 9654 (Zen 4): 96 cores at 2.4 GHz,
    AVX-512 on 2x256-bit FMA pipes = 32 fp32 FLOP/cycle/core -> 7.4 TFLOPS fp32;
    AVX512_BF16 (VDPBF16PS) 2x; no native fp16 math (fp16 = fp32 rate).
    12 channels DDR5-4800 = 460.8 GB/s; 768 GiB per socket."""
    return _cpu("x86-server", "x86_64", 96, 2.4, 32, 2.0, 1.0, 768 * GiB, 460.8 * GB,
                Provenance(source="https://www.amd.com/en/products/processors/server/epyc/"
                                  "4th-generation-9004-and-8004-series/amd-epyc-9654.html",
                           date="2022-11",
                           notes="peak derived from core count, base clock and Zen 4 FMA width; "
                                 "eff_max=0.8 and t0=20us assumptions"))


# ----------------------------------------------------------------------------- links

def _nccl_link(name: str, bw: float, lat: float, source: str, date: str, notes: str) -> LinkSpec:
    return LinkSpec(name=name, bandwidth=bw, latency=lat,
                    provenance=Provenance(source=source, date=date,
                                          notes=notes + f"; latency = NCCL per-step hwLat ({_NCCL_TUNING_URL})"))


def nvlink4() -> LinkSpec:
    """H100 NVLink 4 through NVSwitch: 18 links, 900 GB/s total = 450 GB/s per direction."""
    return _nccl_link("nvlink4", 450 * GB, 1.9e-6, _H100_URL, "2023-07", "900 GB/s bidirectional")


def nvlink3() -> LinkSpec:
    """A100 NVLink 3: 12 links, 600 GB/s total = 300 GB/s per direction."""
    return _nccl_link("nvlink3", 300 * GB, 1.9e-6, _A100_URL, "2021-06", "600 GB/s bidirectional")


def nvlink_c2c() -> LinkSpec:
    """GH200 NVLink-C2C between Grace and Hopper: 900 GB/s total = 450 GB/s per direction."""
    return _nccl_link("nvlink-c2c", 450 * GB, 1.9e-6, _GH200_URL, "2023-11", "900 GB/s bidirectional")


def pcie4() -> LinkSpec:
    """PCIe 4.0 x16: 16 GT/s x 16 lanes x 128/130 = 31.5 GB/s per direction."""
    return _nccl_link("pcie4", 31.5 * GB, 2.5e-6, "https://pcisig.com/specifications", "2017-10",
                      "PCI-SIG PCIe 4.0 base spec signalling rate")


def pcie5() -> LinkSpec:
    """PCIe 5.0 x16: 32 GT/s x 16 lanes x 128/130 = 63 GB/s per direction."""
    return _nccl_link("pcie5", 63 * GB, 2.5e-6, "https://pcisig.com/specifications", "2019-05",
                      "PCI-SIG PCIe 5.0 base spec signalling rate")


def ib_ndr() -> LinkSpec:
    """InfiniBand NDR, one 400 Gb/s ConnectX-7 port per GPU (DGX H100/H200): 50 GB/s/dir."""
    return _nccl_link("ib-ndr", 50 * GB, 4.0e-6, _DGX_H100_URL, "2023-07",
                      "8x 400 Gb/s NDR ConnectX-7, one per GPU")


def ib_hdr() -> LinkSpec:
    """InfiniBand HDR, one 200 Gb/s ConnectX-6 port per GPU (DGX A100): 25 GB/s/dir."""
    return _nccl_link("ib-hdr", 25 * GB, 4.0e-6, _DGX_A100_URL, "2021-06",
                      "8x 200 Gb/s HDR ConnectX-6, one per GPU")


def ethernet_efa_200g() -> LinkSpec:
    """AWS EFA on 200 Gb/s Ethernet (c7gn/c8gn class Graviton instances): 25 GB/s/dir.
    Latency 15 us: assumption for SRD/libfabric small messages (TCP is 2-3x slower)."""
    return LinkSpec(name="ethernet-efa-200g", bandwidth=25 * GB, latency=15e-6,
                    provenance=Provenance(source="https://aws.amazon.com/ec2/instance-types/c7g/",
                                          date="2023-06",
                                          notes="c7gn: up to 200 Gbps with EFA; latency assumed"))


def ethernet_100g() -> LinkSpec:
    """100 GbE with TCP between generic x86 servers: 12.5 GB/s/dir; latency 25 us assumed
    (kernel TCP stack round trip / 2 on a datacenter network)."""
    return LinkSpec(name="ethernet-100g", bandwidth=12.5 * GB, latency=25e-6,
                    provenance=Provenance(source="IEEE 802.3ba-2010 (100GBASE)", date="2010-06",
                                          notes="latency is an assumption"))


def local_shm() -> LinkSpec:
    """Processes on one host (gloo over loopback TCP / shared memory): placeholder figures,
    2 GB/s and 50 us, to be replaced by ``autopar profile`` measurements."""
    return LinkSpec(name="local-shm", bandwidth=2 * GB, latency=50e-6,
                    provenance=Provenance(source="catalog fallback; run `autopar profile`",
                                          date="2026-11-22",
                                          notes="assumed gloo loopback figures, not measured"))


# ----------------------------------------------------------------------------- kinds

#: Name used in cluster strings -> (device factory, devices per node, intra-node link,
#: inter-node link). GPUs come 8 to a node (DGX/HGX), CPUs one socket per node; GH200 one
#: superchip per node (MGX single-superchip server).
KINDS: dict[str, tuple[Callable[[], DeviceSpec], int, Callable[[], LinkSpec], Callable[[], LinkSpec]]] = {
    "a100": (a100_80gb_sxm, 8, nvlink3, ib_hdr),
    "h100": (h100_sxm, 8, nvlink4, ib_ndr),
    "h200": (h200, 8, nvlink4, ib_ndr),
    "gh200": (gh200, 1, nvlink4, ib_ndr),
    "graviton3": (graviton3, 1, local_shm, ethernet_efa_200g),
    "graviton4": (graviton4, 1, local_shm, ethernet_efa_200g),
    "grace": (grace, 1, local_shm, ib_ndr),
    "x86": (x86_server, 1, local_shm, ethernet_100g),
}

DEVICES: dict[str, Callable[[], DeviceSpec]] = {
    "a100-80gb-sxm": a100_80gb_sxm, "h100-sxm": h100_sxm, "h200": h200, "gh200": gh200,
    "graviton3": graviton3, "graviton4": graviton4, "grace": grace, "x86-server": x86_server,
}

LINKS: dict[str, Callable[[], LinkSpec]] = {
    "nvlink4": nvlink4, "nvlink3": nvlink3, "nvlink-c2c": nvlink_c2c, "pcie4": pcie4,
    "pcie5": pcie5, "ib-ndr": ib_ndr, "ib-hdr": ib_hdr, "ethernet-efa-200g": ethernet_efa_200g,
    "ethernet-100g": ethernet_100g, "local-shm": local_shm,
}


def device(name: str) -> DeviceSpec:
    """A catalog device by its name (``"h100-sxm"``) or cluster kind (``"h100"``)."""
    if name in DEVICES:
        return DEVICES[name]()
    if name in KINDS:
        return KINDS[name][0]()
    raise ValueError(f"unknown device {name!r}: known devices {sorted(DEVICES)}, kinds {sorted(KINDS)}")


def link(name: str) -> LinkSpec:
    """A catalog link by name (``"ib-ndr"``)."""
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}: known links {sorted(LINKS)}")
    return LINKS[name]()
