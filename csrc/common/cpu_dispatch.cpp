#include "common/cpu_dispatch.h"

#include <atomic>
#include <cstdlib>

namespace samsvae {
namespace cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::string(isa) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::string(isa) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(isa) == "baseline";
}

const CpuKernels* by_name(const std::string& name) {
  if (name == "avx512") return cpu_has("avx512") ? kernels_avx512() : nullptr;
  if (name == "avx2") return cpu_has("avx2") ? kernels_avx2() : nullptr;
  if (name == "baseline") return kernels_baseline();
  return nullptr;
}

const CpuKernels* widest() {
  for (const char* n : {"avx512", "avx2"})
    if (const CpuKernels* k = by_name(n)) return k;
  return kernels_baseline();
}

std::atomic<const CpuKernels*> g_active{nullptr};

const CpuKernels* initial() {
  const char* env = std::getenv("SAMSVAE_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::string(env) != "auto")
    if (const CpuKernels* k = by_name(env)) return k;  // unknown/unsupported: ignore
  return widest();
}

}  // namespace

const CpuKernels& active_kernels() {
  const CpuKernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = initial();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* n : {"avx512", "avx2", "baseline"})
    if (by_name(n) != nullptr) out.emplace_back(n);
  return out;
}

std::string set_cpu_isa(const std::string& name) {
  const CpuKernels* k = name == "auto" ? widest() : by_name(name);
  if (k == nullptr) {
    std::string have;
    for (const std::string& s : supported_isas()) have += (have.empty() ? "" : ", ") + s;
    return "ISA '" + name + "' is not available on this CPU/build; choose one of: auto, " + have;
  }
  g_active.store(k, std::memory_order_release);
  return "";
}

}  // namespace cpu
}  // namespace samsvae
