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
* Efficiency: ``eff_max`` is the measured "Maximum Achievable Matmul FLOPS" (bf16, v2 table of
  stas00/ml-engineering, cited below) divided by peak, applied to every dtype (an assumption
  for tf32/fp32, stated in notes). ``flops_half`` is set from a fixed per-kernel time
  ``t0`` (:data:`GPU_KERNEL_T0_S`): flops_half = t0 x peak x eff_max (see device.py).
  Figures that are assumptions say so in ``Provenance.notes``; ``autopar profile``
  replaces them with measurements on the machine at hand.

Sources
-------
Every figure was checked (2026-11-22) against stored copies of public pages; ``source`` is
the page the figure was actually read from, ``date`` that page's date or version where it
gives one. Figures no source confirmed say ``unverified: ...`` in their notes. The vendor
PDFs themselves (A100/H100/GH200/Grace datasheets) were not readable; where a page
reproduces a datasheet table, the page is cited and the PDF named in the notes.
"""
from __future__ import annotations

from typing import Callable

from .cluster import LinkSpec
from .device import DTYPES, DeviceSpec, Provenance

GiB = 1024 ** 3
GB = 1e9

#: Date the stored copies below were read; used where a page carries no date of its own.
_READ = "undated page, read 2026-11-22"

#: Sources used more than once.
#: MAMF v2 table (cache reset between runs): A100 SXM 271.2, GH200 828.6 ("900W 141GB HBM3e
#: version"), H100 SXM 794.5 TFLOPS bf16. The same file keeps an older v1 table (A100 267.9,
#: GH200 821.0, H100 792.1) "that will get removed"; we use v2. A later revision of the
#: table notes "H200 is the same" on the H100 row.
_MAMF_URL = ("https://github.com/stas00/ml-engineering/blob/b9e29720eebd4aa946fa9678975385efbc90a777/"
             "compute/accelerator/README.md#maximum-achievable-matmul-flops-comparison-table")
_MAMF_DATE = "commit b9e29720 (v2 bf16 table)"
_NCCL_TUNING_URL = ("https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc "
                    "(hwLat table, Ring/LL128; read at commit 01afd20a; same values in later "
                    "releases' tuning model)")
#: Reproduces the A100 datasheet (r4 PDF, linked from the page): 19.5 fp32 / 156 tf32 /
#: 312 bf16,fp16 dense TFLOPS (624 with sparsity); 32+32 GB/s PCIe Gen4; 300+300 GB/s NVLink.
_A100_URL = "https://glennklockwood.com/garden/processors/A100"
_A100_PDF = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
             "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
#: A100 SXM 80GB memory bandwidth 2,039 GB/s (spec table).
_A100_BW_URL = "https://www.thundercompute.com/blog/nvidia-a100-specs-full-guide"
#: H100 SXM5 dense peaks from the Hopper whitepaper: fp32 66.9, tf32 494.7, bf16/fp16 989.4
#: TFLOPS; 132 SMs; 900 GB/s NVLink; 128 GB/s PCIe Gen5.
_H100_URL = "https://glennklockwood.com/garden/processors/h100"
#: Reproduces the H100 datasheet table: FP32 67 TFLOPS, BF16 1,979 TFLOPS* (*with sparsity,
#: "1/2 lower without"), 3,350 GB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
_H100_DS_URL = "https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html"
#: DGX H100/H200: 2 TB DDR5 system memory, eight single-port ConnectX-7 at up to 400 Gb/s.
_DGX_H_URL = ("https://docs.nvidia.com/dgx-basepod/reference-architecture-infrastructure-"
              "foundation-enterprise-ai/latest/core-components.html")
#: NVIDIA's DGX A100 spec table (as copied into site docs): 8x single-port ConnectX-6 VPI
#: 200 Gb/s HDR InfiniBand, NVSwitch GPU-to-GPU 600 GB/s, 1 TB system memory (320 GB model).
_DGX_A100_URL = "https://www.nvidia.com/en-us/data-center/dgx-a100/"
_GRACE_GUIDE_URL = "https://github.com/NVIDIA/grace-cpu-benchmarking-guide"

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
    80 GB HBM2e at 2,039 GB/s, PCIe Gen4 x16; DGX A100 640GB: 2 TB host memory for 8 GPUs."""
    peak = {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}
    return _gpu("a100-80gb-sxm", "sm80", peak, 80 * GiB, 2039 * GB, "pcie4", 31.5 * GB,
                2048 * GiB // 8, eff=271.2 / 312, sms=108,
                prov=Provenance(source=_A100_URL, date=_READ,
                                notes=f"peaks, NVLink and PCIe rates as reproduced from the A100 "
                                      f"datasheet r4 ({_A100_PDF}, PDF itself not read); 2,039 GB/s "
                                      f"for the 80GB SXM from {_A100_BW_URL}; MAMF 271.2 TFLOPS bf16 "
                                      f"({_MAMF_URL}, {_MAMF_DATE}); host memory: unverified: DGX A100 "
                                      f"640GB = 2 TB / 8 GPUs (the stored DGX A100 spec, {_DGX_A100_URL}, "
                                      f"is the 320GB model with 1 TB; 'up to 2 TB' per press reports); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def h100_sxm() -> DeviceSpec:
    """NVIDIA H100 SXM5 80GB: 67 TFLOPS fp32, 494.7 tf32, 989.4 bf16/fp16 dense (datasheet
    1,979 with sparsity), 3.35 TB/s HBM3, PCIe Gen5 x16 (datasheet "128 GB/s" bidirectional;
    63 GB/s/dir after 128b/130b coding)."""
    peak = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
    return _gpu("h100-sxm", "sm90", peak, 80 * GiB, 3350 * GB, "pcie5", 63 * GB,
                2048 * GiB // 8, eff=794.5 / 989.4, sms=132,
                prov=Provenance(source=_H100_URL, date=_READ,
                                notes=f"dense tensor peaks from the Hopper whitepaper table on the "
                                      f"source page; fp32 67 TFLOPS, 3,350 GB/s, PCIe Gen5 128 GB/s "
                                      f"from the datasheet table reproduced at {_H100_DS_URL}; MAMF "
                                      f"794.5 TFLOPS bf16 ({_MAMF_URL}, {_MAMF_DATE}); host memory: "
                                      f"DGX H100 2 TB DDR5 / 8 GPUs ({_DGX_H_URL}); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def h200() -> DeviceSpec:
    """NVIDIA H200 SXM: H100 compute, 141 GB HBM3e at 4.8 TB/s, PCIe Gen5."""
    peak = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
    return _gpu("h200", "sm90", peak, 141 * 10 ** 9, 4800 * GB, "pcie5", 63 * GB,
                2048 * GiB // 8, eff=794.5 / 989.4, sms=132,
                prov=Provenance(source=_MAMF_URL, date=_MAMF_DATE,
                                notes="141 GB HBM3e at 4.80 TB/s and peaks equal to H100 SXM (67 fp32, "
                                      "494.5 tf32, 989 bf16/fp16 dense) from the TFLOPS and memory "
                                      "tables of the source; 141 GB / 4.8 TB/s also in AnandTech's "
                                      "SC23 table (http://m.anandtech.com/Show/Index/21136, 2023-11); "
                                      "PCIe Gen5 x16 per the MLPerf v4.1 H200-SXM-141GB system file "
                                      "(github.com/mlcommons/inference_results_v4.1); eff_max is the "
                                      "H100 SXM MAMF 794.5 (no H200 bf16 row at this commit; a later "
                                      f"revision says 'H200 is the same'); host memory: DGX H200 2 TB "
                                      f"DDR5 / 8 GPUs ({_DGX_H_URL}); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def gh200() -> DeviceSpec:
    """NVIDIA GH200 Grace Hopper (96 GB HBM3 version): H100 compute, 4 TB/s HBM3, Grace with
    480 GB LPDDR5X as host memory over NVLink-C2C at 900 GB/s total (450 GB/s/dir)."""
    peak = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12}
    return _gpu("gh200", "sm90", peak, 96 * 10 ** 9, 4000 * GB, "nvlink-c2c", 450 * GB,
                480 * 10 ** 9, eff=828.6 / 989.4, sms=132,
                prov=Provenance(source=_MAMF_URL, date=_MAMF_DATE,
                                notes="96 GB HBM3 at 4.00 TB/s ('GH200 SXM (1)') and 132 SMs from the "
                                      "memory and cache tables of the source; 480 GB LPDDR5X and "
                                      "NVLink-C2C 900 GB/s bidirectional from NVIDIA's Grace CPU "
                                      "Superchip architecture post (https://developer.nvidia.com/blog/"
                                      "nvidia-grace-cpu-superchip-architecture-in-depth/) and "
                                      "https://spheron.network/blog/nvidia-gh200-guide (2026-01-25); "
                                      "unverified: peak FLOPs (GH200 datasheet not read; H100 SXM "
                                      "figures assumed, same GH100 die and SM count); MAMF 828.6 TFLOPS "
                                      "bf16 was measured on the 900W 141GB HBM3e GH200, applied to this "
                                      "96GB variant (assumption); "
                                      + _ASSUMED_EFF_NOTE.format(t0=GPU_KERNEL_T0_S)))


def graviton3() -> DeviceSpec:
    """AWS Graviton3: 64 Neoverse V1 cores at 2.6 GHz, 2x256-bit SVE FMA pipes = 32 fp32
    FLOP/cycle/core -> 5.3 TFLOPS fp32; BFDOT/FP16 FMLA pack 2 products per fp32 lane -> 2x.
    8 channels DDR5-4800 = 307.2 GB/s. Socket memory: m7g.16xlarge, 256 GiB."""
    return _cpu("graviton3", "aarch64", 64, 2.6, 32, 2.0, 2.0, 256 * GiB, 307.2 * GB,
                Provenance(source="https://en.wikichip.org/wiki/AWS_Graviton3",
                           date=_READ + " (same figures in the 2023-12-12 revision, oldid=102074)",
                           notes="64 cores, 2,600 MHz, Neoverse V1, octa-channel DDR5-4800 = 307.2 "
                                 "GB/s from the source; 2.6 GHz, 256-bit SVE and ~300 GB/s also in "
                                 "https://techpowerup.com/295203/ (2022-05-24); m7g.16xlarge = 64 vCPU "
                                 "/ 256 GiB per third-party instance listings (AWS page not read); "
                                 "2 SVE pipes per V1 core is Arm's published layout (not re-read); "
                                 "unverified: bf16/fp16 = 2x fp32 (BFDOT / FP16 FMLA lane packing; "
                                 "BFMMLA may give more); peak derived, eff_max=0.8 and t0=20us "
                                 "assumptions"))


def graviton4() -> DeviceSpec:
    """AWS Graviton4: 96 Neoverse V2 cores at 2.8 GHz, 4x128-bit SVE2 FMA pipes = 32 fp32
    FLOP/cycle/core -> 8.6 TFLOPS fp32; bf16/fp16 2x. 12 channels DDR5-5600 = 537.6 GB/s.
    Socket memory: m8g.24xlarge (one socket), 384 GiB."""
    return _cpu("graviton4", "aarch64", 96, 2.8, 32, 2.0, 2.0, 384 * GiB, 537.6 * GB,
                Provenance(source="https://nextplatform.com/2024/09/19/aws-boosts-memory-capacity-on-"
                                  "graviton-4-compute",
                           date="2024-09-19",
                           notes="96 Neoverse V2 cores at 2.8 GHz, DDR5-5600 from the source; 12 "
                                 "DDR5-5600 channels from AWS's DevitoPRO case study (https://aws."
                                 "amazon.com/blogs/hpc/performance-gains-with-aws-graviton4-a-"
                                 "devitopro-case-study/, 2024-10) -> 12 x 5600 MT/s x 8 B = 537.6 GB/s "
                                 "(AnandTech's headline says 536.7, apparently transposed); four 128-bit "
                                 "SIMD units per V2 core (https://uniexeterrse.github.io/gw4-isambard-3-"
                                 "practical-workshop-2026/, 2026-04-21; NVIDIA's Grace FMA page: 16 "
                                 "FP64 FLOP/cycle); "
                                 "unverified: m8g.24xlarge memory 384 GiB (4 GiB/vCPU M-family ratio; "
                                 "not found in stored sources) and bf16/fp16 = 2x; peak derived, "
                                 "eff_max=0.8 and t0=20us assumptions"))


def grace() -> DeviceSpec:
    """NVIDIA Grace CPU (one of the two in a 960 GB Grace CPU Superchip): 72 Neoverse V2 cores;
    the superchip spec gives 7.1 TFLOPS FP64 for 144 cores -> 7.1 TFLOPS fp32 per Grace
    (2x FP64 rate); 480 GB LPDDR5X per Grace, which NVIDIA rates at 768 GB/s for the 960 GB
    superchip = 384 GB/s per Grace (the 512 GB/s-per-Grace figure is for 240/480 GB superchips)."""
    # 7.1e12 fp32 = 72 cores x 3.08 GHz x 32 FLOP/cycle.
    return _cpu("grace", "aarch64", 72, 3.08, 32, 2.0, 2.0, 480 * 10 ** 9, 384 * GB,
                Provenance(source=_GRACE_GUIDE_URL + "/blob/main/src/foundations/STREAM/index.md",
                           date="commit 34749280",
                           notes="memory bandwidth: NVIDIA spec as quoted from docs.nvidia.com/dccpu/"
                                 "grace-perf-tuning-guide: 240/480 GB superchip up to 1,024 GB/s, 960 "
                                 "GB superchip up to 768 GB/s; consistent with the source's STREAM "
                                 "triad table (Grace Hopper 480 GB: 288-342 GB/s, stated as 80-95% of "
                                 "peak; Grace CPU 480 GB superchip: 820-972 GB/s); 16 FP64 FLOP/cycle "
                                 "per core from the guide's FMA page (src/foundations/FMA/index.md, "
                                 "which measures 3.33 GHz nominal, i.e. 7.7 TFLOPS fp32 peak at that "
                                 "clock); FP64 peak 7.1 TFLOPS per 144-core superchip from NVIDIA's "
                                 "spec table as reproduced at https://hardwaretimes.com/nvidia-announces-"
                                 "grace-cpu-up-2x-faster-than-amd-epyc-and-intel-xeon-parts-with-better-"
                                 "power-efficiency/; unverified: bf16/fp16 = 2x fp32; eff_max=0.8 and "
                                 "t0=20us assumptions"))


def x86_server() -> DeviceSpec:
    """Generic x86 server socket, modelled on AMD EPYC 9654 (Zen 4): 96 cores at 2.4 GHz,
    AVX-512 on 2x256-bit FMA pipes = 32 fp32 FLOP/cycle/core -> 7.4 TFLOPS fp32;
    AVX512_BF16 (VDPBF16PS) 2x; no native fp16 math (fp16 = fp32 rate).
    12 channels DDR5-4800 = 460.8 GB/s; 768 GiB per socket."""
    return _cpu("x86-server", "x86_64", 96, 2.4, 32, 2.0, 1.0, 768 * GiB, 460.8 * GB,
                Provenance(source="https://llmperf.net/categories/cpu/AMD-EPYC-9000-Genoa-Turin-CPUs",
                           date=_READ,
                           notes="96 cores, 2.40 GHz base (TechPowerUp figures quoted by the source); "
                                 "12 DDR5 channels -> 460.8 GB/s at DDR5-4800 (https://www.tomshardware"
                                 ".fr/epyc-genoa-la-prise-en-charge-de-12-canaux-de-memoire-ddr5-"
                                 "confirmee/, 2021-12); Zen 4 runs 512-bit ops on 256-bit hardware "
                                 "(http://numberworld.org/blogs/2024_8_7_zen5_avx512_teardown); AMD's "
                                 "product page (https://www.amd.com/en/products/processors/server/epyc/"
                                 "4th-generation-9004-and-8004-series/amd-epyc-9654.html) not read; "
                                 "unverified: 768 GiB per socket (12 x 64 GiB DIMMs, a configuration "
                                 "choice) and bf16 = 2x fp32; peak derived, eff_max=0.8 and t0=20us "
                                 "assumptions"))


# ----------------------------------------------------------------------------- links

def _nccl_link(name: str, bw: float, lat: float, source: str, date: str, notes: str) -> LinkSpec:
    return LinkSpec(name=name, bandwidth=bw, latency=lat,
                    provenance=Provenance(source=source, date=date,
                                          notes=notes + f"; latency = NCCL per-step hwLat ({_NCCL_TUNING_URL})"))


def nvlink4() -> LinkSpec:
    """H100 NVLink 4 through NVSwitch: 18 links, 900 GB/s total = 450 GB/s per direction."""
    return _nccl_link("nvlink4", 450 * GB, 1.9e-6, _H100_URL, _READ,
                      "900 GB/s NVLink (also '18x 4th Gen NVLink, 900GB/s' in MLPerf v4.1 "
                      "H200-SXM-141GB system file)")


def nvlink3() -> LinkSpec:
    """A100 NVLink 3: 12 links, 600 GB/s total = 300 GB/s per direction."""
    return _nccl_link("nvlink3", 300 * GB, 1.9e-6, _A100_URL, _READ,
                      f"300+300 GB/s NVLink (D2D); NVSwitch GPU-to-GPU 600 GB/s in the DGX A100 spec "
                      f"({_DGX_A100_URL})")


def nvlink_c2c() -> LinkSpec:
    """GH200 NVLink-C2C between Grace and Hopper: 900 GB/s total = 450 GB/s per direction."""
    return _nccl_link("nvlink-c2c", 450 * GB, 1.9e-6,
                      "https://developer.nvidia.com/blog/nvidia-grace-cpu-superchip-architecture-in-depth/",
                      _READ, "NVLink-C2C: 900 GB/s bidirectional bandwidth with another Grace CPU "
                             "or the Hopper GPU; NVLink-class hwLat assumed for C2C")


def pcie4() -> LinkSpec:
    """PCIe 4.0 x16: 16 GT/s x 16 lanes x 128/130 = 31.5 GB/s per direction."""
    return _nccl_link("pcie4", 31.5 * GB, 2.5e-6, "https://pcisig.com/specifications", "2017-10",
                      "PCI-SIG PCIe 4.0 base spec v1.0 (2017-10-05): 16 GT/s, 128b/130b, ~31.5 "
                      "GB/s per direction for x16 (spec itself not read; rate and date as quoted by "
                      "third-party summaries)")


def pcie5() -> LinkSpec:
    """PCIe 5.0 x16: 32 GT/s x 16 lanes x 128/130 = 63 GB/s per direction."""
    return _nccl_link("pcie5", 63 * GB, 2.5e-6, "https://pcisig.com/specifications", "2019-05",
                      "PCI-SIG PCIe 5.0 release (2019-05): 32 GT/s, 'up to 128 GB/s via x16' "
                      "bidirectional (https://firmwaresecurity.com/2019/05/31/pcie-5-0-spec-released/)")


def ib_ndr() -> LinkSpec:
    """InfiniBand NDR, one 400 Gb/s ConnectX-7 port per GPU (DGX H100/H200): 50 GB/s/dir."""
    return _nccl_link("ib-ndr", 50 * GB, 4.0e-6, _DGX_H_URL, _READ,
                      "DGX H100/H200: eight single-port ConnectX-7 VPI, up to 400 Gb/s InfiniBand")


def ib_hdr() -> LinkSpec:
    """InfiniBand HDR, one 200 Gb/s ConnectX-6 port per GPU (DGX A100): 25 GB/s/dir."""
    return _nccl_link("ib-hdr", 25 * GB, 4.0e-6, _DGX_A100_URL, _READ,
                      "DGX A100: 8x single-port Mellanox ConnectX-6 VPI 200Gb/s HDR InfiniBand "
                      "(spec table as copied into site docs; nvidia.com page not read)")


def ethernet_efa_200g() -> LinkSpec:
    """AWS EFA on 200 Gb/s Ethernet (c7gn/c8gn class Graviton instances): 25 GB/s/dir.
    Latency 15 us: assumption for SRD/libfabric small messages (TCP is 2-3x slower)."""
    return LinkSpec(name="ethernet-efa-200g", bandwidth=25 * GB, latency=15e-6,
                    provenance=Provenance(
                        source="https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/"
                               "ec2-instance-network-bandwidth.html",
                        date=_READ,
                        notes="instance bandwidth applies to inbound and, simultaneously, outbound "
                              "traffic (source), so 200 Gbps = 25 GB/s per direction; c7gn.16xlarge "
                              "/ hpc7g.16xlarge / c8gn.16xlarge: 200 Gbps with EFA per EC2 "
                              "instance-type listings (AWS c7g page not read); latency 15 us is an "
                              "assumption, not sourced"))


def ethernet_100g() -> LinkSpec:
    """100 GbE with TCP between generic x86 servers: 12.5 GB/s/dir; latency 25 us assumed
    (kernel TCP stack round trip / 2 on a datacenter network)."""
    return LinkSpec(name="ethernet-100g", bandwidth=12.5 * GB, latency=25e-6,
                    provenance=Provenance(source="IEEE 802.3ba-2010 (100GBASE)", date="2010-06",
                                          notes="100 Gb/s is the standard's nominal full-duplex MAC "
                                                "rate (standard not re-read); latency is an assumption"))


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
