#include <dlfcn.h>
#include <napi.h>

#include "aligned.h"
#include "backing.h"
#include "nbd_attach.h"
#include "sys.h"
#include "ublk.h"

namespace {
// Never unmap this library: a worker_thread's environment unloads its addons
// at exit, but uv_close callbacks of our poll handles (and an ioctl worker
// detached from a hung device) may still run addon code after that.
void PinLibrary() {
  static bool pinned = false;
  if (pinned) return;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&PinLibrary), &info) != 0 && info.dli_fname != nullptr) {
    if (dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE) != nullptr) pinned = true;
  }
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  PinLibrary();
  exports.Set("allocAligned", Napi::Function::New(env, dmr::AllocAligned, "allocAligned"));
  dmr::NativeBacking::Init(env, exports);
  dmr::InitSys(env, exports);
  dmr::InitNbdAttach(env, exports);
  dmr::InitUblk(env, exports);
  return exports;
}
}  // namespace

NODE_API_MODULE(dm_remapd, Init)
