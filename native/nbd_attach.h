#pragma once
#include <napi.h>

namespace dmr {
// Registers nbdSocketPair, nbdCloseFd, nbdNetlinkConnect/Disconnect and
// nbdIoctlConnect/Disconnect on `exports` (native/nbd_attach.cc).
void InitNbdAttach(Napi::Env env, Napi::Object exports);
}  // namespace dmr
