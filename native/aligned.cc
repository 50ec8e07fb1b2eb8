// allocAligned(size, alignment): a Buffer over posix_memalign'd memory,
// freed by the Buffer's finalizer. Returns a negative errno on failure.
#include "aligned.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace dmr {

namespace {
// Touches no env: at a worker_thread's teardown this may run while the env is
// being destroyed. (V8 accounts external backing stores by itself.)
void FreeAligned(Napi::Env /*env*/, uint8_t* data) { std::free(data); }
}  // namespace

Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) {
    return Napi::Number::New(env, -EINVAL);
  }
  double dsize = info[0].As<Napi::Number>().DoubleValue();
  double dalign = info[1].As<Napi::Number>().DoubleValue();
  if (!(dsize >= 0) || dsize > 1.0 * (1ULL << 40) || !(dalign >= sizeof(void*)) || dalign > (1 << 30)) {
    return Napi::Number::New(env, -EINVAL);
  }
  size_t size = static_cast<size_t>(dsize);
  size_t align = static_cast<size_t>(dalign);
  if ((align & (align - 1)) != 0) return Napi::Number::New(env, -EINVAL);
  void* p = nullptr;
  // posix_memalign(0) may return NULL; always allocate at least one byte.
  int rc = posix_memalign(&p, align, size == 0 ? 1 : size);
  if (rc != 0 || p == nullptr) return Napi::Number::New(env, -(rc != 0 ? rc : ENOMEM));
  std::memset(p, 0, size == 0 ? 1 : size);
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(p), size, FreeAligned);
}

}  // namespace dmr
