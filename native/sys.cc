// Small system calls Node does not offer: peer credentials of a unix socket
// (SO_PEERCRED + SO_PEERGROUPS), sd_notify (a datagram to $NOTIFY_SOCKET),
// and the size of a block device (BLKGETSIZE64). None throws: errors come
// back as negative errnos (or false for sdNotify).
#include "sys.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif

namespace dmr {

// peerCredentials(fd) -> { pid, uid, gid, groups: number[] } or -errno.
Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) return Napi::Number::New(env, -EINVAL);
  int fd = info[0].As<Napi::Number>().Int32Value();
  if (fd < 0) return Napi::Number::New(env, -EBADF);
  struct ucred cred;
  socklen_t len = sizeof(cred);
  std::memset(&cred, 0, sizeof(cred));
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return Napi::Number::New(env, -errno);
  if (len != sizeof(cred)) return Napi::Number::New(env, -EPROTO);
  Napi::Object out = Napi::Object::New(env);
  out.Set("pid", Napi::Number::New(env, cred.pid));
  out.Set("uid", Napi::Number::New(env, cred.uid));
  out.Set("gid", Napi::Number::New(env, cred.gid));
  // Supplementary groups of the peer at connect() time (Linux 4.13+).
  std::vector<gid_t> groups(64);
  for (int tries = 0; tries < 4; tries++) {
    socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
      groups.resize(glen / sizeof(gid_t));
      break;
    }
    if (errno == ERANGE && glen > groups.size() * sizeof(gid_t)) {
      groups.resize(glen / sizeof(gid_t) + 1);
      continue;
    }
    groups.clear();  // not supported: only the primary gid counts
    break;
  }
  Napi::Array arr = Napi::Array::New(env, groups.size());
  for (size_t i = 0; i < groups.size(); i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, groups[i]));
  out.Set("groups", arr);
  return out;
}

// sdNotify(state[, socketPath]) -> true when a datagram was sent; false when
// there is no $NOTIFY_SOCKET or sending failed. '@' starts an abstract name.
Napi::Value SdNotify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) return Napi::Boolean::New(env, false);
  std::string state = info[0].As<Napi::String>().Utf8Value();
  std::string path;
  if (info.Length() >= 2 && info[1].IsString()) {
    path = info[1].As<Napi::String>().Utf8Value();
  } else {
    const char* p = getenv("NOTIFY_SOCKET");
    if (p == nullptr) return Napi::Boolean::New(env, false);
    path = p;
  }
  if (path.empty() || (path[0] != '/' && path[0] != '@')) return Napi::Boolean::New(env, false);
  struct sockaddr_un addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return Napi::Boolean::New(env, false);
  std::memcpy(addr.sun_path, path.data(), path.size());
  socklen_t alen = static_cast<socklen_t>(offsetof(struct sockaddr_un, sun_path) + path.size());
  if (path[0] == '@') {
    addr.sun_path[0] = '\0';  // abstract namespace: no trailing NUL counted
  } else {
    alen += 1;
  }
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Napi::Boolean::New(env, false);
  ssize_t n;
  do {
    n = sendto(fd, state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<struct sockaddr*>(&addr), alen);
  } while (n < 0 && errno == EINTR);
  close(fd);
  return Napi::Boolean::New(env, n == static_cast<ssize_t>(state.size()));
}

// blockDeviceSize(path) -> size in bytes (BLKGETSIZE64, or st_size for a
// regular file), or -errno.
Napi::Value BlockDeviceSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) return Napi::Number::New(env, -EINVAL);
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Napi::Number::New(env, -errno);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return Napi::Number::New(env, -e);
  }
  double size;
  if (S_ISBLK(st.st_mode)) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
      int e = errno;
      close(fd);
      return Napi::Number::New(env, -e);
    }
    size = static_cast<double>(bytes);
  } else {
    size = static_cast<double>(st.st_size);
  }
  close(fd);
  return Napi::Number::New(env, size);
}

// exitNow(code): _exit(2) at once. No atexit handlers run, so a write that
// blocks in libuv's thread pool (whose threads exit() joins) cannot hold the
// process. The daemon uses it only after its devices are closed.
Napi::Value ExitNow(const Napi::CallbackInfo& info) {
  int code = info.Length() >= 1 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1;
  _exit(code);
}

void InitSys(Napi::Env env, Napi::Object exports) {
  exports.Set("exitNow", Napi::Function::New(env, ExitNow, "exitNow"));
  exports.Set("peerCredentials", Napi::Function::New(env, PeerCredentials, "peerCredentials"));
  exports.Set("sdNotify", Napi::Function::New(env, SdNotify, "sdNotify"));
  exports.Set("blockDeviceSize", Napi::Function::New(env, BlockDeviceSize, "blockDeviceSize"));
}

}  // namespace dmr
