#pragma once
#include <napi.h>

namespace dmr {
Napi::Value AllocAligned(const Napi::CallbackInfo& info);
}
