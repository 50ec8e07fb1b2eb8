// NativeUblk: ublk control thread, queue threads and the JS batch hand-off.
// See ublk.h and docs/UBLK.md. Every method returns a negative errno instead
// of throwing.
#include "ublk.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <chrono>

#include "ublk_uapi.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

namespace dmr {
namespace {

constexpr uint64_t kWakeUserData = UINT64_MAX;
// user_data of a fast-path backing I/O: flag | epoch parity << 16 | tag.
constexpr uint64_t kFastFlag = 1ULL << 62;

// The signal that interrupts a control command stuck past its timeout
// (START_DEV and DEL_DEV wait interruptibly in the kernel).
int CtrlTimeoutSignal() { return SIGRTMIN + 4; }

void NoopHandler(int) {}

void InstallTimeoutHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = NoopHandler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the blocked syscall returns EINTR
    sigaction(CtrlTimeoutSignal(), &sa, nullptr);
  });
}

void ClearEventFd(int fd) {
  uint64_t v;
  ssize_t n = read(fd, &v, sizeof v);
  (void)n;
}

void WriteEventFd(int fd) {
  uint64_t one = 1;
  ssize_t n;
  do {
    n = write(fd, &one, sizeof one);
  } while (n < 0 && errno == EINTR);
}

// ------------------------------------------------------------ control thread

struct CtrlRing {
  io_uring ring;
  bool init = false;
  uint64_t seq = 0;
  timer_t timer;
  bool timerInit = false;
};

// One control command with a bounded time: a per-thread timer signal
// interrupts a command that blocks in the kernel (START_DEV, DEL_DEV), and
// the CQE wait itself is bounded. -ETIMEDOUT when the time ran out.
int CtrlCmd(UblkShared& s, CtrlRing& cr, unsigned legacyOp, unsigned ioctlOp, struct ublksrv_ctrl_cmd& c,
            int timeoutMs) {
  io_uring_sqe* sqe = io_uring_get_sqe(&cr.ring);
  if (sqe == nullptr) return -EBUSY;
  memset(sqe, 0, 128);  // SQE128 ring
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = s.ctrlFd.get();
  sqe->cmd_op = s.useIoctl ? ioctlOp : legacyOp;
  memcpy(sqe->cmd, &c, sizeof c);
  uint64_t seq = ++cr.seq;
  sqe->user_data = seq;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeoutMs);
  if (cr.timerInit) {
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = timeoutMs / 1000;
    its.it_value.tv_nsec = static_cast<long>(timeoutMs % 1000) * 1000000L;
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    timer_settime(cr.timer, 0, &its, nullptr);
  }
  auto disarm = [&] {
    if (!cr.timerInit) return;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    timer_settime(cr.timer, 0, &its, nullptr);
  };
  int ret = io_uring_submit(&cr.ring);
  if (ret < 0 && ret != -EINTR) {
    disarm();
    return ret;
  }
  for (;;) {
    auto now = std::chrono::steady_clock::now();
    bool late = now >= deadline;
    long long leftNs = late ? 0 : std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - now).count();
    struct __kernel_timespec ts;
    ts.tv_sec = leftNs / 1000000000LL;
    ts.tv_nsec = leftNs % 1000000000LL;
    io_uring_cqe* cqe = nullptr;
    ret = io_uring_wait_cqe_timeout(&cr.ring, &cqe, &ts);
    if (ret == -EINTR) continue;
    if (ret == -ETIME) {
      disarm();
      return -ETIMEDOUT;
    }
    if (ret < 0) {
      disarm();
      return ret;
    }
    uint64_t ud = cqe->user_data;
    int res = cqe->res;
    io_uring_cqe_seen(&cr.ring, cqe);
    if (ud != seq) continue;  // a late answer to a command that timed out
    disarm();
    if (res == -EINTR && std::chrono::steady_clock::now() >= deadline) return -ETIMEDOUT;
    return res;
  }
}

struct ublksrv_ctrl_cmd CmdFor(uint32_t devId) {
  struct ublksrv_ctrl_cmd c;
  memset(&c, 0, sizeof c);
  c.dev_id = devId;
  c.queue_id = static_cast<uint16_t>(-1);
  return c;
}

int JoinQueues(UblkShared& s, int timeoutMs) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeoutMs);
  int res = 0;
  for (auto& q : s.queues) {
    q->stop = true;
    if (q->wakeFd.valid()) WriteEventFd(q->wakeFd.get());
  }
  for (auto& q : s.queues) {
    if (!q->th.joinable()) continue;
    std::unique_lock<std::mutex> lock(q->mu);
    bool ok = q->cv.wait_until(lock, deadline, [&] { return q->exited.load(); });
    lock.unlock();
    if (ok) {
      q->th.join();
    } else {
      q->th.detach();  // stuck: it keeps the shared state alive by itself
      res = -ETIMEDOUT;
    }
  }
  if (res == 0) {
    for (auto& q : s.queues) {
      if (q->iods != nullptr) munmap(q->iods, q->iodLen);
      q->iods = nullptr;
    }
    s.cdevFd.reset();  // DEL_DEV waits until /dev/ublkcN is closed
    s.fast.fd.reset();
  }
  return res;
}

void RunCtrlJob(UblkShared& s, CtrlRing& cr, const UblkCtrlJob& j, UblkCtrlResult& r) {
  struct ublksrv_ctrl_cmd c = CmdFor(j.devId);
  int t = j.timeoutMs;
  switch (j.op) {
    case kUblkFeatures: {
      uint64_t feat = 0;
      c.dev_id = static_cast<uint32_t>(-1);
      c.addr = reinterpret_cast<uint64_t>(&feat);
      c.len = sizeof feat;
      bool prev = s.useIoctl;
      s.useIoctl = true;  // GET_FEATURES exists only ioctl-encoded (6.5+)
      r.res = CtrlCmd(s, cr, 0x13, UBLK_U_CMD_GET_FEATURES, c, t);
      if (r.res >= 0) {
        s.useIoctl = (feat & UBLK_F_CMD_IOCTL_ENCODE) != 0;
        r.out[0] = static_cast<double>(feat & ((1ULL << 52) - 1));
        r.res = 0;
      } else {
        s.useIoctl = prev;
      }
      r.out[1] = s.useIoctl ? 1 : 0;
      return;
    }
    case kUblkAdd: {
      struct ublksrv_ctrl_dev_info di;
      memset(&di, 0, sizeof di);
      di.nr_hw_queues = static_cast<uint16_t>(j.p[0]);
      di.queue_depth = static_cast<uint16_t>(j.p[1]);
      di.max_io_buf_bytes = static_cast<uint32_t>(j.p[2]);
      di.dev_id = static_cast<uint32_t>(-1);
      di.flags = static_cast<uint64_t>(j.p[3]);
      c.dev_id = static_cast<uint32_t>(-1);
      c.addr = reinterpret_cast<uint64_t>(&di);
      c.len = sizeof di;
      r.res = CtrlCmd(s, cr, UBLK_CMD_ADD_DEV, UBLK_U_CMD_ADD_DEV, c, t);
      if (r.res >= 0) {
        r.res = 0;
        s.devId = di.dev_id;
        r.out[0] = di.dev_id;
        r.out[1] = di.nr_hw_queues;
        r.out[2] = di.queue_depth;
        r.out[3] = di.max_io_buf_bytes;
        r.out[4] = static_cast<double>(di.flags & ((1ULL << 52) - 1));
      }
      return;
    }
    case kUblkSetParams: {
      struct ublk_params p;
      memset(&p, 0, sizeof p);
      p.len = sizeof p;
      p.types = UBLK_PARAM_TYPE_BASIC;
      p.basic.attrs = static_cast<uint32_t>(j.p[0]);
      p.basic.logical_bs_shift = static_cast<uint8_t>(j.p[1]);
      p.basic.physical_bs_shift = static_cast<uint8_t>(j.p[2]);
      p.basic.io_opt_shift = static_cast<uint8_t>(j.p[2]);
      p.basic.io_min_shift = static_cast<uint8_t>(j.p[1]);
      p.basic.max_sectors = static_cast<uint32_t>(j.p[3]);
      p.basic.dev_sectors = static_cast<uint64_t>(j.p[4]);
      if (j.p[5] > 0 || j.p[6] > 0) {
        p.types |= UBLK_PARAM_TYPE_DISCARD;
        p.discard.discard_granularity = static_cast<uint32_t>(j.p[7]);
        p.discard.max_discard_sectors = static_cast<uint32_t>(j.p[5]);
        p.discard.max_write_zeroes_sectors = static_cast<uint32_t>(j.p[6]);
        p.discard.max_discard_segments = 1;
      }
      c.addr = reinterpret_cast<uint64_t>(&p);
      c.len = sizeof p;
      r.res = CtrlCmd(s, cr, UBLK_CMD_SET_PARAMS, UBLK_U_CMD_SET_PARAMS, c, t);
      if (r.res > 0) r.res = 0;
      return;
    }
    case kUblkStart:
      c.data[0] = static_cast<uint64_t>(getpid());
      r.res = CtrlCmd(s, cr, UBLK_CMD_START_DEV, UBLK_U_CMD_START_DEV, c, t);
      return;
    case kUblkStop:
      r.res = CtrlCmd(s, cr, UBLK_CMD_STOP_DEV, UBLK_U_CMD_STOP_DEV, c, t);
      return;
    case kUblkDel:
      r.res = CtrlCmd(s, cr, UBLK_CMD_DEL_DEV, UBLK_U_CMD_DEL_DEV, c, t);
      return;
    case kUblkJoinQueues:
      r.res = JoinQueues(s, t);
      return;
    case kUblkGetInfo: {
      struct ublksrv_ctrl_dev_info di;
      memset(&di, 0, sizeof di);
      c.addr = reinterpret_cast<uint64_t>(&di);
      c.len = sizeof di;
      r.res = CtrlCmd(s, cr, UBLK_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_DEV_INFO, c, t);
      if (r.res >= 0) {
        r.res = 0;
        r.out[0] = di.dev_id;
        r.out[1] = di.state;
        r.out[2] = di.ublksrv_pid;
        r.out[3] = static_cast<double>(di.flags & ((1ULL << 52) - 1));
        r.out[4] = di.nr_hw_queues;
        r.out[5] = di.queue_depth;
        r.out[6] = di.max_io_buf_bytes;
      }
      return;
    }
    // Crash recovery (USER_RECOVERY): START is refused (-EBUSY) until the
    // old server's /dev/ublkcN is released and the device is QUIESCED; END
    // waits until every tag has a FETCH_REQ of the new queue threads, then
    // unquiesces the device (requeued requests are reissued).
    case kUblkStartRecovery:
      r.res = CtrlCmd(s, cr, UBLK_CMD_START_USER_RECOVERY, UBLK_U_CMD_START_USER_RECOVERY, c, t);
      return;
    case kUblkEndRecovery:
      c.data[0] = static_cast<uint64_t>(getpid());
      r.res = CtrlCmd(s, cr, UBLK_CMD_END_USER_RECOVERY, UBLK_U_CMD_END_USER_RECOVERY, c, t);
      return;
    default:
      r.res = -EINVAL;
  }
}

void CtrlThreadMain(std::shared_ptr<UblkShared> s, std::shared_ptr<CtrlRing> cr) {
  pthread_setname_np(pthread_self(), "ublk-ctrl");
  // Only this thread takes the timeout signal.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, CtrlTimeoutSignal());
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  struct sigevent sev;
  memset(&sev, 0, sizeof sev);
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = CtrlTimeoutSignal();
  sev._sigev_un._tid = static_cast<pid_t>(syscall(SYS_gettid));
  if (timer_create(CLOCK_MONOTONIC, &sev, &cr->timer) == 0) cr->timerInit = true;
  for (;;) {
    UblkCtrlJob job;
    {
      std::unique_lock<std::mutex> lock(s->mu);
      s->ctrlCv.wait(lock, [&] { return s->ctrlStop || !s->jobs.empty(); });
      if (s->jobs.empty()) break;
      job = s->jobs.front();
      s->jobs.pop_front();
    }
    UblkCtrlResult r;
    memset(&r, 0, sizeof r);
    r.seq = job.seq;
    RunCtrlJob(*s, *cr, job, r);
    {
      std::lock_guard<std::mutex> lock(s->mu);
      s->ctrlResults.push_back(r);
    }
    s->Notify();
  }
  if (cr->timerInit) timer_delete(cr->timer);
  if (cr->init) io_uring_queue_exit(&cr->ring);
  std::lock_guard<std::mutex> lock(s->mu);
  s->ctrlExited = true;
  s->ctrlExitCv.notify_all();
}

// ------------------------------------------------------------ queue threads

void PrepIoCmd(io_uring* ring, UblkShared& s, UblkQueue& q, bool commit, unsigned tag, int result) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring);
  if (sqe == nullptr) {
    io_uring_submit(ring);
    sqe = io_uring_get_sqe(ring);
  }
  memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = s.cdevFd.get();
  if (s.useIoctl) {
    sqe->cmd_op = commit ? UBLK_U_IO_COMMIT_AND_FETCH_REQ : UBLK_U_IO_FETCH_REQ;
  } else {
    sqe->cmd_op = commit ? UBLK_IO_COMMIT_AND_FETCH_REQ : UBLK_IO_FETCH_REQ;
  }
  auto* c = reinterpret_cast<struct ublksrv_io_cmd*>(sqe->cmd);
  c->q_id = static_cast<uint16_t>(q.qid);
  c->tag = static_cast<uint16_t>(tag);
  c->result = result;
  // USER_COPY: the address must be 0; data moves with pread/pwrite on the cdev.
  c->addr = s.userCopy ? 0 : reinterpret_cast<uint64_t>(q.buf + static_cast<size_t>(tag) * q.maxIo);
  sqe->user_data = tag;
}

void PrepWake(io_uring* ring, UblkQueue& q, uint64_t* slot) {
  io_uring_sqe* sqe = io_uring_get_sqe(ring);
  if (sqe == nullptr) {
    io_uring_submit(ring);
    sqe = io_uring_get_sqe(ring);
  }
  io_uring_prep_read(sqe, q.wakeFd.get(), slot, sizeof *slot, 0);
  sqe->user_data = kWakeUserData;
}

// The fast path (UblkFast in ublk.h): a READ, or a WRITE without FUA, of
// whole engine blocks inside the device, none of them marked slow, goes from
// this thread straight to main. It is counted in the epoch it was checked in
// until it completes, so that TS can mark blocks and then wait for every
// fast I/O that might have missed the mark. Returns false when the request
// must go to the engine.
bool TryFast(io_uring* ring, UblkShared& s, UblkQueue& q, unsigned tag, const struct ublksrv_io_desc* iod, uint8_t op,
             std::vector<uint32_t>& fastLen) {
  UblkFast& f = s.fast;
  if (f.bits == nullptr) return false;
  if (op != UBLK_IO_OP_READ && (op != UBLK_IO_OP_WRITE || (iod->op_flags & UBLK_IO_F_FUA) != 0)) return false;
  uint64_t off = iod->start_sector << 9;
  uint64_t len = static_cast<uint64_t>(iod->nr_sectors) << 9;
  uint64_t bmask = (1ULL << f.blockShift) - 1;
  if (len == 0 || len > q.maxIo || ((off | len) & bmask) != 0 || off + len > f.sizeBytes) return false;
  uint64_t e = f.epoch.load();
  unsigned par = static_cast<unsigned>(e & 1);
  q.fastInflight[par].fetch_add(1);
  bool ok = f.epoch.load() == e && (op == UBLK_IO_OP_READ ? f.reads.load() : f.writes.load());
  if (ok) {
    uint64_t c0 = (off >> f.blockShift) >> f.chunkShift;
    uint64_t c1 = ((off + len - 1) >> f.blockShift) >> f.chunkShift;
    for (uint64_t c = c0; c <= c1 && ok; ++c) {
      if ((f.bits[c >> 6].load() >> (c & 63)) & 1) ok = false;
    }
  }
  if (!ok) {
    q.fastInflight[par].fetch_sub(1);
    return false;
  }
  io_uring_sqe* sqe = io_uring_get_sqe(ring);
  if (sqe == nullptr) {
    io_uring_submit(ring);
    sqe = io_uring_get_sqe(ring);
  }
  uint8_t* buf = q.buf + static_cast<size_t>(tag) * q.maxIo;
  if (op == UBLK_IO_OP_READ) io_uring_prep_read(sqe, f.fd.get(), buf, static_cast<unsigned>(len), off);
  else io_uring_prep_write(sqe, f.fd.get(), buf, static_cast<unsigned>(len), off);
  sqe->user_data = kFastFlag | (static_cast<uint64_t>(par) << 16) | tag;
  fastLen[tag] = static_cast<uint32_t>(len);
  return true;
}

void QueueThreadMain(std::shared_ptr<UblkShared> sp, UblkQueue* qp) {
  UblkShared& s = *sp;
  UblkQueue& q = *qp;
  char name[16];
  snprintf(name, sizeof name, "ublk-q%u", q.qid);
  pthread_setname_np(pthread_self(), name);
  // The queue thread writes back dirty pages of its own device: let it dip
  // into reserves instead of deadlocking on memory reclaim (needs
  // CAP_SYS_RESOURCE; the result is reported in stats).
  q.ioFlusherErr = prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : -errno;

  io_uring ring;
  unsigned entries = 1;
  while (entries < q.depth * 2 + 2) entries <<= 1;
  // DM_REMAPD_UBLK_RING=plain: no COOP_TASKRUN/SINGLE_ISSUER (latency comparisons).
  const char* ringEnv = getenv("DM_REMAPD_UBLK_RING");
  bool plain = ringEnv != nullptr && strcmp(ringEnv, "plain") == 0;
  int rc = plain ? -EINVAL : io_uring_queue_init(entries, &ring, IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER);
  if (rc < 0) rc = io_uring_queue_init(entries, &ring, 0);
  if (rc < 0) {
    std::lock_guard<std::mutex> lock(q.mu);
    q.startErr = rc;
    q.ready = true;
    q.exited = true;
    q.cv.notify_all();
    return;
  }
  std::vector<uint8_t> tagOp(q.depth, 0);
  uint64_t wakeSlot = 0;
  for (unsigned tag = 0; tag < q.depth; ++tag) PrepIoCmd(&ring, s, q, false, tag, -1);
  PrepWake(&ring, q, &wakeSlot);
  rc = io_uring_submit(&ring);
  {
    std::lock_guard<std::mutex> lock(q.mu);
    q.startErr = rc < 0 ? rc : 0;
    q.ready = true;
    q.cv.notify_all();
  }
  unsigned live = rc < 0 ? 0 : q.depth;
  bool wakeArmed = rc >= 0;
  int idle = 0;
  std::vector<UblkIoItem> batch;
  std::vector<std::pair<uint16_t, int32_t>> done;
  std::vector<uint32_t> fastLen(q.depth, 0);
  batch.reserve(q.depth);
  auto itemOf = [&](unsigned tag) {
    const struct ublksrv_io_desc* iod = &q.iods[tag];
    UblkIoItem it;
    it.q = static_cast<uint16_t>(q.qid);
    it.tag = static_cast<uint16_t>(tag);
    it.opFlags = iod->op_flags;
    it.startSector = iod->start_sector;
    it.nrSectors = iod->nr_sectors;
    return it;
  };
  while (live > 0) {
    io_uring_cqe* cqe = nullptr;
    struct __kernel_timespec ts = {0, 100 * 1000 * 1000};
    rc = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, nullptr);
    if (rc == -ETIME || rc == -EINTR) {
      // After STOP_DEV the driver aborts the fetches; give it ~2 s, then the
      // ring's teardown cancels what is left.
      if (q.stop && ++idle > 20) break;
      continue;
    }
    if (rc < 0) break;
    unsigned head;
    unsigned seen = 0;
    bool woke = false;
    io_uring_for_each_cqe(&ring, head, cqe) {
      ++seen;
      if (cqe->user_data == kWakeUserData) {
        woke = true;
        wakeArmed = false;
        continue;
      }
      if ((cqe->user_data & kFastFlag) != 0) {
        // A fast-path backing I/O finished: answer it here, or hand the
        // request to the engine (which retries it and applies the error
        // policy) when it did not transfer everything.
        unsigned tag = static_cast<unsigned>(cqe->user_data & 0xffff);
        unsigned par = static_cast<unsigned>((cqe->user_data >> 16) & 1);
        int res = cqe->res;
        if (tag < q.depth) {
          uint32_t len = fastLen[tag];
          bool isRead = tagOp[tag] == UBLK_IO_OP_READ;
          if (res == static_cast<int>(len) && isRead && s.userCopy) {
            const uint8_t* src = q.buf + static_cast<size_t>(tag) * q.maxIo;
            ssize_t n = pwrite(s.cdevFd.get(), src, len, static_cast<off_t>(UblkUserCopyOffset(q.qid, tag)));
            if (n != static_cast<ssize_t>(len)) res = -EIO;
          }
          if (res == static_cast<int>(len)) {
            if (isRead) {
              q.fastReads.fetch_add(1, std::memory_order_relaxed);
              q.fastReadBytes.fetch_add(len, std::memory_order_relaxed);
            } else {
              q.fastWrites.fetch_add(1, std::memory_order_relaxed);
              q.fastWriteBytes.fetch_add(len, std::memory_order_relaxed);
            }
            s.committed.fetch_add(1, std::memory_order_relaxed);
            PrepIoCmd(&ring, s, q, true, tag, res);
          } else {
            q.fastFallbacks.fetch_add(1, std::memory_order_relaxed);
            batch.push_back(itemOf(tag));
          }
        }
        q.fastInflight[par].fetch_sub(1);
        continue;
      }
      unsigned tag = static_cast<unsigned>(cqe->user_data);
      if (cqe->res != UBLK_IO_RES_OK || tag >= q.depth) {
        // UBLK_IO_RES_ABORT (-ENODEV): the device is stopping; this tag is done.
        --live;
        continue;
      }
      const struct ublksrv_io_desc* iod = &q.iods[tag];
      UblkIoItem it = itemOf(tag);
      uint8_t op = static_cast<uint8_t>(iod->op_flags & 0xff);
      tagOp[tag] = op;
      s.fetched.fetch_add(1, std::memory_order_relaxed);
      size_t len = static_cast<size_t>(iod->nr_sectors) << 9;
      if ((op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE) && len > q.maxIo) {
        PrepIoCmd(&ring, s, q, true, tag, -EIO);
        continue;
      }
      if (op == UBLK_IO_OP_WRITE && s.userCopy) {
        uint8_t* dst = q.buf + static_cast<size_t>(tag) * q.maxIo;
        ssize_t n = pread(s.cdevFd.get(), dst, len, static_cast<off_t>(UblkUserCopyOffset(q.qid, tag)));
        if (n != static_cast<ssize_t>(len)) {
          PrepIoCmd(&ring, s, q, true, tag, n < 0 ? -errno : -EIO);
          continue;
        }
      }
      if (!q.stop && TryFast(&ring, s, q, tag, iod, op, fastLen)) continue;
      batch.push_back(it);
    }
    io_uring_cq_advance(&ring, seen);
    if (!batch.empty()) {
      {
        std::lock_guard<std::mutex> lock(s.mu);
        s.pending.insert(s.pending.end(), batch.begin(), batch.end());
      }
      batch.clear();
      s.Notify();
    }
    if (woke || q.stop) {
      {
        std::lock_guard<std::mutex> lock(q.mu);
        done.swap(q.done);
      }
      for (auto& d : done) {
        unsigned tag = d.first;
        int res = d.second;
        if (tag >= q.depth) continue;
        if (tagOp[tag] == UBLK_IO_OP_READ && s.userCopy && res > 0) {
          const uint8_t* src = q.buf + static_cast<size_t>(tag) * q.maxIo;
          ssize_t n = pwrite(s.cdevFd.get(), src, static_cast<size_t>(res),
                             static_cast<off_t>(UblkUserCopyOffset(q.qid, tag)));
          if (n != res) res = n < 0 ? -errno : -EIO;
        }
        s.committed.fetch_add(1, std::memory_order_relaxed);
        PrepIoCmd(&ring, s, q, true, tag, res);
      }
      done.clear();
      if (!wakeArmed && !q.stop) {
        PrepWake(&ring, q, &wakeSlot);
        wakeArmed = true;
      }
    }
  }
  io_uring_queue_exit(&ring);
  std::lock_guard<std::mutex> lock(q.mu);
  q.exited = true;
  q.cv.notify_all();
}

}  // namespace

void UblkShared::Notify() {
  if (eventFd.valid()) WriteEventFd(eventFd.get());
}

// ------------------------------------------------------------ JS object

void NativeUblk::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function cls = DefineClass(env, "NativeUblk",
                                   {
                                       InstanceMethod("open", &NativeUblk::Open),
                                       InstanceMethod("ctrl", &NativeUblk::Ctrl),
                                       InstanceMethod("startQueues", &NativeUblk::StartQueues),
                                       InstanceMethod("complete", &NativeUblk::Complete),
                                       InstanceMethod("stats", &NativeUblk::Stats),
                                       InstanceMethod("fastSetup", &NativeUblk::FastSetup),
                                       InstanceMethod("fastMark", &NativeUblk::FastMark),
                                       InstanceMethod("fastEnable", &NativeUblk::FastEnable),
                                       InstanceMethod("fastFlip", &NativeUblk::FastFlip),
                                       InstanceMethod("fastInflight", &NativeUblk::FastInflight),
                                       InstanceMethod("close", &NativeUblk::Close),
                                   });
  exports.Set("NativeUblk", cls);
}

void InitUblk(Napi::Env env, Napi::Object exports) { NativeUblk::Init(env, exports); }

// new NativeUblk(onCtrl: (seq, res) => void, onIo: (count) => void, ctrlOut: Float64Array(8))
NativeUblk::NativeUblk(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeUblk>(info) {
  Napi::Env env = info.Env();
  if (info.Length() >= 3 && info[0].IsFunction() && info[1].IsFunction() && info[2].IsTypedArray()) {
    onCtrl_ = Napi::Persistent(info[0].As<Napi::Function>());
    onIo_ = Napi::Persistent(info[1].As<Napi::Function>());
    ctrlOut_ = Napi::Persistent(info[2].As<Napi::Float64Array>());
    asyncContext_ = std::make_unique<Napi::AsyncContext>(env, "dm_remapd:ublk");
  }
}

NativeUblk::~NativeUblk() {
  if (s_) {
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->ctrlStop = true;
    s_->ctrlCv.notify_all();
  }
  if (ctrlThread_.joinable()) ctrlThread_.detach();
}

// open() -> 0 | -errno: /dev/ublk-control, the SQE128 ring, the control
// thread and the JS-side eventfd poll.
Napi::Value NativeUblk::Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (open_ || closed_ || onCtrl_.IsEmpty()) return Napi::Number::New(env, -EINVAL);
  InstallTimeoutHandler();
  auto s = std::make_shared<UblkShared>();
  s->ctrlFd.reset(::open("/dev/ublk-control", O_RDWR | O_CLOEXEC));
  if (!s->ctrlFd.valid()) return Napi::Number::New(env, -errno);
  auto cr = std::make_shared<CtrlRing>();
  int rc = io_uring_queue_init(4, &cr->ring, IORING_SETUP_SQE128);
  if (rc < 0) return Napi::Number::New(env, rc);
  cr->init = true;
  s->eventFd.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!s->eventFd.valid()) {
    io_uring_queue_exit(&cr->ring);
    return Napi::Number::New(env, -errno);
  }
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    io_uring_queue_exit(&cr->ring);
    return Napi::Number::New(env, -EINVAL);
  }
  poll_ = new uv_poll_t;
  rc = uv_poll_init(loop, poll_, s->eventFd.get());
  if (rc != 0) {
    delete poll_;
    poll_ = nullptr;
    io_uring_queue_exit(&cr->ring);
    return Napi::Number::New(env, -EINVAL);
  }
  poll_->data = this;
  uv_poll_start(poll_, UV_READABLE, OnPoll);
  uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
  s_ = s;
  // The timeout signal is unblocked only on the control thread.
  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, CtrlTimeoutSignal());
  pthread_sigmask(SIG_BLOCK, &set, &old);
  ctrlThread_ = std::thread(CtrlThreadMain, s, cr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  open_ = true;
  Ref();
  return Napi::Number::New(env, 0);
}

// ctrl(seq, op, devId, timeoutMs, params: Float64Array(10)) -> 0 | -errno.
// The result arrives later as onCtrl(seq, res) with ctrlOut filled.
Napi::Value NativeUblk::Ctrl(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!open_ || closed_) return Napi::Number::New(env, -EBADF);
  if (info.Length() < 5 || !info[4].IsTypedArray()) return Napi::Number::New(env, -EINVAL);
  UblkCtrlJob j;
  memset(&j, 0, sizeof j);
  j.seq = info[0].As<Napi::Number>().DoubleValue();
  j.op = info[1].As<Napi::Number>().Int32Value();
  j.devId = info[2].As<Napi::Number>().Uint32Value();
  j.timeoutMs = info[3].As<Napi::Number>().Int32Value();
  if (j.timeoutMs < 1) j.timeoutMs = 1;
  Napi::Float64Array p = info[4].As<Napi::Float64Array>();
  for (size_t i = 0; i < 10 && i < p.ElementLength(); ++i) j.p[i] = p[i];
  {
    std::lock_guard<std::mutex> lock(s_->mu);
    s_->jobs.push_back(j);
    s_->ctrlCv.notify_all();
  }
  ++ctrlPending_;
  UpdateLoopRef();
  return Napi::Number::New(env, 0);
}

// startQueues(devId, depth, maxIo, userCopy, useIoctl, ioBatch: Float64Array, bufs: Buffer[])
//   -> 0 | -errno. One thread per buffer (= per queue); returns once every
//   queue thread has its FETCH_REQs submitted.
Napi::Value NativeUblk::StartQueues(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!open_ || closed_ || !s_->queues.empty()) return Napi::Number::New(env, -EINVAL);
  if (info.Length() < 7 || !info[5].IsTypedArray() || !info[6].IsArray()) return Napi::Number::New(env, -EINVAL);
  uint32_t devId = info[0].As<Napi::Number>().Uint32Value();
  unsigned depth = info[1].As<Napi::Number>().Uint32Value();
  unsigned maxIo = info[2].As<Napi::Number>().Uint32Value();
  bool userCopy = info[3].ToBoolean().Value();
  bool useIoctl = info[4].ToBoolean().Value();
  Napi::Float64Array batch = info[5].As<Napi::Float64Array>();
  Napi::Array bufs = info[6].As<Napi::Array>();
  unsigned nq = bufs.Length();
  if (depth == 0 || depth > UBLK_MAX_QUEUE_DEPTH || maxIo == 0 || nq == 0 ||
      batch.ElementLength() < static_cast<size_t>(nq) * depth * 6)
    return Napi::Number::New(env, -EINVAL);
  s_->userCopy = userCopy;
  s_->useIoctl = useIoctl;
  s_->devId = devId;
  char path[64];
  snprintf(path, sizeof path, "/dev/ublkc%u", devId);
  // No udev in some environments: the node may appear a little after ADD_DEV.
  // EBUSY: a crashed server's file is still being released (recovery).
  int fd = -1;
  for (int i = 0; i < 200; ++i) {
    fd = ::open(path, O_RDWR | O_CLOEXEC);
    if (fd >= 0 || (errno != ENOENT && errno != EBUSY)) break;
    usleep(10000);
  }
  if (fd < 0) return Napi::Number::New(env, -errno);
  s_->cdevFd.reset(fd);
  ioBatch_ = Napi::Persistent(batch);
  for (unsigned qi = 0; qi < nq; ++qi) {
    Napi::Value v = bufs.Get(qi);
    if (!v.IsBuffer()) return Napi::Number::New(env, -EINVAL);
    Napi::Buffer<uint8_t> b = v.As<Napi::Buffer<uint8_t>>();
    if (b.Length() < static_cast<size_t>(depth) * maxIo) return Napi::Number::New(env, -EINVAL);
    bufRefs_.push_back(Napi::Persistent(b));
    auto q = std::make_unique<UblkQueue>();
    q->qid = qi;
    q->depth = depth;
    q->maxIo = maxIo;
    q->buf = b.Data();
    q->iodLen = (depth * sizeof(struct ublksrv_io_desc) + 4095) & ~static_cast<size_t>(4095);
    void* m = mmap(nullptr, q->iodLen, PROT_READ, MAP_SHARED | MAP_POPULATE, fd,
                   static_cast<off_t>(UBLKSRV_CMD_BUF_OFFSET + qi * kUblkCmdBufSlot));
    if (m == MAP_FAILED) return Napi::Number::New(env, -errno);
    q->iods = static_cast<struct ublksrv_io_desc*>(m);
    q->wakeFd.reset(eventfd(0, EFD_CLOEXEC));
    if (!q->wakeFd.valid()) return Napi::Number::New(env, -errno);
    s_->queues.push_back(std::move(q));
  }
  int err = 0;
  for (auto& q : s_->queues) {
    q->th = std::thread(QueueThreadMain, s_, q.get());
    std::unique_lock<std::mutex> lock(q->mu);
    q->cv.wait_for(lock, std::chrono::seconds(5), [&] { return q->ready; });
    if (!q->ready) err = -ETIMEDOUT;
    else if (q->startErr < 0) err = q->startErr;
  }
  return Napi::Number::New(env, err);
}

// complete(desc: Float64Array [q, tag, res] * count, count) -> 0 | -errno
Napi::Value NativeUblk::Complete(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!open_ || closed_) return Napi::Number::New(env, -EBADF);
  Napi::Float64Array d = info[0].As<Napi::Float64Array>();
  size_t count = info[1].As<Napi::Number>().Uint32Value();
  if (count * 3 > d.ElementLength()) return Napi::Number::New(env, -EINVAL);
  std::vector<bool> touched(s_->queues.size(), false);
  for (size_t i = 0; i < count; ++i) {
    size_t q = static_cast<size_t>(d[i * 3]);
    if (q >= s_->queues.size()) continue;
    UblkQueue& qq = *s_->queues[q];
    std::lock_guard<std::mutex> lock(qq.mu);
    qq.done.emplace_back(static_cast<uint16_t>(d[i * 3 + 1]), static_cast<int32_t>(d[i * 3 + 2]));
    touched[q] = true;
  }
  for (size_t q = 0; q < touched.size(); ++q) {
    if (touched[q]) WriteEventFd(s_->queues[q]->wakeFd.get());
  }
  return Napi::Number::New(env, 0);
}

Napi::Value NativeUblk::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("fetched", s_ ? static_cast<double>(s_->fetched.load()) : 0.0);
  o.Set("committed", s_ ? static_cast<double>(s_->committed.load()) : 0.0);
  o.Set("ioFlusher", s_ && !s_->queues.empty() ? s_->queues[0]->ioFlusherErr : 0);
  double fr = 0, fw = 0, frb = 0, fwb = 0, ff = 0, fi = 0;
  if (s_) {
    for (auto& q : s_->queues) {
      fr += static_cast<double>(q->fastReads.load(std::memory_order_relaxed));
      fw += static_cast<double>(q->fastWrites.load(std::memory_order_relaxed));
      frb += static_cast<double>(q->fastReadBytes.load(std::memory_order_relaxed));
      fwb += static_cast<double>(q->fastWriteBytes.load(std::memory_order_relaxed));
      ff += static_cast<double>(q->fastFallbacks.load(std::memory_order_relaxed));
      fi += static_cast<double>(q->fastInflight[0].load() + q->fastInflight[1].load());
    }
  }
  o.Set("fastReads", fr);
  o.Set("fastWrites", fw);
  o.Set("fastReadBytes", frb);
  o.Set("fastWriteBytes", fwb);
  o.Set("fastFallbacks", ff);
  o.Set("fastInFlight", fi);
  return o;
}

// fastSetup(fd, sizeBytes, blockShift) -> 0 | -errno, before startQueues().
// Takes ownership of fd (a dup of main's). The fast path starts off.
Napi::Value NativeUblk::FastSetup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3) return Napi::Number::New(env, -EINVAL);
  int fd = info[0].As<Napi::Number>().Int32Value();
  if (!open_ || closed_ || !s_->queues.empty() || s_->fast.bits != nullptr) {
    if (fd >= 0) ::close(fd);
    return Napi::Number::New(env, -EINVAL);
  }
  double size = info[1].As<Napi::Number>().DoubleValue();
  unsigned shift = info[2].As<Napi::Number>().Uint32Value();
  if (fd < 0 || size <= 0 || shift < 9 || shift > 20) {
    if (fd >= 0) ::close(fd);
    return Napi::Number::New(env, -EINVAL);
  }
  UblkFast& f = s_->fast;
  f.fd.reset(fd);
  f.sizeBytes = static_cast<uint64_t>(size);
  f.blockShift = shift;
  uint64_t blocks = (f.sizeBytes + (1ULL << shift) - 1) >> shift;
  // At most 2^27 chunks (16 MiB of bitmap): larger devices share a bit
  // between neighbouring blocks.
  f.chunkShift = 0;
  while ((blocks >> f.chunkShift) > (1ULL << 27)) ++f.chunkShift;
  uint64_t chunks = (blocks + (1ULL << f.chunkShift) - 1) >> f.chunkShift;
  f.words = static_cast<size_t>((chunks + 63) / 64);
  f.bits.reset(new (std::nothrow) std::atomic<uint64_t>[f.words]);
  if (f.bits == nullptr) {
    f.fd.reset();
    return Napi::Number::New(env, -ENOMEM);
  }
  for (size_t i = 0; i < f.words; ++i) f.bits[i].store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return Napi::Number::New(env, 0);
}

// fastMark(blocks: Float64Array, count): these blocks need the engine from
// now on. Never cleared.
Napi::Value NativeUblk::FastMark(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!s_ || s_->fast.bits == nullptr || info.Length() < 2 || !info[0].IsTypedArray()) return Napi::Number::New(env, -EINVAL);
  UblkFast& f = s_->fast;
  Napi::Float64Array a = info[0].As<Napi::Float64Array>();
  size_t count = info[1].As<Napi::Number>().Uint32Value();
  if (count > a.ElementLength()) return Napi::Number::New(env, -EINVAL);
  const double* d = a.Data();
  for (size_t i = 0; i < count; ++i) {
    if (!(d[i] >= 0)) continue;
    uint64_t c = static_cast<uint64_t>(d[i]) >> f.chunkShift;
    if ((c >> 6) >= f.words) continue;
    f.bits[c >> 6].fetch_or(1ULL << (c & 63));
  }
  return Napi::Number::New(env, 0);
}

// fastEnable(reads, writes)
Napi::Value NativeUblk::FastEnable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!s_ || s_->fast.bits == nullptr || info.Length() < 2) return Napi::Number::New(env, -EINVAL);
  s_->fast.reads.store(info[0].ToBoolean().Value());
  s_->fast.writes.store(info[1].ToBoolean().Value());
  return Napi::Number::New(env, 0);
}

// fastFlip() -> the parity of the epoch that just ended. Every fast I/O
// checked before this call (against the marks and the switch as they were)
// is counted under that parity until it completes: see fastInflight().
Napi::Value NativeUblk::FastFlip(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!s_) return Napi::Number::New(env, 0);
  uint64_t e = s_->fast.epoch.fetch_add(1);
  return Napi::Number::New(env, static_cast<double>(e & 1));
}

// fastInflight(parity) -> fast I/Os of that parity still in flight.
Napi::Value NativeUblk::FastInflight(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!s_ || info.Length() < 1) return Napi::Number::New(env, 0);
  unsigned par = info[0].As<Napi::Number>().Uint32Value() & 1;
  int64_t n = 0;
  for (auto& q : s_->queues) n += q->fastInflight[par].load();
  return Napi::Number::New(env, static_cast<double>(n));
}

void NativeUblk::UpdateLoopRef() {
  if (poll_ == nullptr) return;
  bool want = ctrlPending_ > 0;
  if (want == loopRefed_) return;
  if (want) uv_ref(reinterpret_cast<uv_handle_t*>(poll_));
  else uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
  loopRefed_ = want;
}

void NativeUblk::OnPoll(uv_poll_t* handle, int status, int events) {
  auto* self = static_cast<NativeUblk*>(handle->data);
  if (self != nullptr) self->OnEvents();
}

void NativeUblk::OnEvents() {
  if (!open_ || closed_) return;
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  ClearEventFd(s_->eventFd.get());
  std::vector<UblkCtrlResult> ctrl;
  std::vector<UblkIoItem> ios;
  {
    std::lock_guard<std::mutex> lock(s_->mu);
    ctrl.swap(s_->ctrlResults);
    ios.swap(s_->pending);
  }
  auto call = [&](Napi::FunctionReference& fn, std::initializer_list<napi_value> args) {
    napi_value result;
    napi_status st = napi_make_callback(env, *asyncContext_, Value(), fn.Value(), args.size(), args.begin(), &result);
    if (st != napi_ok) {
      bool pending = false;
      if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
        napi_value err;
        napi_get_and_clear_last_exception(env, &err);
        napi_fatal_exception(env, err);
      }
    }
  };
  if (!ios.empty() && !ioBatch_.IsEmpty()) {
    Napi::Float64Array arr = ioBatch_.Value();
    double* out = arr.Data();
    size_t cap = arr.ElementLength() / 6;
    size_t n = ios.size() < cap ? ios.size() : cap;
    for (size_t i = 0; i < n; ++i) {
      out[i * 6] = ios[i].q;
      out[i * 6 + 1] = ios[i].tag;
      out[i * 6 + 2] = ios[i].opFlags & 0xff;
      out[i * 6 + 3] = ios[i].opFlags >> 8;
      out[i * 6 + 4] = static_cast<double>(ios[i].startSector);
      out[i * 6 + 5] = ios[i].nrSectors;
    }
    call(onIo_, {Napi::Number::New(env, static_cast<double>(n))});
  }
  for (auto& r : ctrl) {
    if (closed_) return;
    Napi::Float64Array out = ctrlOut_.Value();
    for (size_t i = 0; i < 8 && i < out.ElementLength(); ++i) out[i] = r.out[i];
    --ctrlPending_;
    UpdateLoopRef();
    call(onCtrl_, {Napi::Number::New(env, r.seq), Napi::Number::New(env, r.res)});
  }
}

// close(waitMs) -> { ctrlDetached }: stops the control thread (after the
// jobs already queued) and the JS poll. Queue threads must have been joined
// with the JOIN_QUEUES control op.
Napi::Value NativeUblk::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  bool detached = false;
  if (open_ && !closed_) {
    int waitMs = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1000;
    closed_ = true;
    {
      std::unique_lock<std::mutex> lock(s_->mu);
      s_->ctrlStop = true;
      s_->ctrlCv.notify_all();
      bool ok = s_->ctrlExitCv.wait_for(lock, std::chrono::milliseconds(waitMs), [&] { return s_->ctrlExited; });
      lock.unlock();
      if (ok) ctrlThread_.join();
      else {
        ctrlThread_.detach();
        detached = true;
      }
    }
    // Queue threads still running (never joined): ask them to stop; they
    // hold the shared state alive by themselves.
    for (auto& q : s_->queues) {
      q->stop = true;
      if (q->wakeFd.valid()) WriteEventFd(q->wakeFd.get());
      if (q->th.joinable()) q->th.detach();
    }
    if (poll_ != nullptr) {
      uv_poll_stop(poll_);
      poll_->data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
      poll_ = nullptr;
    }
    // Buffers stay referenced while a detached queue thread may still use them.
    bool anyDetached = detached;
    for (auto& q : s_->queues) anyDetached = anyDetached || !q->exited;
    if (anyDetached) {
      for (auto& r : bufRefs_) r.SuppressDestruct();
    } else {
      bufRefs_.clear();
      s_->fast.fd.reset();
    }
    open_ = false;
    Unref();
  }
  o.Set("ctrlDetached", detached);
  return o;
}

}  // namespace dmr
