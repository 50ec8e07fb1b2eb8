#pragma once
#include <napi.h>

namespace dmr {
// Registers peerCredentials, sdNotify and blockDeviceSize on `exports`.
void InitSys(Napi::Env env, Napi::Object exports);
}  // namespace dmr
