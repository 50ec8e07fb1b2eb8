// Kernel NBD attach: hands one end of a unix socketpair (served by the
// daemon's NBD transmission code, no handshake) to the kernel's NBD client
// and configures /dev/nbdN, through generic netlink (NBD_CMD_CONNECT) or the
// legacy ioctls (NBD_SET_SOCK ... NBD_DO_IT on a dedicated thread).
// Nothing throws: every function returns a negative errno on failure.
#include "nbd_attach.h"

#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <linux/netlink.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "unique_fd.h"

namespace dmr {
namespace {

// ---------------------------------------------------------------- netlink

// A generic netlink message under construction (attributes appended in place).
class NlMsg {
 public:
  NlMsg(uint16_t type, uint16_t flags, uint8_t cmd, uint8_t version) {
    buf_.resize(NLMSG_HDRLEN + GENL_HDRLEN, 0);
    auto* nh = reinterpret_cast<nlmsghdr*>(buf_.data());
    nh->nlmsg_type = type;
    nh->nlmsg_flags = flags;
    nh->nlmsg_seq = 1;
    auto* gh = reinterpret_cast<genlmsghdr*>(buf_.data() + NLMSG_HDRLEN);
    gh->cmd = cmd;
    gh->version = version;
  }
  void Put(uint16_t type, const void* data, size_t len) {
    size_t off = buf_.size();
    buf_.resize(off + NLA_ALIGN(NLA_HDRLEN + len), 0);
    auto* a = reinterpret_cast<nlattr*>(buf_.data() + off);
    a->nla_type = type;
    a->nla_len = static_cast<uint16_t>(NLA_HDRLEN + len);
    if (len > 0) std::memcpy(buf_.data() + off + NLA_HDRLEN, data, len);
  }
  void PutU32(uint16_t type, uint32_t v) { Put(type, &v, sizeof(v)); }
  void PutU64(uint16_t type, uint64_t v) { Put(type, &v, sizeof(v)); }
  void PutStr(uint16_t type, const char* s) { Put(type, s, std::strlen(s) + 1); }
  size_t Begin(uint16_t type) {
    size_t off = buf_.size();
    Put(static_cast<uint16_t>(type | NLA_F_NESTED), nullptr, 0);
    return off;
  }
  void End(size_t off) {
    reinterpret_cast<nlattr*>(buf_.data() + off)->nla_len = static_cast<uint16_t>(buf_.size() - off);
  }
  std::vector<char>& Finish() {
    reinterpret_cast<nlmsghdr*>(buf_.data())->nlmsg_len = static_cast<uint32_t>(buf_.size());
    return buf_;
  }

 private:
  std::vector<char> buf_;
};

// Sends `msg` and reads the answers until the ACK (or an error). `onMsg` sees
// each generic netlink payload's attributes. Returns 0 or -errno.
template <typename F>
int Transact(int fd, std::vector<char>& msg, F onMsg) {
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  ssize_t n;
  do {
    n = sendto(fd, msg.data(), msg.size(), 0, reinterpret_cast<sockaddr*>(&kernel), sizeof(kernel));
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  std::vector<char> buf(32768);
  for (;;) {
    do {
      n = recv(fd, buf.data(), buf.size(), 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN ? -ETIMEDOUT : -errno;
    int len = static_cast<int>(n);
    for (auto* nh = reinterpret_cast<nlmsghdr*>(buf.data()); NLMSG_OK(nh, len); nh = NLMSG_NEXT(nh, len)) {
      if (nh->nlmsg_type == NLMSG_ERROR) {
        auto* err = static_cast<nlmsgerr*>(NLMSG_DATA(nh));
        return err->error;  // 0 is the ACK
      }
      if (nh->nlmsg_type == NLMSG_DONE) return 0;
      if (nh->nlmsg_len < NLMSG_HDRLEN + GENL_HDRLEN) continue;
      char* p = reinterpret_cast<char*>(NLMSG_DATA(nh)) + GENL_HDRLEN;
      int rem = static_cast<int>(nh->nlmsg_len - NLMSG_HDRLEN - GENL_HDRLEN);
      while (rem >= static_cast<int>(NLA_HDRLEN)) {
        auto* a = reinterpret_cast<nlattr*>(p);
        if (a->nla_len < NLA_HDRLEN || a->nla_len > rem) break;
        onMsg(a->nla_type & NLA_TYPE_MASK, p + NLA_HDRLEN, a->nla_len - NLA_HDRLEN);
        int step = NLA_ALIGN(a->nla_len);
        p += step;
        rem -= step;
      }
    }
  }
}

// A generic netlink socket with a receive timeout, and the id of family "nbd".
int OpenNbdFamily(UniqueFd& fd, uint16_t& family) {
  fd.reset(socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC));
  if (!fd.valid()) return -errno;
  timeval tv{10, 0};
  setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_nl local{};
  local.nl_family = AF_NETLINK;
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&local), sizeof(local)) != 0) return -errno;
  NlMsg m(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, CTRL_CMD_GETFAMILY, 1);
  m.PutStr(CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
  int id = -1;
  int r = Transact(fd.get(), m.Finish(), [&](int type, const char* data, int len) {
    if (type == CTRL_ATTR_FAMILY_ID && len >= 2) {
      uint16_t v;
      std::memcpy(&v, data, sizeof(v));
      id = v;
    }
  });
  if (r < 0) return r;  // ENOENT: the nbd module is not loaded
  if (id < 0) return -ENOENT;
  family = static_cast<uint16_t>(id);
  return 0;
}

// nbdNetlinkConnect(index (-1: any free), sockFd, sizeBytes, blockSize,
// serverFlags, timeoutSec (0: none)) -> the device index, or -errno.
Napi::Value NetlinkConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 6) return Napi::Number::New(env, -EINVAL);
  for (size_t i = 0; i < 6; i++) {
    if (!info[i].IsNumber()) return Napi::Number::New(env, -EINVAL);
  }
  int64_t index = info[0].As<Napi::Number>().Int64Value();
  int sock = info[1].As<Napi::Number>().Int32Value();
  int64_t size = info[2].As<Napi::Number>().Int64Value();
  int64_t bs = info[3].As<Napi::Number>().Int64Value();
  int64_t flags = info[4].As<Napi::Number>().Int64Value();
  int64_t timeout = info[5].As<Napi::Number>().Int64Value();
  if (sock < 0 || size <= 0 || bs <= 0 || flags < 0 || timeout < 0) return Napi::Number::New(env, -EINVAL);
  UniqueFd nl;
  uint16_t family = 0;
  int r = OpenNbdFamily(nl, family);
  if (r < 0) return Napi::Number::New(env, r);
  NlMsg m(family, NLM_F_REQUEST | NLM_F_ACK, NBD_CMD_CONNECT, NBD_GENL_VERSION);
  if (index >= 0) m.PutU32(NBD_ATTR_INDEX, static_cast<uint32_t>(index));
  m.PutU64(NBD_ATTR_SIZE_BYTES, static_cast<uint64_t>(size));
  m.PutU64(NBD_ATTR_BLOCK_SIZE_BYTES, static_cast<uint64_t>(bs));
  m.PutU64(NBD_ATTR_SERVER_FLAGS, static_cast<uint64_t>(flags));
  if (timeout > 0) m.PutU64(NBD_ATTR_TIMEOUT, static_cast<uint64_t>(timeout));
  size_t socks = m.Begin(NBD_ATTR_SOCKETS);
  size_t item = m.Begin(NBD_SOCK_ITEM);
  m.PutU32(NBD_SOCK_FD, static_cast<uint32_t>(sock));
  m.End(item);
  m.End(socks);
  int64_t got = -1;
  r = Transact(nl.get(), m.Finish(), [&](int type, const char* data, int len) {
    if (type == NBD_ATTR_INDEX && len >= 4) {
      uint32_t v;
      std::memcpy(&v, data, sizeof(v));
      got = v;
    }
  });
  if (r < 0) return Napi::Number::New(env, r);
  if (got < 0) got = index;  // kernels that send no reply: the index we asked for
  return Napi::Number::New(env, got < 0 ? -EPROTO : static_cast<double>(got));
}

// nbdNetlinkDisconnect(index) -> 0 or -errno.
Napi::Value NetlinkDisconnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) return Napi::Number::New(env, -EINVAL);
  int64_t index = info[0].As<Napi::Number>().Int64Value();
  if (index < 0) return Napi::Number::New(env, -EINVAL);
  UniqueFd nl;
  uint16_t family = 0;
  int r = OpenNbdFamily(nl, family);
  if (r < 0) return Napi::Number::New(env, r);
  NlMsg m(family, NLM_F_REQUEST | NLM_F_ACK, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
  m.PutU32(NBD_ATTR_INDEX, static_cast<uint32_t>(index));
  r = Transact(nl.get(), m.Finish(), [](int, const char*, int) {});
  return Napi::Number::New(env, r);
}

// ---------------------------------------------------------------- ioctl

// One device attached with the ioctls: NBD_DO_IT blocks its own thread until
// the device is disconnected.
struct IoctlSession {
  UniqueFd dev;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int result = 0;
};

std::mutex g_sessions_mu;
std::map<int, std::shared_ptr<IoctlSession>> g_sessions;

int IoctlArg(int fd, unsigned long req, unsigned long arg) {
  int r;
  do {
    r = ioctl(fd, req, arg);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? -errno : 0;
}

// nbdIoctlConnect(index, sockFd, sizeBytes, blockSize, serverFlags, timeoutSec)
// -> 0 or -errno. The index must be given (the caller picks a free device).
Napi::Value IoctlConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 6) return Napi::Number::New(env, -EINVAL);
  for (size_t i = 0; i < 6; i++) {
    if (!info[i].IsNumber()) return Napi::Number::New(env, -EINVAL);
  }
  int index = info[0].As<Napi::Number>().Int32Value();
  int sock = info[1].As<Napi::Number>().Int32Value();
  int64_t size = info[2].As<Napi::Number>().Int64Value();
  int64_t bs = info[3].As<Napi::Number>().Int64Value();
  int64_t flags = info[4].As<Napi::Number>().Int64Value();
  int64_t timeout = info[5].As<Napi::Number>().Int64Value();
  if (index < 0 || sock < 0 || size <= 0 || bs <= 0 || size % bs != 0 || flags < 0 || timeout < 0) {
    return Napi::Number::New(env, -EINVAL);
  }
  {
    std::lock_guard<std::mutex> g(g_sessions_mu);
    if (g_sessions.count(index) != 0) return Napi::Number::New(env, -EBUSY);
  }
  auto s = std::make_shared<IoctlSession>();
  std::string path = "/dev/nbd" + std::to_string(index);
  s->dev.reset(open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!s->dev.valid()) return Napi::Number::New(env, -errno);
  int fd = s->dev.get();
  int r = IoctlArg(fd, NBD_SET_BLKSIZE, static_cast<unsigned long>(bs));
  if (r == 0) r = IoctlArg(fd, NBD_SET_SIZE_BLOCKS, static_cast<unsigned long>(size / bs));
  if (r == 0) r = IoctlArg(fd, NBD_SET_FLAGS, static_cast<unsigned long>(flags));
  if (r == 0 && timeout > 0) r = IoctlArg(fd, NBD_SET_TIMEOUT, static_cast<unsigned long>(timeout));
  if (r == 0) r = IoctlArg(fd, NBD_SET_SOCK, static_cast<unsigned long>(sock));
  if (r < 0) {
    IoctlArg(fd, NBD_CLEAR_SOCK, 0);
    return Napi::Number::New(env, r);
  }
  {
    std::lock_guard<std::mutex> g(g_sessions_mu);
    g_sessions[index] = s;
  }
  std::thread([s, index]() {
    int rr = IoctlArg(s->dev.get(), NBD_DO_IT, 0);
    IoctlArg(s->dev.get(), NBD_CLEAR_QUE, 0);
    IoctlArg(s->dev.get(), NBD_CLEAR_SOCK, 0);
    {
      std::lock_guard<std::mutex> g(s->mu);
      s->done = true;
      s->result = rr;
    }
    s->cv.notify_all();
    std::lock_guard<std::mutex> g(g_sessions_mu);
    auto it = g_sessions.find(index);
    if (it != g_sessions.end() && it->second == s) g_sessions.erase(it);
  }).detach();
  return Napi::Number::New(env, 0);
}

// nbdIoctlDisconnect(index, waitMs) -> 0 when NBD_DO_IT returned within
// waitMs, -ETIMEDOUT when it has not (yet), -ENOENT for no session, or -errno.
Napi::Value IoctlDisconnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) return Napi::Number::New(env, -EINVAL);
  int index = info[0].As<Napi::Number>().Int32Value();
  int64_t waitMs = info[1].As<Napi::Number>().Int64Value();
  std::shared_ptr<IoctlSession> s;
  {
    std::lock_guard<std::mutex> g(g_sessions_mu);
    auto it = g_sessions.find(index);
    if (it == g_sessions.end()) return Napi::Number::New(env, -ENOENT);
    s = it->second;
  }
  int r = IoctlArg(s->dev.get(), NBD_DISCONNECT, 0);
  if (r < 0) return Napi::Number::New(env, r);
  std::unique_lock<std::mutex> lk(s->mu);
  bool ok = s->cv.wait_for(lk, std::chrono::milliseconds(waitMs < 0 ? 0 : waitMs), [&] { return s->done; });
  return Napi::Number::New(env, ok ? 0 : -ETIMEDOUT);
}

// nbdSocketPair() -> [fd, fd] (AF_UNIX stream, close-on-exec) or -errno.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return Napi::Number::New(env, -errno);
  Napi::Array a = Napi::Array::New(env, 2);
  a.Set(0u, Napi::Number::New(env, sv[0]));
  a.Set(1u, Napi::Number::New(env, sv[1]));
  return a;
}

// closeFd(fd) -> 0 or -errno.
Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) return Napi::Number::New(env, -EINVAL);
  int fd = info[0].As<Napi::Number>().Int32Value();
  if (fd < 0) return Napi::Number::New(env, -EBADF);
  return Napi::Number::New(env, close(fd) == 0 ? 0 : -errno);
}

}  // namespace

void InitNbdAttach(Napi::Env env, Napi::Object exports) {
  exports.Set("nbdSocketPair", Napi::Function::New(env, SocketPair, "nbdSocketPair"));
  exports.Set("nbdCloseFd", Napi::Function::New(env, CloseFd, "nbdCloseFd"));
  exports.Set("nbdNetlinkConnect", Napi::Function::New(env, NetlinkConnect, "nbdNetlinkConnect"));
  exports.Set("nbdNetlinkDisconnect", Napi::Function::New(env, NetlinkDisconnect, "nbdNetlinkDisconnect"));
  exports.Set("nbdIoctlConnect", Napi::Function::New(env, IoctlConnect, "nbdIoctlConnect"));
  exports.Set("nbdIoctlDisconnect", Napi::Function::New(env, IoctlDisconnect, "nbdIoctlDisconnect"));
}

}  // namespace dmr
