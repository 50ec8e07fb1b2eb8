// NativeUblk: one ublk device (/dev/ublkbN) served by dm-remapd. See docs/UBLK.md.
//
// Threads:
//  - the control thread owns an SQE128 ring on /dev/ublk-control and runs the
//    control commands one at a time (START_DEV blocks until every tag has a
//    FETCH_REQ outstanding, so it cannot run on a queue thread or on JS);
//  - one queue thread per hardware queue owns its own ring on /dev/ublkcN:
//    FETCH_REQ for every tag, then COMMIT_AND_FETCH_REQ with JS's results;
//  - the JS thread gets fetched requests and control results in batches
//    through an eventfd polled by libuv, and hands results back in batches
//    (complete()), which wake the queue thread through its own eventfd.
#pragma once

#include <liburing.h>
#include <napi.h>
#include <uv.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "ublk_uapi.h"
#include "unique_fd.h"

namespace dmr {

enum UblkCtrlOp : int {
  kUblkFeatures = 0,
  kUblkAdd = 1,
  kUblkSetParams = 2,
  kUblkStart = 3,
  kUblkStop = 4,
  kUblkDel = 5,
  kUblkJoinQueues = 6,
  kUblkGetInfo = 7,
  kUblkStartRecovery = 8,
  kUblkEndRecovery = 9,
};

struct UblkCtrlJob {
  double seq;
  int op;
  uint32_t devId;
  int timeoutMs;
  double p[10];
};

struct UblkCtrlResult {
  double seq;
  int res;
  double out[8];
};

// One fetched request, as JS sees it.
struct UblkIoItem {
  uint16_t q;
  uint16_t tag;
  uint32_t opFlags;
  uint64_t startSector;
  uint32_t nrSectors;
};

struct UblkShared;

struct UblkQueue {
  unsigned qid = 0;
  unsigned depth = 0;
  unsigned maxIo = 0;
  uint8_t* buf = nullptr;  // depth * maxIo bytes, owned by a JS Buffer
  struct ublksrv_io_desc* iods = nullptr;
  size_t iodLen = 0;
  UniqueFd wakeFd;
  std::thread th;
  std::mutex mu;
  std::vector<std::pair<uint16_t, int32_t>> done;  // results from JS
  std::atomic<bool> stop{false};
  std::atomic<bool> exited{false};
  bool ready = false;
  int startErr = 0;
  int ioFlusherErr = 0;
  std::condition_variable cv;  // ready / exited
  // Native fast path (docs/UBLK.md "Fast path"): fast I/O in flight, by the
  // parity of the epoch it was checked in, and what it did.
  std::atomic<int64_t> fastInflight[2] = {{0}, {0}};
  std::atomic<uint64_t> fastReads{0};
  std::atomic<uint64_t> fastWrites{0};
  std::atomic<uint64_t> fastReadBytes{0};
  std::atomic<uint64_t> fastWriteBytes{0};
  std::atomic<uint64_t> fastFallbacks{0};
};

// The non-remapped fast path: reads and writes of blocks that TS has not
// marked slow go from the queue thread straight to main. TS owns the table;
// this is a read-only mirror of "which blocks need the engine": a bitmap
// over chunks of 2^chunkShift blocks that is only ever set (a superset is
// always safe), an on/off switch, and an epoch that lets TS wait until
// every fast I/O that was checked before a mark has completed.
struct UblkFast {
  UniqueFd fd;  // a dup of main's fd
  uint64_t sizeBytes = 0;
  unsigned blockShift = 12;
  unsigned chunkShift = 0;
  size_t words = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> bits;
  std::atomic<bool> reads{false};
  std::atomic<bool> writes{false};
  std::atomic<uint64_t> epoch{0};
};

struct UblkShared {
  UniqueFd ctrlFd;
  UniqueFd cdevFd;
  UniqueFd eventFd;  // queue threads + control thread -> JS
  bool useIoctl = false;
  bool userCopy = false;
  uint32_t devId = UINT32_MAX;
  std::mutex mu;
  std::condition_variable ctrlCv;
  std::deque<UblkCtrlJob> jobs;
  std::vector<UblkCtrlResult> ctrlResults;
  std::vector<UblkIoItem> pending;
  bool ctrlStop = false;
  bool ctrlExited = false;
  std::condition_variable ctrlExitCv;
  std::vector<std::unique_ptr<UblkQueue>> queues;
  std::atomic<uint64_t> fetched{0};
  std::atomic<uint64_t> committed{0};
  UblkFast fast;
  void Notify();
};

class NativeUblk : public Napi::ObjectWrap<NativeUblk> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit NativeUblk(const Napi::CallbackInfo& info);
  ~NativeUblk() override;

 private:
  Napi::Value Open(const Napi::CallbackInfo& info);
  Napi::Value Ctrl(const Napi::CallbackInfo& info);
  Napi::Value StartQueues(const Napi::CallbackInfo& info);
  Napi::Value Complete(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value FastSetup(const Napi::CallbackInfo& info);
  Napi::Value FastMark(const Napi::CallbackInfo& info);
  Napi::Value FastEnable(const Napi::CallbackInfo& info);
  Napi::Value FastFlip(const Napi::CallbackInfo& info);
  Napi::Value FastInflight(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  void OnEvents();
  static void OnPoll(uv_poll_t* handle, int status, int events);
  void UpdateLoopRef();

  std::shared_ptr<UblkShared> s_;
  std::thread ctrlThread_;
  uv_poll_t* poll_ = nullptr;
  bool open_ = false;
  bool closed_ = false;
  bool loopRefed_ = false;
  int ctrlPending_ = 0;
  Napi::FunctionReference onCtrl_;
  Napi::FunctionReference onIo_;
  Napi::Reference<Napi::Float64Array> ctrlOut_;
  Napi::Reference<Napi::Float64Array> ioBatch_;
  std::vector<Napi::Reference<Napi::Buffer<uint8_t>>> bufRefs_;
  std::unique_ptr<Napi::AsyncContext> asyncContext_;
};

void InitUblk(Napi::Env env, Napi::Object exports);

}  // namespace dmr
