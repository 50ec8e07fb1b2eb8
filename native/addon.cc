#include <napi.h>

#include "aligned.h"
#include "backing.h"

namespace {
Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("allocAligned", Napi::Function::New(env, dmr::AllocAligned, "allocAligned"));
  dmr::NativeBacking::Init(env, exports);
  return exports;
}
}  // namespace

NODE_API_MODULE(dm_remapd, Init)
